"""Run pipeline code in an OS sandbox, and find, stop and kill every process it starts.

Pipeline code (inference.py, and the code a model writes for a task) may try to reach
the referee: write the ledger or the caches, signal the other worker, leave a daemon
behind. `wrap` turns a command into one that runs sandboxed:

* Linux: bubblewrap. A read-only view of the whole file system, one private writable
  folder, a fresh /dev and /proc, its own PID namespace (it sees and can signal only its
  own processes), no network, no System V IPC, no capabilities (but reading), no new user
  namespaces, and it dies with the harness. The harness's reference cache is hidden. When
  the harness runs as root, each sandbox runs as a host user of its own (see _own_user).
* macOS: sandbox-exec with a generated profile (writes only in the private folder, no
  network, no signals to other processes, no fork, the reference cache unreadable).
* Anywhere else, where the sandbox cannot start, or with MLX_HILLCLIMB_SANDBOX=none: the
  plain command, kind "none" and the reason; the caller must say so.

The second half finds a sandboxed (or plain) worker's processes in the process table,
so the harness can stop them while the other worker is timed and kill them all at the
end of a run. Standard library only: nothing of the harness is imported here.
"""

import ctypes
import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.seccomp import seccomp_fd, seccomp_program

ENV_VAR = "MLX_HILLCLIMB_SANDBOX"  # "none": run unsandboxed (the run reports `sandbox: none`)

# Every bwrap run: the whole file system read-only, a fresh /dev (the host's /dev/shm is not
# shared) and a /proc for the new PID namespace.
#   --cap-drop ALL: as root, bwrap keeps every capability by default, and a root pipeline
#       could then `mount -o remount,rw /` and write anywhere (measured: it can).
#   --new-session: no TIOCSTI into a terminal. It only moves the sandboxed processes into a
#       new session; the harness stops and kills them by PID namespace and parentage, never
#       by process group, so it costs nothing there.
#   --die-with-parent: the sandbox is SIGKILLed when the harness (the thread that started
#       it; the harness is single-threaded) dies, and killing the outer bwrap kills it too.
#   The machine's counters are hidden: whole-machine load, task, memory, paging, interrupt,
#       file and pty counts show what the other worker does (red teams signalled with the
#       thread count and the aio context count). /proc files read empty (/dev/null;
#       --dev-bind, as a plain bind is nodev and cannot open it), /proc/sys, /proc/pressure and
#       /sys are empty (tmpfs; /sys keeps only the CPU lists os.cpu_count reads), and /dev/ptmx
#       opens /dev/null (the pty count is global).
_PROC_COUNTERS = ("loadavg", "stat", "meminfo", "vmstat", "zoneinfo", "buddyinfo", "pagetypeinfo", "slabinfo",
                  "vmallocinfo", "key-users", "keys", "uptime", "interrupts", "softirqs", "diskstats",
                  "timer_list", "kallsyms", "schedstat", "sched_debug", "swaps", "locks")
_EMPTY_FOLDERS = ("/proc/sys", "/proc/pressure", "/proc/irq", "/proc/driver", "/sys")
_SYS_KEPT = ("/sys/devices/system/cpu/online", "/sys/devices/system/cpu/possible", "/sys/devices/system/cpu/present")


def _machine_counters_hidden():
    """bwrap arguments that hide this machine's counters (those that exist here)."""
    args = []
    for name in _PROC_COUNTERS:
        if os.path.exists(f"/proc/{name}"):
            args += ["--dev-bind", "/dev/null", f"/proc/{name}"]
    for folder in _EMPTY_FOLDERS:
        if os.path.isdir(folder):
            args += ["--tmpfs", folder]
    for path in _SYS_KEPT:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args + ["--dev-bind", "/dev/null", "/dev/ptmx"]


_BWRAP_BASE = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               *_machine_counters_hidden(),
               "--unshare-pid", "--unshare-net", "--unshare-ipc", "--die-with-parent",
               "--new-session", "--cap-drop", "ALL"]
# No nested user (hence PID) namespaces, where bwrap supports it (0.8.0 and later).
_BWRAP_NO_USERNS = ["--unshare-user", "--disable-userns"]

