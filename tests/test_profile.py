"""The hardware profile: parsing of recorded macOS/Linux system output, and a real
`prepare.py profile --json` run on this machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

from harness import profile

REPO = Path(__file__).resolve().parent.parent

# `sysctl machdep.cpu.brand_string hw.memsize hw.physicalcpu ... hw.perflevel1.name`
# as printed by a MacBook Pro with an M2 Pro (8 performance + 4 efficiency cores, 32 GB).
SYSCTL_M2_PRO = """\
machdep.cpu.brand_string: Apple M2 Pro
hw.memsize: 34359738368
hw.physicalcpu: 12
hw.logicalcpu: 12
hw.nperflevels: 2
hw.perflevel0.name: Performance
hw.perflevel0.physicalcpu: 8
hw.perflevel1.name: Efficiency
hw.perflevel1.physicalcpu: 4
"""

# The same command on an Intel Mac: no perflevel keys (sysctl reports them on stderr).
SYSCTL_INTEL_MAC = """\
machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz
hw.memsize: 17179869184
hw.physicalcpu: 8
hw.logicalcpu: 16
"""

# Two logical CPUs of an Intel hybrid chip, shortened: one P-core with two threads.
CPUINFO_HYBRID = """\
processor\t: 0
model name\t: 12th Gen Intel(R) Core(TM) i7-1260P
physical id\t: 0
core id\t: 0

processor\t: 1
model name\t: 12th Gen Intel(R) Core(TM) i7-1260P
physical id\t: 0
core id\t: 0

processor\t: 2
model name\t: 12th Gen Intel(R) Core(TM) i7-1260P
physical id\t: 0
core id\t: 8

processor\t: 3
model name\t: 12th Gen Intel(R) Core(TM) i7-1260P
physical id\t: 0
core id\t: 9
"""


def test_sysctl_apple_silicon():
    values = profile.parse_sysctl(SYSCTL_M2_PRO)
    assert values["hw.perflevel0.name"] == "Performance"
    facts = profile.apple_cpu(values)
    assert facts == {"cpu_model": "Apple M2 Pro", "performance_cores": 8, "efficiency_cores": 4,
                     "physical_cores": 12, "logical_cpus": 12, "ram_bytes": 34359738368}


def test_sysctl_intel_mac_and_bsd_form():
    facts = profile.apple_cpu(profile.parse_sysctl(SYSCTL_INTEL_MAC))
    assert facts["cpu_model"].startswith("Intel(R) Core(TM) i9")
    assert (facts["performance_cores"], facts["efficiency_cores"], facts["logical_cpus"]) == (8, 0, 16)
    assert profile.parse_sysctl("hw.memsize = 8589934592\n") == {"hw.memsize": "8589934592"}


def test_linux_cpuinfo_hybrid():
    facts = profile.linux_cpu(CPUINFO_HYBRID, "MemTotal:       16318480 kB\n", atom_cpus="2-3\n")
    assert facts["cpu_model"] == "12th Gen Intel(R) Core(TM) i7-1260P"
    assert (facts["physical_cores"], facts["performance_cores"], facts["efficiency_cores"]) == (3, 1, 2)
    assert facts["logical_cpus"] == 4 and facts["ram_bytes"] == 16318480 * 1024


def test_profile_json_is_only_json_and_bandwidths_agree(tmp_path):
    env = {**os.environ, "MLX_HILLCLIMB_CACHE": str(tmp_path / "cache")}

    def run(*args):
        return subprocess.run([sys.executable, "prepare.py", "profile", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)

    proc = run("--json", "--refresh")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert "measuring" in proc.stderr  # progress went to stderr
    for key in ("cpu_model", "performance_cores", "efficiency_cores", "ram_bytes", "accelerator",
                "mlx", "mlx_lm", "mlx_blas", "numpy_blas", "disk_read_mbs", "bandwidth_gbs",
                "mlx_copy_gbs", "numpy_copy_gbs", "measured_at"):
        assert key in data, key
    assert data["accelerator"] in ("Metal", "CUDA", "none")
    assert data["ram_bytes"] > 2**28 and data["performance_cores"] >= 1
    assert data["disk_read_mbs"] > 0 and data["bandwidth_gbs"] == data["mlx_copy_gbs"]
    ratio = data["mlx_copy_gbs"] / data["numpy_copy_gbs"]
    assert 0.2 <= ratio <= 5, data  # one machine, one memory: the two copies must roughly agree
    if sys.platform == "linux":
        assert "netlib" in data["mlx_blas"] or "blas" in data["mlx_blas"].lower()

    cached = tmp_path / "cache" / "profile.json"
    assert json.loads(cached.read_text())["measured_at"] == data["measured_at"]
    again = run("--json")  # served from the cache: nothing remeasured
    assert json.loads(again.stdout)["measured_at"] == data["measured_at"]
    assert "measuring" not in again.stderr
    text = run()
    assert text.returncode == 0 and "bandwidth_gbs: " in text.stdout and text.stdout.startswith("---")
