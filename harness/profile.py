"""Hardware profile: what this machine is, and how fast it moves bytes.

    python prepare.py profile [--json] [--refresh]

Static facts (CPU model, performance/efficiency cores, RAM, accelerator, versions,
BLAS) are read from the system; speeds (disk read, memory bandwidth through MLX and
through numpy) are measured. The profile is cached as JSON in the user cache dir and
remeasured with --refresh, or when the machine or the MLX version changes.

`bandwidth_gbs` (MLX's copy bandwidth on its default device) is the memory roof for
roofline estimates: decode tok/s x bytes read per token / bandwidth.
"""

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.report import note

SCHEMA = 1
COPY_MB = 256          # array size for the bandwidth benchmarks: far past any CPU cache
DISK_MB = 256          # temp file size for the disk read benchmark
REPEATS = 5            # best of this many for each speed

# The keys `sysctl` is asked for on macOS. Intel Macs have no perflevel keys; sysctl
# then prints the others and an error for those, which is fine.
SYSCTL_KEYS = [
    "machdep.cpu.brand_string", "hw.memsize", "hw.physicalcpu", "hw.logicalcpu",
    "hw.nperflevels", "hw.perflevel0.name", "hw.perflevel0.physicalcpu",
    "hw.perflevel1.name", "hw.perflevel1.physicalcpu",
]

# Keys whose change means the cached profile describes another machine or software.
FINGERPRINT_KEYS = ("machine", "cpu_model", "ram_bytes", "accelerator", "mlx", "mlx_lm")


def _version(package):
    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------
# Static facts
# ---------------------------------------------------------------------------
def parse_sysctl(text):
    """Parse `sysctl` output ("key: value" lines, or BSD's "key = value") into a dict of strings."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.]+)\s*(?::|=)\s?(.*)$", line.strip())
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def _int(value):
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def apple_cpu(sysctl):
    """CPU facts from parsed macOS sysctl values.

    Apple silicon reports its performance cluster as perflevel0 and its efficiency
    cluster as perflevel1; Intel Macs have neither, and all their cores count as
    performance cores.
    """
    physical = _int(sysctl.get("hw.physicalcpu"))
    perf = _int(sysctl.get("hw.perflevel0.physicalcpu"))
    eff = _int(sysctl.get("hw.perflevel1.physicalcpu"))
    if perf is None:
        perf, eff = physical, 0
    return {
        "cpu_model": sysctl.get("machdep.cpu.brand_string") or platform.processor() or "unknown",
        "performance_cores": perf,
        "efficiency_cores": eff if eff is not None else 0,
        "physical_cores": physical if physical is not None else (perf or 0) + (eff or 0),
        "logical_cpus": _int(sysctl.get("hw.logicalcpu")) or os.cpu_count(),
        "ram_bytes": _int(sysctl.get("hw.memsize")),
    }


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_list_size(text):
    """Number of CPUs in a Linux cpu list such as "0-7,16-23"."""
    count = 0
    for part in text.strip().split(","):
        if "-" in part:
            low, high = part.split("-")
            count += int(high) - int(low) + 1
        elif part:
            count += 1
    return count


def linux_cpu(cpuinfo, meminfo, *, atom_cpus=""):
    """CPU facts from the text of /proc/cpuinfo and /proc/meminfo.

    Physical cores are the distinct (physical id, core id) pairs. Intel hybrid chips
    list their efficiency (Atom) CPUs in /sys/devices/cpu_atom/cpus (`atom_cpus`);
    other CPUs have performance cores only.
    """
    model, cores, logical = None, set(), 0
    block = {}
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if "processor" in block:
                logical += 1
                cores.add((block.get("physical id", "0"), block.get("core id", block["processor"])))
                model = model or block.get("model name") or block.get("Model") or block.get("cpu model")
            block = {}
            continue
        key, _, value = line.partition(":")
        block[key.strip()] = value.strip()
    physical = len(cores) or os.cpu_count() or 0
    efficiency = _cpu_list_size(atom_cpus) if atom_cpus.strip() else 0
    ram = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.M)
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "performance_cores": max(physical - efficiency, 0),
        "efficiency_cores": efficiency,
        "physical_cores": physical,
        "logical_cpus": logical or os.cpu_count(),
        "ram_bytes": int(ram.group(1)) * 1024 if ram else None,
    }


def cpu_facts():
    """CPU model, cores and RAM of this machine (macOS via sysctl, Linux via /proc)."""
    if sys.platform == "darwin":
        proc = subprocess.run(["sysctl", *SYSCTL_KEYS], capture_output=True, text=True)
        return apple_cpu(parse_sysctl(proc.stdout))
    facts = linux_cpu(_read("/proc/cpuinfo"), _read("/proc/meminfo"),
                      atom_cpus=_read("/sys/devices/cpu_atom/cpus"))
    if not facts["ram_bytes"]:
        try:
            facts["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            pass
    return facts


def accelerator_facts():
    """Where MLX computes: accelerator 'Metal', 'CUDA' or 'none', with what MLX says of it."""
    import mlx.core as mx

    from harness.environment import device_name

    device = device_name()
    facts = {"mlx_device": device,
             "accelerator": {"metal": "Metal", "cuda": "CUDA", "cpu": "none"}.get(device, device),
             "accelerator_name": None, "accelerator_memory_bytes": None,
             "accelerator_working_set_bytes": None}
    if device != "cpu":
        try:
            info = mx.device_info()
        except Exception:  # older MLX or a backend without device_info
            info = {}
        facts["accelerator_name"] = info.get("device_name")
        facts["accelerator_memory_bytes"] = info.get("memory_size") or info.get("total_memory")
        facts["accelerator_working_set_bytes"] = info.get("max_recommended_working_set_size")
    return facts


def blas_facts():
    """Which BLAS does matrix work on the CPU, for MLX and for numpy.

    MLX on macOS is built against Apple's Accelerate. The Linux wheels (mlx-cpu)
    bundle their own reference (netlib) BLAS/LAPACK, found here among the libraries
    mapped into this process from MLX's own package folders.
    """
    import mlx.core  # noqa: F401  (maps libmlx and its BLAS into this process)
    import numpy as np

    if sys.platform == "darwin":
        mlx_blas = "accelerate"
    else:
        libs = sorted({Path(line.split()[-1]).name for line in _read("/proc/self/maps").splitlines()
                       if "mlx" in line and re.search(r"(blas|lapack|mkl)", line.split()[-1], re.I)})
        blas = [lib for lib in libs if re.search(r"blas|mkl", lib, re.I)]
        if not blas:
            mlx_blas = "unknown"
        elif any("openblas" in lib.lower() for lib in blas):
            mlx_blas = "openblas (" + ", ".join(blas) + ")"
        elif any("mkl" in lib.lower() for lib in blas):
            mlx_blas = "mkl (" + ", ".join(blas) + ")"
        else:
            mlx_blas = "reference netlib BLAS bundled with mlx (" + ", ".join(blas) + ")"
    try:
        config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        numpy_blas = f"{config.get('name', 'unknown')} {config.get('version', '')}".strip()
    except Exception:  # numpy < 1.26 has no mode="dicts"
        numpy_blas = "unknown"
    return {"mlx_blas": mlx_blas, "numpy_blas": numpy_blas}


def static_facts():
    """Everything about this machine that needs no measurement (fast; never cached)."""
    facts = {"os": platform.platform(), "machine": platform.machine(),
             "python": platform.python_version()}
    facts.update(cpu_facts())
    facts.update(accelerator_facts())
    facts["mlx"] = _version("mlx")
    facts["mlx_lm"] = _version("mlx-lm")
    facts.update(blas_facts())
    # What a model must fit in: the GPU's recommended working set on Metal (unified
    # memory, but Metal caps what one process may wire), else physical RAM.
    facts["memory_budget_bytes"] = facts["accelerator_working_set_bytes"] or facts["ram_bytes"]
    return facts


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------
def _drop_file_cache(fd):
    """Ask the OS to forget the file's cached pages; True when it could be asked."""
    if hasattr(os, "posix_fadvise"):  # Linux: drops clean pages of this file
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    if sys.platform == "darwin":  # macOS: F_NOCACHE makes reads on this fd bypass the cache
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", 48), 1)
        return True
    return False