# A host user of its own for each sandbox. Per-user kernel allowances (pending signals,
# pipe-buffer pages, epoll watches, message queues, key quotas, process counts) are shared
# by every process of one user: red teams passed the role between the two workers through
# three of them (one worker used up an allowance, the other saw its own calls fail or shrink).
# When the harness runs as root, each sandbox's processes run as a user drawn at random from
# a range no account uses, so they share no allowance, own no file outside their folder and
# cannot signal anything but themselves. bwrap starts as root without a user namespace (a
# namespace of bwrap's maps one user only) and keeps just what setpriv needs to switch users;
# setpriv then drops everything but reading: the interpreter, its packages or the model may
# lie under a folder only root may enter (/root/.pyenv, /root/.cache); mounts decide what is
# hidden, and the seccomp filter refuses open_by_handle_at (which reads past them) and new
# user namespaces (--disable-userns needs bwrap's own namespace).
USER_RANGE = (0x4000_0000, 0x7FFF_0000)
_BWRAP_SWITCH_USER = ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
                      "--cap-add", "CAP_DAC_READ_SEARCH"]


@dataclass(frozen=True)
class Sandbox:
    """A command ready for subprocess.Popen, and how it is confined.

    kind: "bwrap", "sandbox-exec" or "none"; command: the argv to run; env: the
    environment to run it with; why: for "none", the reason no sandbox runs;
    pass_fds: descriptors the command reads at start (Popen(pass_fds=...)); the caller
    closes them once the process has started (close()); user: the host user id its
    processes run as, when it is one of their own (None: the harness's user).
    """
    kind: str
    command: list
    env: dict = field(default_factory=dict)
    why: str = ""
    pass_fds: tuple = ()
    user: int = None

    def close(self):
        """Close pass_fds in this process (the started process has its own copies)."""
        for fd in self.pass_fds:
            os.close(fd)


def setting():
    """MLX_HILLCLIMB_SANDBOX: "auto" (unset) or "none"; anything else raises ValueError (one line)."""
    value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if value not in ("auto", "none"):
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not understood: unset it, or set it to 'none' "
                         f"to run pipeline code without a sandbox")
    return value


def wrap(command, folder, *, hide=(), expose=(), env=None):
    """The sandboxed form of `command`, with `folder` as its one writable folder.

    Args:
        command: the argv to confine (run it with cwd=folder).
        folder: the private folder; TMPDIR and XDG_CACHE_HOME point into it.
        hide: folders the sandboxed code must not read (those that do not exist are skipped).
        expose: folders inside hidden ones that it must still read (read-only).
        env: the base environment (default os.environ).
    Raises ValueError for a bad MLX_HILLCLIMB_SANDBOX (see setting()).
    """
    folder = str(Path(folder).resolve())
    env = private_env(folder, os.environ if env is None else env)
    hide = [str(Path(p).resolve()) for p in hide if Path(p).is_dir()]
    # an exposed folder reached through a symlink (a .venv linked into the repository) is
    # bound at its real place, and at the linked one where that lies in a hidden folder (the
    # command may name it; elsewhere the symlink itself stays in sight, and bwrap cannot
    # mount on a symlink)
    expose = sorted({str(q) for p in expose if p and Path(p).exists()
                     for q in (Path(p).resolve(), Path(os.path.abspath(p)))
                     if q == Path(p).resolve() or any(q.is_relative_to(h) for h in hide)})
    if setting() == "none":
        return Sandbox("none", list(command), env, f"{ENV_VAR}=none is set")
    if sys.platform.startswith("linux"):
        prefix, why = _bwrap_prefix()
        if prefix is None:
            return Sandbox("none", list(command), env, why)
        user = None
        if "CAP_SETUID" in prefix:
            user = _own_user()
            os.chown(folder, user, user)
            os.chmod(folder, 0o700)
            command = as_user(command, user)
        fd = seccomp_fd()
        seccomp = ["--seccomp", str(fd)] if fd is not None else []
        return Sandbox("bwrap", bwrap_command(command, folder, hide, [*prefix, *seccomp], expose), env,
                       pass_fds=(fd,) if fd is not None else (), user=user)
    if sys.platform == "darwin":
        program, why = _sandbox_exec()
        if program is None:
            return Sandbox("none", list(command), env, why)
        return Sandbox("sandbox-exec", [program, "-p", sbpl_profile(folder, hide, expose), *command], env)
    return Sandbox("none", list(command), env, f"no sandbox is known for {sys.platform}")


