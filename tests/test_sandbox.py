"""The sandbox around pipeline code, and process control: a worker cannot write outside its
folder, see or signal anything outside its own processes, or reach the network; the idle
worker is stopped while the other is timed; nothing a worker starts outlives it.

Most workers here run a stand-in pipeline (no model: it probes and reports), so each test
takes a second or two; one runs the real inference.py on the tiny model.
"""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import uuid
from pathlib import Path

import pytest

from harness import bench, child, sandbox, seccomp, tasks
from harness.settings import HARNESS_HOME
from harness.worker import Worker

REPO = Path(__file__).resolve().parent.parent

# A stand-in inference.py: load() runs the probes named in CONFIG and writes what happened
# into probe.json in its own folder (the cwd); generate() yields one (token, log-probs) pair
# per `sleep` s.
PROBE_PIPELINE = r'''
import json, os, socket, sys, threading, time
CONFIG = json.loads(__CONFIG__)

def _outcome(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return type(exc).__name__

def _append(path):  # opens for writing, writes nothing: harmless if it succeeds
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))

def _create(folder):
    path = os.path.join(folder, "sandbox-probe-" + CONFIG["marker"])
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT))
    os.unlink(path)

def _connect(port):
    socket.create_connection(("127.0.0.1", port), timeout=2).close()

def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

def _daemon():
    """Double fork + setsid: a grandchild in a session of its own, re-parented away from us."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", CONFIG["marker"]])
        os._exit(0)
    os.wait()

def _spin():
    while True:
        pass

def load(model_path, draft_model_path=None):
    report = {
        "append": {p: _outcome(lambda p=p: _append(p)) for p in CONFIG.get("append", [])},
        "create": {d: _outcome(lambda d=d: _create(d)) for d in CONFIG.get("create", [])},
        "signal": {str(pid): _outcome(lambda pid=pid: os.kill(pid, 0)) for pid in CONFIG.get("pids", [])},
        "read": {p: _outcome(lambda p=p: open(p).read()) for p in CONFIG.get("read", [])},
        "visible": [_cmdline(n) for n in os.listdir("/proc") if n.isdigit()],
        "env": {k: os.environ.get(k) for k in ("TMPDIR", "XDG_CACHE_HOME")},
    }
    if "port" in CONFIG:
        report["connect"] = _outcome(lambda: _connect(CONFIG["port"]))
    if CONFIG.get("daemon"):
        _daemon()
    if CONFIG.get("spin"):
        threading.Thread(target=_spin, daemon=True).start()
    with open("probe.json", "w") as f:
        json.dump(report, f)
    return None

def generate(pipeline, prompt, *, max_tokens, stop_at_eos):
    import mlx.core as mx
    logprobs = mx.full((64,), -4.1589)  # uniform over a 64-token vocabulary
    for i in range(max_tokens):
        time.sleep(CONFIG.get("sleep", 0.0))
        yield i, logprobs

def score(pipeline, tokens):
    return iter(())
'''


def start(tmp_path, name, config):
    """A Worker running the probe pipeline with `config`, loaded; returns (worker, its folder)."""
    folder = tmp_path / name
    folder.mkdir()
    config = {"marker": f"marker-{uuid.uuid4().hex}", **config}
    source = PROBE_PIPELINE.replace("__CONFIG__", repr(json.dumps(config)))
    (folder / "inference.py").write_text(source)
    worker = Worker(folder / "inference.py", tmp_path / f"{name}.log")
    try:
        worker.load(tmp_path / "no-model", timeout_s=60)
    except Exception:
        print(worker.log_tail())
        worker.kill()
        raise
    # The worker runs a copy of the file in a private folder of its own (removed when it is killed).
    return worker, worker.inference_path.parent, config["marker"]


def report(folder):
    return json.loads((folder / "probe.json").read_text())