def measure_disk_read(folder, *, size_mb=DISK_MB):
    """Sequential read speed (MB/s) of a temp file in `folder`, after dropping what we can of the cache.

    Returns {"disk_read_mbs", "disk_cache_dropped", "disk_path"}. When the cache could
    not be dropped the figure may be the page cache's speed, and says so.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(8 << 20)  # incompressible, so no filesystem can cheat
    fd, name = tempfile.mkstemp(prefix="disk-bench-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(max(size_mb // 8, 1)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        best, dropped = None, False
        buffer = bytearray(8 << 20)
        for _ in range(2):
            with open(name, "rb", buffering=0) as f:
                dropped = _drop_file_cache(f.fileno())
                total, start = 0, time.perf_counter()
                while n := f.readinto(buffer):
                    total += n
                elapsed = time.perf_counter() - start
            speed = total / elapsed / 1e6
            best = speed if best is None else max(best, speed)
    finally:
        os.unlink(name)
    return {"disk_read_mbs": round(best, 1), "disk_cache_dropped": dropped, "disk_path": str(folder)}


def measure_mlx_bandwidth(*, size_mb=COPY_MB, repeats=REPEATS):
    """Memory bandwidth (GB/s) MLX reaches on its default device.

    copy: `b = a + 0` on a float32 array of `size_mb`, bytes read + written over the
    time, best of `repeats`. The buffer cache is enlarged for the run so each repeat
    reuses the last output buffer instead of page-faulting a fresh one (MLX's CPU
    default keeps only 32 MB cached), which would time the kernel, not the memory.
    matvec: `x @ W.T` with W (n, n) float32, the shape of a Linear layer at decode
    time, counted as W's bytes over the time: what the MLX matmul path (BLAS on the
    CPU) actually streams.
    """
    import mlx.core as mx

    n = size_mb * (1 << 20) // 4
    old_limit = mx.set_cache_limit(4 * size_mb << 20)
    try:
        a = mx.random.uniform(shape=(n,))
        mx.eval(a)
        copy = _best(lambda: a + 0, repeats)
        side = int(n ** 0.5)
        w = a[: side * side].reshape(side, side)
        x = mx.random.uniform(shape=(1, side))
        mx.eval(w, x)
        matvec = _best(lambda: x @ w.T, max(repeats - 2, 2))
        copy_gbs = 2 * a.nbytes / copy / 1e9
        matvec_gbs = w.nbytes / matvec / 1e9
    finally:
        mx.set_cache_limit(old_limit)
        mx.clear_cache()
    return {"mlx_copy_gbs": round(copy_gbs, 2), "mlx_matvec_gbs": round(matvec_gbs, 2)}


def _best(make, repeats):
    """Best wall time of evaluating `make()` (an MLX graph) `repeats` times, after one warm-up."""
    import mlx.core as mx

    out = make()
    mx.eval(out)
    del out
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = make()
        mx.eval(out)
        mx.synchronize()
        best = min(best, time.perf_counter() - start)
        del out
    return best


def measure_numpy_bandwidth(*, size_mb=COPY_MB, repeats=REPEATS):
    """Copy bandwidth (GB/s) of numpy into a preallocated array: bytes read + written, best of `repeats`."""
    import numpy as np

    src = np.random.default_rng(0).random(size_mb * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return {"numpy_copy_gbs": round(2 * src.nbytes / best / 1e9, 2)}


def measure(*, disk_folder=None):
    """Measure the full profile now: static facts plus disk and memory speeds."""
    from harness.models import cache_dir

    profile = {"schema": SCHEMA,
               "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    note("profile: reading system facts ...")
    profile.update(static_facts())
    note(f"profile: measuring disk read speed ({DISK_MB} MB temp file) ...")
    profile.update(measure_disk_read(disk_folder or cache_dir()))
    note(f"profile: measuring memory bandwidth ({COPY_MB} MB copies, MLX and numpy) ...")
    profile.update(measure_mlx_bandwidth())
    profile.update(measure_numpy_bandwidth())
    profile["bandwidth_gbs"] = profile["mlx_copy_gbs"]
    return profile


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------
def profile_path():
    """Where the cached profile lives."""
    from harness.models import cache_dir

    return cache_dir() / "profile.json"


def _cached(path, facts):
    try:
        cached = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("schema") != SCHEMA or "bandwidth_gbs" not in cached:
        return None
    if any(cached.get(key) != facts.get(key) for key in FINGERPRINT_KEYS):
        return None  # another machine, or MLX was upgraded: the numbers may not hold
    return cached


def load_profile(refresh=False):
    """The hardware profile as a dict (key `bandwidth_gbs` in GB/s, and the rest).

    Uses the cached profile when it was measured on this machine with these MLX
    versions; otherwise (or with refresh=True) measures, caches and returns it.
    """
    path = profile_path()
    if not refresh:
        cached = _cached(path, static_facts())
        if cached is not None:
            return cached
    profile = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return profile


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
TEXT_KEYS = [
    "cpu_model", "performance_cores", "efficiency_cores", "physical_cores", "logical_cpus",
    "ram_gb", "accelerator", "accelerator_name", "mlx_device", "memory_budget_gb", "mlx", "mlx_lm",
    "mlx_blas", "numpy_blas", "disk_read_mbs", "disk_cache_dropped", "bandwidth_gbs",
    "mlx_copy_gbs", "numpy_copy_gbs", "mlx_matvec_gbs", "os", "python", "measured_at", "cache",
]


def text(profile):
    """The `key: value` block `profile` prints without --json."""
    view = dict(profile)
    view["ram_gb"] = round(profile["ram_bytes"] / 1e9, 1) if profile.get("ram_bytes") else None
    budget = profile.get("memory_budget_bytes")
    view["memory_budget_gb"] = round(budget / 1e9, 1) if budget else None
    lines = ["---"]
    for key in TEXT_KEYS:
        value = view.get(key)
        value = "-" if value is None else ("true" if value is True else "false" if value is False else value)
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def add_parser(sub):
    """Add the `profile` subcommand to argparse subparsers `sub`."""
    p = sub.add_parser("profile", help="hardware profile: cores, RAM, accelerator, BLAS, disk and memory speed")
    p.add_argument("--json", action="store_true", help="print only the profile as one JSON object")
    p.add_argument("--refresh", action="store_true", help="measure again instead of using the cached profile")
    p.set_defaults(func=run)


def run(args):
    """`python prepare.py profile`: print the (cached or fresh) profile. Returns the exit status."""
    profile = dict(load_profile(refresh=args.refresh))
    profile["cache"] = str(profile_path())
    if args.json:
        print(json.dumps(profile, sort_keys=True))
    else:
        print(text(profile))
    return 0