def private_env(folder, env):
    """`env` with temporary files and caches sent into the private folder (the rest is read-only;
    MLX's CPU backend writes its compiled kernels under TMPDIR)."""
    return {**env, "TMPDIR": folder, "TMP": folder, "TEMP": folder,
            "XDG_CACHE_HOME": os.path.join(folder, ".cache")}


def bwrap_command(command, folder, hide=(), prefix=None, expose=()):
    """The bubblewrap argv: `prefix` (bwrap and its flags; default: the full set), each of
    `hide` under an empty tmpfs (made read-only at the end), each of `expose` bound back
    read-only, `folder` writable, then `command`. (Later mounts go on top of earlier ones:
    hide first, then re-expose.)"""
    argv = list(prefix or ["bwrap", *_BWRAP_BASE, *_BWRAP_NO_USERNS])

    def inside(path, others):
        return any(path != other and Path(path).is_relative_to(other) for other in others)

    # A hidden folder inside another hidden one is hidden already, unless an exposed folder
    # brought it back: then it is hidden again on top of that.
    outer = [path for path in hide if not inside(path, hide)]
    inner = [path for path in hide if inside(path, hide) and inside(path, expose)]
    for path in outer:
        argv += ["--tmpfs", path]  # an empty, private folder in its place
    for path in expose:
        argv += ["--ro-bind", str(Path(path).resolve()), path]
    for path in inner:
        argv += ["--tmpfs", path]
    argv += ["--bind", folder, folder]
    for path in outer + inner:
        # then read-only: the folder stays its one writable place (the mounts made inside a
        # hidden tmpfs above are mounts of their own and keep their modes)
        argv += ["--remount-ro", path]
    return [*argv, "--chdir", folder, "--", *command]


def _own_user():
    """A host user id no account or process uses, drawn at random from USER_RANGE."""
    taken = _known_users()
    while True:
        user = USER_RANGE[0] + secrets.randbelow(USER_RANGE[1] - USER_RANGE[0])
        if user not in taken:
            return user


def _known_users():
    """The user ids of /etc/passwd's accounts and of every process now running."""
    taken = set()
    try:
        with open("/etc/passwd") as f:
            taken |= {int(line.split(":")[2]) for line in f if line.count(":") >= 3 and line.split(":")[2].isdigit()}
    except OSError:
        pass
    for name in os.listdir("/proc"):
        try:
            taken.add(os.stat(f"/proc/{name}").st_uid if name.isdigit() else 0)
        except OSError:
            pass
    return taken


def as_user(command, user):
    """`command` run through setpriv as host user and group `user`, with no other groups and
    no capability but reading any file (CAP_DAC_READ_SEARCH, see _BWRAP_SWITCH_USER)."""
    keep = "-all,+dac_read_search"
    return [shutil.which("setpriv") or "setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
            f"--inh-caps={keep}", f"--ambient-caps={keep}", f"--bounding-set={keep}", "--", *command]


def _switching_users():
    """True when each sandbox can run as a user of its own: root, on Linux, with setpriv, and a
    seccomp filter for this architecture (it refuses the new user namespaces)."""
    return (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv") is not None
            and seccomp_program() is not None)


@functools.lru_cache(maxsize=None)
def _bwrap_prefix():
    """([bwrap, flags...], "") for the fullest flag set that starts here, else (None, why). Tried once.
    As root with setpriv: a user of its own (_BWRAP_SWITCH_USER), else no new user namespaces."""
    program = shutil.which("bwrap")
    if program is None:
        return None, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    problem = ""
    candidates = [_BWRAP_BASE + _BWRAP_NO_USERNS, _BWRAP_BASE]  # older bwrap: no --disable-userns
    if _switching_users():
        candidates.insert(0, _BWRAP_BASE + _BWRAP_SWITCH_USER)
    for flags in candidates:
        with tempfile.TemporaryDirectory(prefix="sandbox-check-") as folder:
            check = [sys.executable, "-I", "-S", "-c", ""]
            if "CAP_SETUID" in flags:  # it runs as that user, and can write its folder
                user = _own_user()
                os.chown(folder, user, user)
                check = as_user([sys.executable, "-I", "-S", "-c", "import os; assert os.getuid(); open('x', 'w')"],
                                user)
            argv = bwrap_command(check, folder, (), [program, *flags])
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=folder)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"bubblewrap cannot start here: {exc}"
        if proc.returncode == 0:
            return [program, *flags], ""
        problem = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return None, f"bubblewrap cannot start here: {problem}"