def host_pids_with(marker):
    """Pids, as the harness sees them, of the live processes whose command line holds `marker`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker.encode() in cmdline and state not in "ZX":
            found.append(int(name))
    return found


def cpu_ticks(pids):
    """utime + stime, in clock ticks, summed over `pids`."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def worker_pids(worker):
    return sandbox.members(sandbox.process_table(), root=worker.proc.pid, ns=worker._namespace)


# ---------------------------------------------------------------------------
# Linux: bubblewrap, for real
# ---------------------------------------------------------------------------
def test_worker_writes_only_its_own_folder(sandboxed, tmp_path, tiny_llama, monkeypatch):
    secret = tmp_path / "cache" / "reference" / "key" / "kl_logprobs.npy"
    secret.parent.mkdir(parents=True)
    secret.write_text("the reference's log-probs")
    monkeypatch.setenv("MLX_HILLCLIMB_CACHE", str(tmp_path / "cache"))
    outside = tmp_path / "outside.txt"
    outside.write_text("")
    appends = [str(outside), str(REPO / "harness.yaml"), str(HARNESS_HOME / "harness" / "worker.py"),
               str(tiny_llama / "config.json")]
    creates = [str(tmp_path), str(REPO), str(tiny_llama), "/tmp"]
    # tmp_path / "w" holds the file the caller handed over: not the worker's folder
    # another worker's folder, where the other role's inference.py lies (a red team read it)
    sibling = Path(tempfile.mkdtemp(prefix="mlx-hillclimb-worker-")) / "inference.py"
    sibling.write_text("GEN = 2\n")
    worker, folder, _ = start(tmp_path, "w", {"append": appends, "create": creates + [str(tmp_path / "w"), "."],
                                              "read": [str(secret), str(sibling)]})
    try:
        assert worker.sandbox == "bwrap" and worker.info["sandbox"] == "bwrap"
        got = report(folder)
    finally:
        worker.close()
        shutil.rmtree(sibling.parent)
    assert not folder.exists()  # the private folder goes with the worker
    # the system's temp folder (other workers' folders, this test's files; a clone made
    # there) is hidden, less the harness package; the rest is read-only (EROFS; as root the
    # worker runs as a user of its own, who may not write there anyway: EACCES first)
    refused = {"OSError", "PermissionError"}

    def hidden(path):
        return (Path(path).is_relative_to(tempfile.gettempdir())
                and not Path(path).is_relative_to(HARNESS_HOME / "harness"))
    assert {path: "FileNotFoundError" if hidden(path) else "refused" for path in appends} \
        == {path: "refused" if outcome in refused else outcome for path, outcome in got["append"].items()}
    assert got["create"].pop(".") == "ok"
    assert set(got["create"].values()) <= refused | {"FileNotFoundError"}, got["create"]
    assert got["create"]["/tmp"] in refused  # hidden, and read-only too
    # the reference cache and the other worker's folder are hidden
    assert got["read"] == {str(secret): "FileNotFoundError", str(sibling): "FileNotFoundError"}
    assert got["env"]["TMPDIR"] == str(folder.resolve())
    assert not list(REPO.glob("sandbox-probe-*")) and not list(tmp_path.glob("sandbox-probe-*"))


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtual environment (the README's .venv)")
def test_an_environment_inside_a_hidden_folder_stays_usable(sandboxed, tmp_path, tiny_llama):
    """The README's quick start puts .venv inside the repository, and the repository is
    hidden from workers: the interpreter's own environment must stay readable (a fresh
    clone's first run crashed when it was hidden with the rest)."""
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(REPO / "inference.py", folder / "inference.py")
    worker = Worker(folder / "inference.py", tmp_path / "w.log", hide=[Path(sys.prefix).parent], expose=[tiny_llama])
    try:
        worker.load(tiny_llama, timeout_s=120)
        out = worker.generate([1, 2, 3], max_tokens=4, stop_at_eos=False, timeout_s=60)
    finally:
        worker.close()
    assert worker.sandbox == "bwrap" and len(out["tokens"]) == 4


def test_worker_cannot_see_or_signal_others_or_reach_the_network(sandboxed, tmp_path):
    other, _, other_marker = start(tmp_path, "champion", {})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        targets = [os.getpid(), os.getppid(), other.proc.pid, *worker_pids(other)]
        worker, folder, _ = start(tmp_path, "challenger", {"pids": targets, "port": listener.getsockname()[1]})
        got = report(folder)
        worker.close()
    finally:
        other.close()
        listener.close()
    assert set(got["signal"].values()) == {"ProcessLookupError"}, got["signal"]
    assert got["connect"] != "ok"  # the harness's loopback is another network's
    # only its own processes (bwrap's init and the worker itself), none of the harness's or the champion's
    assert got["visible"] and all(str(folder) in cmdline for cmdline in got["visible"]), got["visible"]
    assert other_marker not in " ".join(got["visible"])


def test_double_forked_daemon_dies_with_its_worker(sandboxed, tmp_path):
    worker, _, marker = start(tmp_path, "w", {"daemon": True})
    try:
        deadline = time.monotonic() + 5
        while not host_pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert host_pids_with(marker), "the daemon never started: the test proves nothing"
    finally:
        worker.close()
    assert host_pids_with(marker) == []


def test_idle_worker_is_stopped_while_the_other_is_timed(sandboxed, tmp_path, monkeypatch):
    idle, _, _ = start(tmp_path, "champion", {"spin": True})  # burns CPU whenever it may
    timed, _, _ = start(tmp_path, "challenger", {"sleep": 0.03})
    seen = []
    real_generate = timed.generate

    def generate(*args, **kwargs):
        pids = worker_pids(idle)
        table = sandbox.process_table()
        before = cpu_ticks(pids)
        out = real_generate(*args, **kwargs)
        seen.append((cpu_ticks(pids) - before, {table[p].state for p in pids}))
        return out

    monkeypatch.setattr(timed, "generate", generate)
    monkeypatch.setattr(bench, "build_prompt", lambda tokenizer, spec, corpus: types.SimpleNamespace(
        tokens=[1, 2, 3], name=spec.name, kind="decode", nonce="n"))
    preset = types.SimpleNamespace(prompts=[types.SimpleNamespace(name="p")], warmup=0, repeats=2, max_tokens=8)
    try:
        bench.run_workload({"champion": idle, "challenger": timed}, preset, None, "", timeout_s=30)
        spinning = cpu_ticks(worker_pids(idle))
        time.sleep(0.3)
        resumed = cpu_ticks(worker_pids(idle)) - spinning
    finally:
        idle.close()
        timed.close()
    assert len(seen) == 2
    for ticks, states in seen:
        assert states == {"T"}, states
        assert ticks <= 1, f"the idle worker ran {ticks} ticks during the other's call"
    assert resumed >= 5, "the idle worker was not running again after the workload"


def test_code_task_answers_run_sandboxed(sandboxed, tmp_path):
    target = tmp_path / "planted.txt"
    code = textwrap.dedent(f"""
        import os
        def probe():
            try:
                open({str(target)!r}, "w").write("x")
                return "wrote"
            except OSError:
                return "denied"
        """)
    # The repository (results.tsv, runs/, .git) is hidden too, as from the pipeline's workers.
    from harness.settings import ROOT as repo
    assert (repo / "harness").is_dir()
    tests_ = ["assert probe() == 'denied'", "open('scratch.txt', 'w').write('ok')",
              "assert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3",
              f"assert not os.path.exists({str(repo / 'harness')!r})"]
    assert tasks._run_tests(code, tests_, 5.0) == (True, "passed 4 tests")
    assert not target.exists()


# ---------------------------------------------------------------------------
# Without a sandbox: still measured, and still nothing outlives the run
# ---------------------------------------------------------------------------
def test_no_sandbox_runs_the_real_pipeline_and_says_so(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "none")
    folder = tmp_path / "w"
    folder.mkdir()
    shutil.copy(REPO / "inference.py", folder / "inference.py")
    worker = Worker(folder / "inference.py", tmp_path / "w.log")
    try:
        info = worker.load(tiny_llama, timeout_s=120)
        out = worker.generate([1, 2, 3], max_tokens=4, stop_at_eos=False, timeout_s=60)
    finally:
        worker.close()
    assert worker.sandbox == "none" and info["sandbox"] == "none"
    assert "MLX_HILLCLIMB_SANDBOX=none" in worker.sandbox_why
    assert len(out["tokens"]) == 4
    assert worker.max_rss_bytes > 0


def test_no_sandbox_daemon_dies_and_idle_worker_stops(tmp_path, monkeypatch):
    monkeypatch.setenv(sandbox.ENV_VAR, "none")
    worker, _, marker = start(tmp_path, "w", {"daemon": True})
    try:
        deadline = time.monotonic() + 5
        while not host_pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        daemons = host_pids_with(marker)
        assert daemons, "the daemon never started: the test proves nothing"
        worker.pause()
        table = sandbox.process_table()
        assert {table[p].state for p in [worker.proc.pid, *daemons]} == {"T"}
        worker.resume()
        assert sandbox.process_table()[worker.proc.pid].state != "T"
    finally:
        worker.close()
    assert host_pids_with(marker) == []


def test_a_paused_worker_is_resumed_when_a_call_raises(monkeypatch):
    class Fake:
        def __init__(self, fail):
            self.fail, self.paused = fail, False

        def pause(self):
            self.paused = True

        def resume(self):
            self.paused = False

        def generate(self, prompt, **kwargs):
            assert not self.paused
            if self.fail:
                raise bench.WorkerInvalid("boom")
            return {"tokens": list(range(4)), "times": [0.1, 0.2, 0.3, 0.4], "peak_memory_bytes": 0}

        def timed_logprobs(self, ids, timeout_s):
            return {call: None for call in ids}

    monkeypatch.setattr(bench, "build_prompt", lambda tokenizer, spec, corpus: types.SimpleNamespace(
        tokens=[1], name=spec.name, kind="decode", nonce="n"))
    preset = types.SimpleNamespace(prompts=[types.SimpleNamespace(name="p")], warmup=0, repeats=1, max_tokens=4)
    workers = {"champion": Fake(False), "challenger": Fake(True)}
    with pytest.raises(bench.WorkerInvalid):
        bench.run_workload(workers, preset, None, "", timeout_s=1)
    assert not any(w.paused for w in workers.values())


# ---------------------------------------------------------------------------
# The command and the macOS profile (generated here; it can only run on macOS)
# ---------------------------------------------------------------------------
def test_bwrap_command_confines_to_one_folder(tmp_path):
    hidden = tmp_path / "reference"
    argv = sandbox.bwrap_command(["python", "-c", "pass"], str(tmp_path), [str(hidden)])
    line = " ".join(argv)
    for flag in ("--ro-bind / /", f"--bind {tmp_path} {tmp_path}", "--unshare-pid", "--unshare-net",
                 "--die-with-parent", "--cap-drop ALL", f"--tmpfs {hidden}", f"--chdir {tmp_path}"):
        assert flag in line
    # /tmp stays visible (the run's folder and the harness copy live there); the others are machine counters
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--tmpfs" and argv[i + 1] not in sandbox._EMPTY_FOLDERS] \
        == [str(hidden)]
    assert argv[-4:] == ["--", "python", "-c", "pass"]


def test_macos_profile_denies_what_reaches_the_referee(tmp_path, monkeypatch):
    folder = tmp_path / 'my "run"'
    profile = sandbox.sbpl_profile(folder, ["/cache/reference"])
    lines = profile.splitlines()
    assert lines[:2] == ["(version 1)", "(allow default)"]
    for rule in ("(deny network*)", "(deny file-write*)", "(deny signal (target others))", "(deny process-fork)",
                 '(deny file-read* (subpath "/cache/reference"))'):
        assert rule in lines
    allow = next(line for line in lines if line.startswith("(allow file-write*"))
    assert f'(subpath "{tmp_path}/my \\"run\\"")' in allow and '(literal "/dev/null")' in allow

    monkeypatch.delenv(sandbox.ENV_VAR, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(sandbox, "_sandbox_exec", lambda: ("/usr/bin/sandbox-exec", ""))
    box = sandbox.wrap(["python3", "x.py"], folder)
    assert box.kind == "sandbox-exec" and box.command[:2] == ["/usr/bin/sandbox-exec", "-p"]
    assert box.command[-2:] == ["python3", "x.py"] and "(deny process-fork)" in box.command[2]


def test_sandbox_setting(monkeypatch, tmp_path):
    monkeypatch.setenv(sandbox.ENV_VAR, "none")
    box = sandbox.wrap(["true"], tmp_path)
    assert (box.kind, box.command, box.env["TMPDIR"]) == ("none", ["true"], str(tmp_path.resolve()))
    monkeypatch.setenv(sandbox.ENV_VAR, "off")
    with pytest.raises(ValueError, match="MLX_HILLCLIMB_SANDBOX='off' is not understood"):
        sandbox.wrap(["true"], tmp_path)
    monkeypatch.delenv(sandbox.ENV_VAR)
    monkeypatch.setattr(sys, "platform", "sunos5")
    assert sandbox.wrap(["true"], tmp_path).kind == "none"


LOCK_PROBE = """
import ctypes, fcntl, json, os, sys
f = open(sys.executable, "rb")  # a file every sandbox shares (read-only, same inode)
out = {}
for name, call in [("flock", lambda: fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)),
                   ("lockf", lambda: fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)),
                   ("notify", lambda: fcntl.fcntl(f, 1026, 0)),  # F_NOTIFY
                   ("getfd", lambda: fcntl.fcntl(f, fcntl.F_GETFD))]:
    try:
        call()
        out[name] = "ok"
    except OSError as exc:
        out[name] = exc.errno
libc = ctypes.CDLL(None, use_errno=True)
out["inotify"] = "ok" if libc.inotify_init1(0) >= 0 else ctypes.get_errno()
try:
    os.statvfs(".")
    out["statvfs"] = "ok"
except OSError as exc:
    out["statvfs"] = exc.errno
print(json.dumps(out))
"""


def _probe_in_sandbox(folder, code, *args):
    """Run `code` (which prints one JSON object) in a sandbox on `folder`; its object."""
    box = sandbox.wrap([sys.executable, "-I", "-c", code, *args], folder)
    try:
        proc = subprocess.run(box.command, cwd=folder, env=box.env, pass_fds=box.pass_fds,
                              capture_output=True, text=True, timeout=60)
    finally:
        box.close()
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sandboxes_cannot_signal_each_other_through_shared_files(sandboxed, tmp_path):
    """Red teams passed the role between champion and challenger with a lock on a file both
    can read, and with the disk's free blocks (statvfs): locks, leases, directory and inotify
    notifications and statfs are refused (EPERM) in the sandbox; other fcntl calls work."""
    got = _probe_in_sandbox(tmp_path, LOCK_PROBE)
    assert got == {"flock": errno.EPERM, "lockf": errno.EPERM, "notify": errno.EPERM, "getfd": "ok",
                   "inotify": errno.EPERM, "statvfs": errno.EPERM}, got
    # outside the sandbox the same calls work: it is the filter that refuses them
    plain = subprocess.run([sys.executable, "-I", "-c", LOCK_PROBE], capture_output=True, text=True, timeout=60)
    plain = json.loads(plain.stdout)
    assert (plain["flock"], plain["statvfs"]) == ("ok", "ok"), plain


CACHE_PROBE = """
import json, mmap, os, sys
f = open(sys.executable, "rb")  # a file every sandbox shares (read-only, same inode)
fd, out = f.fileno(), {}
region = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
for name, call in [("fadvise", lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)),
                   ("nowait", lambda: os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)),
                   ("pread", lambda: os.pread(fd, 4096, 0)),
                   ("pageout", lambda: region.madvise(21)),  # MADV_PAGEOUT
                   ("cold", lambda: region.madvise(20)),  # MADV_COLD
                   ("dontneed", lambda: region.madvise(mmap.MADV_DONTNEED)),
                   ("willneed", lambda: region.madvise(mmap.MADV_WILLNEED)),
                   ("loadavg", lambda: out.update(loadavg_text=open("/proc/loadavg").read()
                                                  + open("/proc/meminfo").read() + open("/proc/stat").read()
                                                  + open("/proc/vmstat").read())),
                   ("threads", lambda: out.update(threads=os.getloadavg()))]:
    try:
        call()
        out[name] = "ok"
    except OSError as exc:
        out[name] = exc.errno
print(json.dumps(out))
"""


def test_sandboxes_cannot_probe_or_evict_each_others_page_cache(sandboxed, tmp_path):
    """A red team passed a signal through the page cache: one worker evicted pages of a shared
    file (posix_fadvise DONTNEED), the other timed reads of them. Eviction (fadvise, madvise
    MADV_COLD / MADV_PAGEOUT) and cache-residency probes (preadv2 RWF_NOWAIT) are refused in the
    sandbox; plain reads and other madvise advice work. The machine's counters are hidden too
    (another red team signalled with the host's thread count): /proc/loadavg, meminfo, stat
    and vmstat read empty, and sysinfo (os.getloadavg) is refused."""
    got = _probe_in_sandbox(tmp_path, CACHE_PROBE)
    assert got == {"fadvise": errno.EPERM, "nowait": errno.EPERM, "pread": "ok", "pageout": errno.EPERM,
                   "cold": errno.EPERM, "dontneed": "ok", "willneed": "ok", "loadavg": "ok",
                   "loadavg_text": "", "threads": None}, got  # getloadavg: "unobtainable" (sysinfo refused)
    # outside the sandbox the same calls work: it is the filter that refuses them
    plain = json.loads(subprocess.run([sys.executable, "-I", "-c", CACHE_PROBE], capture_output=True,
                                      text=True, timeout=60).stdout)
    assert (plain["fadvise"], plain["pageout"], plain["loadavg_text"] != "") == ("ok", "ok", True), plain


SYSCALL_PROBE = """
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for name, number in json.loads(sys.argv[1]).items():  # null arguments: harmless if a call ran
    ctypes.set_errno(0)
    out[name] = ctypes.get_errno() if libc.syscall(number, 0, 0, 0, 0, 0, 0) == -1 else "ok"
print(json.dumps(out))
"""


def test_every_refused_call_is_refused_in_the_sandbox(sandboxed, tmp_path):
    """Each system call in the refused list (io_uring, the key ring, readahead, cachestat...)
    fails with EPERM before the kernel looks at its arguments."""
    numbers = seccomp._DENIED[seccomp._ARCH_ALIAS.get(os.uname().machine, os.uname().machine)]
    assert _probe_in_sandbox(tmp_path, SYSCALL_PROBE, json.dumps(numbers)) == {name: errno.EPERM for name in numbers}


def run_bpf(program, arch, nr, args=()):
    """What the classic-BPF seccomp `program` returns for one call (a tiny interpreter: the
    program uses only absolute word loads, jeq, jge and ret)."""
    import struct

    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    steps = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    i = acc = 0
    while True:
        code, jt, jf, k = steps[i]
        if code == 0x06:
            return k
        if code == 0x20:
            acc, i = struct.unpack_from("<I", data, k)[0], i + 1
        else:
            assert code in (0x15, 0x35, 0x45), code  # jeq, jge, jset
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            i += 1 + (jt if taken else jf)


def test_seccomp_program_knows_its_architectures():
    import struct

    allow, eperm, enosys = 0x7FFF0000, 0x00050001, 0x00050026
    for machine in ("x86_64", "aarch64", "arm64", "amd64"):
        program = seccomp.seccomp_program(machine)
        steps = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
        assert steps[0] == (0x20, 0, 0, 4)  # loads the architecture first
        assert steps[-2] == (0x06, 0, 0, allow) and steps[-1] == (0x06, 0, 0, eperm)
        assert steps[-3] == (0x06, 0, 0, enosys)
        for i, (code, jt, jf, _) in enumerate(steps):
            if code & 0x07 == 0x05:  # a jump lands inside the program
                assert i + 1 + max(jt, jf) < len(steps)
    assert seccomp.seccomp_program("riscv64") is None
    # what each architecture's program decides (aarch64's cannot be run here: it is interpreted)
    read, madvise, fcntl = {"x86_64": 0, "aarch64": 63}, seccomp._MADVISE, seccomp._FCNTL
    for machine, arch in seccomp._AUDIT_ARCH.items():
        program = seccomp.seccomp_program(machine)
        assert all(run_bpf(program, arch, nr) == eperm for nr in seccomp._DENIED[machine].values())
        assert run_bpf(program, arch, read[machine]) == allow
        assert run_bpf(program, arch ^ 0x80000000, read[machine]) == eperm  # another ABI
        for advice, verdict in [(20, eperm), (21, eperm), (21 + (1 << 32), eperm), (3, allow), (4, allow)]:
            assert run_bpf(program, arch, madvise[machine], (0, 4096, advice)) == verdict, advice
        for cmd, verdict in [(1, allow), (2, allow), (6, eperm), (1026, eperm)]:
            assert run_bpf(program, arch, fcntl[machine], (0, cmd)) == verdict, cmd
        clone, unshare = seccomp._CLONE_LIKE[machine]
        for nr in (clone, unshare):  # CLONE_NEWUSER refused, threads and other namespaces' flags pass
            assert run_bpf(program, arch, nr, (0x10000000 | 0x00010000,)) == eperm
            assert run_bpf(program, arch, nr, (0x003D0F00,)) == allow  # pthread_create's flags
        assert run_bpf(program, arch, seccomp._CLONE3) == enosys  # glibc falls back to clone
        assert run_bpf(program, arch, seccomp._OPEN_BY_HANDLE[machine]) == eperm
    assert run_bpf(seccomp.seccomp_program("x86_64"), 0xC000003E, 0x40000000) == eperm  # x32


@pytest.mark.parametrize("link_hidden", [True, False])
def test_an_exposed_folder_is_reachable_through_its_symlink(sandboxed, tmp_path, link_hidden):
    """A .venv symlinked into the repository is named by the symlink's path (sys.executable).
    In a hidden folder it is bound there as well as at its real place; where the symlink
    stays in sight it is left as it is (bwrap cannot mount on a symlink: the worker did
    not start when a clone's .venv linked to another clone's)."""
    real, link = tmp_path / "real-venv", tmp_path / "repo" / ".venv"
    real.mkdir()
    (real / "marker.txt").write_text("here")
    link.parent.mkdir()
    link.symlink_to(real)
    folder = tmp_path / "w"
    folder.mkdir()
    code = f"print(open({str(link / 'marker.txt')!r}).read(), open({str(real / 'marker.txt')!r}).read())"
    hide = [tmp_path / "repo"] if link_hidden else []
    box = sandbox.wrap([sys.executable, "-I", "-c", code], folder, hide=hide, expose=[link])
    try:
        proc = subprocess.run(box.command, cwd=folder, env=box.env, pass_fds=box.pass_fds,
                              capture_output=True, text=True, timeout=60)
    finally:
        box.close()
    assert proc.stdout.split() == ["here", "here"], proc.stderr


ALLOWANCE_PROBE = """
import ctypes, os, resource, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN})  # before any library starts a thread
sys.path.insert(0, sys.argv[3])
from harness.child import _cap_shared_counts
if sys.argv[2] == "capped":
    _cap_shared_counts()
else:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
libc = ctypes.CDLL(None, use_errno=True)
class Value(ctypes.Union):
    _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]
if sys.argv[1] == "probe":
    time.sleep(2)
queued, pipes = 0, []
while queued < 200000 and libc.sigqueue(os.getpid(), int(signal.SIGRTMIN), Value(1)) == 0:
    queued += 1
if sys.argv[1] == "hold":  # the user's pipe pages: 1024 pipes of 16 pages use up the usual 16384
    while len(pipes) < 1500:
        pipes.append(os.pipe())
reader, writer = os.pipe()  # what a new pipe holds now
os.set_blocking(writer, False)
capacity = 0
try:
    while True:
        capacity += os.write(writer, bytes(4096))
except BlockingIOError:
    pass
print(queued, capacity, flush=True)
if sys.argv[1] == "hold":
    time.sleep(4)
"""


def _allowances(tmp_path, mode, *, own_users=True):
    """Run a holder and, 2 s later, a prober of ALLOWANCE_PROBE in two sandboxes at once:
    [(signals queued, bytes a new pipe holds)] for each. own_users=False: both as the
    harness's user (bwrap's user namespace), as without root."""
    procs = []
    for role in ("hold", "probe"):
        folder = tmp_path / f"{mode}-{own_users}-{role}"
        folder.mkdir()
        command = [sys.executable, "-I", "-c", ALLOWANCE_PROBE, role, mode, str(HARNESS_HOME)]
        box = (sandbox.wrap(command, folder) if own_users else
               sandbox.Sandbox("bwrap", sandbox.bwrap_command(command, str(folder)),
                               sandbox.private_env(str(folder), os.environ)))
        procs.append(subprocess.Popen(box.command, env=box.env, pass_fds=box.pass_fds, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        box.close()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [tuple(int(x) for x in out.split()) for out, _ in outs]


def test_one_sandbox_cannot_exhaust_a_per_user_allowance_for_the_other(sandboxed, tmp_path):
    """Red teams passed the role through per-user kernel allowances that both sandboxes
    shared: one queued signals until the user's allowance ran out, or held 1100 pipes, and
    the other saw sigqueue fail or its new pipes shrink. As root each sandbox runs as a host
    user of its own: the holder takes no share of the prober's. (Shown open as one user.)
    The worker also caps its own counts (child.SHARED_COUNT_LIMITS), for a harness that
    cannot switch users: capped, both get exactly their share."""
    cap = child.SHARED_COUNT_LIMITS["RLIMIT_SIGPENDING"]
    (held, _), (probed, _) = _allowances(tmp_path, "capped")
    assert held == probed == cap
    if not sandbox._switching_users():
        pytest.skip("separate users need root: per-user allowances stay shared (README threat model)")
    import resource

    (held, _), (probed, capacity) = _allowances(tmp_path, "uncapped")
    assert probed == held > 10 * cap and capacity == 65536, (held, probed, capacity)
    users = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        users.append(sandbox.wrap(["true"], tmp_path / name).user)
    assert users[0] != users[1] and min(users) >= sandbox.USER_RANGE[0]
    (held, _), (probed, capacity) = _allowances(tmp_path, "uncapped", own_users=False)
    if resource.getrlimit(resource.RLIMIT_SIGPENDING)[0] < 200000:  # one user: the channels these close
        assert probed < held / 2 and capacity < 65536, (held, probed, capacity)