@functools.lru_cache(maxsize=None)
def _sandbox_exec():
    """(path of sandbox-exec, "") when it runs a trivial profile here, else (None, why). Tried once."""
    program = shutil.which("sandbox-exec", path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin")
    if program is None:
        return None, "sandbox-exec is not available"
    try:
        proc = subprocess.run([program, "-p", "(version 1)(allow default)", "/usr/bin/true"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"sandbox-exec cannot start: {exc}"
    if proc.returncode != 0:
        return None, f"sandbox-exec cannot start: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return program, ""


def _sbpl_string(path):
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbpl_profile(folder, hide=(), expose=()):
    """The sandbox-exec (SBPL) profile: everything allowed but what could reach the referee.

    Written as "allow default, then deny" because a deny-default profile must list every
    Mach service and file Metal needs, and breaks with each macOS release. Not verified here
    (it cannot run on Linux): that MLX on Metal loads and runs under it, that the
    Metal shader cache (allowed below) is the only other place it writes, that writes to the
    already open log file and pipes stay allowed, and that nothing in mlx-lm or the tokenizers forks (process-fork is denied, so no daemon can escape: macOS has
    no PID namespace and no child subreaper).
    """
    writable = [f"(subpath {_sbpl_string(Path(folder).resolve())})",
                '(literal "/dev/null")', '(literal "/dev/zero")', '(literal "/dev/dtracehelper")',
                '(regex #"^/dev/fd/")', '(regex #"^/dev/tty")']
    metal_cache = _darwin_user_cache_dir()
    if metal_cache:
        # SBPL matches resolved paths: /var/folders/.. is /private/var/folders/..
        metal_cache = os.path.realpath(os.path.join(metal_cache, "com.apple.metal"))
        writable.append(f"(subpath {_sbpl_string(metal_cache)})")
    lines = ["(version 1)",
             "(allow default)",
             "(deny network*)",
             "(deny file-write*)",
             f"(allow file-write* {' '.join(writable)})",
             "(deny signal (target others))",
             "(deny process-fork)"]
    lines += [f"(deny file-read* (subpath {_sbpl_string(path)}))" for path in hide]
    # later rules win in SBPL: what must stay readable inside a hidden folder comes after
    lines += [f"(allow file-read* (subpath {_sbpl_string(path)}))" for path in expose]
    lines += [f"(allow file-read* (subpath {_sbpl_string(folder)}))"] if hide else []
    return "\n".join(lines) + "\n"


def _darwin_user_cache_dir():
    """macOS's per-user cache folder (/var/folders/../C), where Metal keeps its shader cache."""
    try:
        return os.confstr("CS_DARWIN_USER_CACHE_DIR")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------
# Process control: find, stop and kill every process a worker started
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    """One row of the process table. ns: its PID namespace ("pid:[inode]"), None if unknown."""
    pid: int
    ppid: int
    pgid: int
    state: str
    ns: str = None


def process_table():
    """{pid: Proc} for every process this process can see (Linux: /proc; elsewhere: ps)."""
    if not os.path.isdir("/proc/self"):
        return _ps_table()
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read_proc(f"/proc/{name}/stat")
        if not stat or ")" not in stat:
            continue  # gone meanwhile
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        state = _live_thread_state(name) if fields[0] == "Z" else fields[0]
        table[int(name)] = Proc(int(name), int(fields[1]), int(fields[2]), state, pid_namespace(name))
    return table


def _read_proc(path):
    """A small /proc file's text, None if it cannot be read. (os.read costs about half of
    open().read(), which counts: the table is read three times between two timed calls.)"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _live_thread_state(pid):
    """A zombie's state, unless only its main thread has exited (pthread_exit) and others run
    on: then the state of one of those, so that it is still stopped and killed."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            stat = _read_proc(f"/proc/{pid}/task/{tid}/stat") or ""
            state = stat[stat.rfind(")") + 2:].split()[0] if ")" in stat else "X"
            if state not in "ZX":
                return state
    except (OSError, IndexError):
        pass
    return "Z"


def _ps_table():
    proc = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,state="], capture_output=True, text=True)
    table = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            table[int(parts[0])] = Proc(int(parts[0]), int(parts[1]), int(parts[2]), parts[3][0])
    return table


def pid_namespace(pid):
    """The PID namespace of `pid` ("pid:[inode]"), None when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def inner_namespace(root, table):
    """The PID namespace a child of `root` lives in when it differs from root's (bwrap's), else None."""
    outer = table[root].ns if root in table else None
    for p in table.values():
        if p.ppid == root and p.ns and p.ns != outer:
            return p.ns
    return None


def members(table, *, root=None, pgid=None, ns=None):
    """The live processes in `table` that belong together: `root` and its descendants, the
    process group `pgid`, and the PID namespace `ns` (each optional). Zombies are left out."""
    children = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = set(), [root] if root is not None else []
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    found |= {p.pid for p in table.values()
              if (pgid is not None and p.pgid == pgid) or (ns is not None and p.ns == ns)}
    return {pid for pid in found if table[pid].state not in "ZX"}


def strays(table, keep):
    """Children of this process that are not in `keep`: orphans re-parented to it (it is a
    child subreaper), i.e. daemons that left their worker's tree."""
    me = os.getpid()
    return {p.pid for p in table.values() if p.ppid == me and p.pid not in keep and p.state not in "ZX"}


def send(pids, sig):
    """Send `sig` to each pid; the ones already gone are skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_all(find, *, limit_s=2.0):
    """SIGSTOP every process `find(table)` names until they are seen stopped, and seen not to
    have run at all since the look before (so two processes that take turns, one resuming
    the other and stopping itself, are caught). True when all stopped within `limit_s`."""
    deadline = time.monotonic() + limit_s
    settled, looks = None, 0  # {pid: CPU time} at the last look that found every process stopped
    while True:
        table = process_table()
        pids = find(table)
        running = {pid for pid in pids if table[pid].state not in "Tt"}
        if running:
            settled, looks = None, 0
            send(running, signal.SIGSTOP)
        else:
            now = {pid: cpu_time_ns(pid) for pid in pids}
            looks = looks + 1 if now == settled else 0
            # three looks alike, a few ms apart: a process forking fast enough to slip
            # between two scans rarely slips between three (a cgroup freezer would be exact)
            if looks >= 2:
                return True
            settled = now
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def cpu_time_ns(pid):
    """The CPU time all threads of `pid` have run (ns, /proc/PID/task/*/schedstat); None where
    /proc cannot tell (then stop_all trusts the stopped state alone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        text = _read_proc(f"/proc/{pid}/task/{tid}/schedstat")
        if not text:
            return None
        total += int(text.split()[0])
    return total


def kill_all(find, *, waited=(), limit_s=5.0):
    """SIGKILL every process `find(table)` names until none is left; True when all are gone.
    Those that became zombie children of this process are reaped here (nobody else waits
    for them), but for the pids in `waited`, whose owners reap them."""
    deadline = time.monotonic() + limit_s
    killed = set()
    while True:
        table = process_table()
        alive = find(table)
        _reap_orphans(killed - set(waited), table)
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        send(alive, signal.SIGKILL)
        killed |= alive
        time.sleep(0.005)


def _reap_orphans(pids, table):
    """waitpid the killed processes that are now zombie children of this process."""
    for pid in pids:
        p = table.get(pid)
        if p is not None and p.ppid == os.getpid() and p.state == "Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


@functools.lru_cache(maxsize=None)
def become_subreaper():
    """Make this process a child subreaper (Linux), so that a worker's orphans (a double-forked
    daemon) are re-parented to it, where strays() finds them. True when it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        return False
