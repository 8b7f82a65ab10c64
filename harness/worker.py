"""The parent's handle on a worker process (harness/child.py runs inside it).

The parent starts the worker in its sandbox with two private pipes: requests go
down one, replies come back on the other (framing in harness.pipe: JSON messages,
one per token during generation, plus raw float32 blocks for scores). The
worker's stdout and stderr go to a log file, so nothing the pipeline prints can
corrupt the protocol, and the last lines of that log explain a crash. No file the
worker writes can grow past LOG_LIMIT_BYTES (RLIMIT_FSIZE), and the harness reads
only the tail of a log (read_log_tail), so its output cannot fill the disk or the
harness's memory. The parent owns every clock. The child runs in an OS sandbox
(harness.sandbox), and the parent stops it while another worker is timed and kills
everything it started at the end.
"""

import contextlib
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# WorkerCrash and WorkerInvalid are defined with the framing that raises them;
# callers may keep importing them from here.
from harness import memory, sandbox
from harness.child import row_digest
from harness.code_size import without_comments_and_docstrings
from harness.models import cache_dir
from harness.pipe import (Channel, PipeTimeout, WorkerCrash, WorkerInvalid, decode_block,
                          decode_reply, keep_recent)
from harness.settings import HARNESS_HOME

# The child runs in isolated mode (no script folder, user site or PYTHON* variables on
# its path) and imports the harness from its home, never from the repository.
LAUNCHER = "import sys; sys.path.append(sys.argv.pop(1)); from harness.child import main; main()"

# The largest file a worker process may write (RLIMIT_FSIZE, inherited by everything it
# starts): its log above all, which a pipeline printing without end would otherwise grow
# until the disk is full. Past it a write fails with EFBIG (Python ignores SIGXFSZ; a
# process that does not is killed by it), and the harness reports a CRASH. 64 MiB is far
# more than any honest log; a pipeline cannot write bigger files in its folder either.
LOG_LIMIT_BYTES = 64 << 20
LOG_TAIL_BYTES = 20000  # how much of a log the harness reads back (read_log_tail)
EXIT_GRACE_S = 1.0      # how long a worker whose pipe closed may take to exit before it is killed


def read_log_tail(path, limit=LOG_TAIL_BYTES):
    """The last `limit` bytes of the file at `path`, decoded as UTF-8 (bad bytes replaced).

    Seeks from the end, so a huge log costs no more memory or time than a small one.
    Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit).decode("utf-8", errors="replace")


def worker_env():
    """The environment a worker starts with: the harness's, less what names the repository or
    the run's folders (MLX_HILLCLIMB_REPO, PWD, OLDPWD: paths a pipeline has no use for)."""
    hidden = {"MLX_HILLCLIMB_REPO", "MLX_HILLCLIMB_HARNESS_COMMIT", "PWD", "OLDPWD"}
    return {**{k: v for k, v in os.environ.items() if k not in hidden}, "PYTHONUNBUFFERED": "1"}


def _file_size_limit():
    """The preexec_fn that caps the size of every file the worker writes (LOG_LIMIT_BYTES).

    The limits are computed here, in the parent; after the fork the child only makes the
    one system call. The hard limit is set too, so the pipeline cannot raise it again (and
    inside bwrap it has no CAP_SYS_RESOURCE to try).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = LOG_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(LOG_LIMIT_BYTES, hard)

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------
class Worker:
    """A running worker process serving one inference.py.

    The child runs sandboxed (harness.sandbox) with the inference file's folder as its one
    writable folder; `sandbox` is the kind ("bwrap", "sandbox-exec" or "none", with the
    reason in `sandbox_why`) and is in `info` too. pause()/resume() stop and continue every
    process of the worker; kill() and close() leave none of them behind.

    Args:
        inference_path: the inference.py to import (the challenger's or the champion's copy).
            The worker loads a copy of it, alone in a new private folder (its one writable
            place, removed when the worker is killed), so no caller can hand the pipeline
            the repository or the harness as its folder.
        log_path: where the worker's stdout/stderr go.
    """

    # The pids of the workers running now: the other children of the harness are strays.
    _running = set()

    def __init__(self, inference_path, log_path, *, role=None, hide=(), expose=()):
        self.role = role or Path(log_path).stem  # for the parent's messages only: the child never sees it
        self._hide, self._expose = list(hide), list(expose)
        self._folder = Path(tempfile.mkdtemp(prefix="mlx-hillclimb-worker-"))
        self.inference_path = self._folder / Path(inference_path).name
        self.log_path, self._log = Path(log_path), None
        try:  # a full disk fails here too: the folder never outlives a worker that did not start
            # What runs is fixed by its syntax tree: no comment or docstring is there to read.
            source = Path(inference_path).read_text(errors="surrogateescape")
            self.inference_path.write_text(without_comments_and_docstrings(source), errors="surrogateescape")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
            req_w, resp_r = self._start()
        except BaseException:
            if self._log is not None:
                self._log.close()
            remove_folder(self._folder)
            raise
        Worker._running.add(self.proc.pid)
        self._channel = Channel(send_fd=req_w, recv_fd=resp_r)
        self._namespace = None  # the sandbox's PID namespace, once seen
        self._paused = False
        self._peak_rss = 0
        self.max_rss_bytes = None
        self.vocab_size = None  # when set, generated token ids must lie in [0, vocab_size)
        self.info = {"sandbox": self.sandbox, "sandbox_why": self.sandbox_why}
        self._limit_s = 0.0
        self._digests = {}  # keep id -> one digest per token, for timed_logprobs
        self._released = []  # keep ids the worker frees with the next request (release())

    def _start(self):
        """Start the child in its sandbox, cwd its own folder; returns the parent's pipe ends."""
        folder = self.inference_path.parent  # the worker's own folder: its one writable place
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        # Random descriptor numbers: the second worker's would otherwise be higher than the
        # first's, telling a pipeline whether it runs as the champion or the challenger.
        req_r, resp_w = _renumbered(req_r), _renumbered(resp_w)
        try:
            command = [sys.executable, "-I", "-B", "-c", LAUNCHER, str(HARNESS_HOME), str(req_r), str(resp_w),
                       str(self.inference_path)]
            # The reference's log-probs are hidden (a pipeline could replay them), and so are
            # the folders that would tell it its role; the harness package stays readable.
            # The system's temp folder too: other workers' folders are there (the other role's
            # inference.py, other runs' leftovers); this worker's own is bound back writable.
            box = sandbox.wrap(command, folder, hide=[cache_dir() / "reference", tempfile.gettempdir(),
                                                      *self._hide],
                               # the interpreter's environment (a venv inside the repository) too
                               expose=[HARNESS_HOME / "harness", sys.prefix, *self._expose],
                               env=worker_env())
            self.sandbox, self.sandbox_why = box.kind, box.why
            if box.kind == "none":
                sandbox.become_subreaper()  # so a double-forked daemon comes back to the harness
            try:
                self.proc = self._popen(box, folder, (req_r, resp_w))
            finally:
                box.close()
        except BaseException:
            os.close(req_w)
            os.close(resp_r)
            raise
        finally:
            os.close(req_r)
            os.close(resp_w)
        return req_w, resp_r

    def _popen(self, box, folder, fds):
        """Start the sandboxed command with its log as stdout and stderr and `fds` open."""
        return subprocess.Popen(
            box.command, cwd=str(folder), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, pass_fds=(*fds, *box.pass_fds), env=box.env,
            start_new_session=True,  # its own process group: Ctrl-C reaches the parent only
            # in the child before it execs (bwrap or the worker): inherited by all it starts
            preexec_fn=_file_size_limit())

    # -- messages (a failure kills the worker, so it cannot linger half-way through a call)
    def _send(self, message, deadline, what):
        """Send a request; a WorkerCrash if the worker has gone or leaves its pipe full past `deadline`."""
        try:
            self._channel.send(message, deadline)
        except PipeTimeout:
            raise self._crash(f"timeout: the worker took no {what} request for {self._limit_s:g} s") from None
        except OSError:  # includes BrokenPipeError
            raise self._crash("the worker exited before it took a request") from None

    def _recv_bytes(self, deadline, what):
        """Next frame, header and body read before `deadline`; a WorkerCrash if the worker
        dies or the deadline passes, a WorkerInvalid if the frame is oversized or garbage."""
        try:
            return self._channel.recv_bytes(deadline)
        except PipeTimeout:
            raise self._crash(f"timeout: {what} ran past {self._limit_s:g} s (timeouts in harness.yaml)") from None
        except WorkerInvalid as exc:
            self.kill()
            raise WorkerInvalid(f"{what}: {exc}") from None
        except (EOFError, OSError):
            # its pipe closed: let it finish dying (bwrap passes on how its child died)
            # before kill() would write over that with SIGKILL
            until = time.perf_counter() + EXIT_GRACE_S
            while not self._reap(block=False) and time.perf_counter() < until:
                time.sleep(0.01)
            raise self._crash(f"the worker exited during {what}") from None

    def _recv(self, deadline, what):
        """Next reply as a dict; garbage, an error or an invalid reply kills the worker."""
        raw = self._recv_bytes(deadline, what)
        try:
            return decode_reply(raw, what)
        except (WorkerCrash, WorkerInvalid):
            self.kill()
            raise

    def _recv_block(self, deadline, shape, what):
        """The float32 block announced by a {"shape": shape} reply."""
        raw = self._recv_bytes(deadline, what)
        try:
            return decode_block(raw, shape, what)
        except WorkerInvalid:
            self.kill()
            raise

    def _crash(self, message):
        self.kill()
        code = self.proc.returncode
        if code is not None and self.sandbox == "bwrap" and 128 < code < 128 + signal.NSIG:
            code = 128 - code  # bwrap exits 128+N when its child dies of signal N
        if code is not None and code < 0:
            message += f" (killed by signal {_signal_name(-code)})"
        elif code:
            message += f" (exit status {code})"
        return WorkerCrash(message, self.log_tail())

    def log_tail(self, lines=20):
        """The last lines the worker printed (its stderr and stdout), from the log's last
        LOG_TAIL_BYTES bytes only (read_log_tail); "" when the log cannot be read."""
        try:
            text = read_log_tail(self.log_path)
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    # -- requests ----------------------------------------------------------
    def load(self, model_path, draft_model_path=None, overrides=None, *, timeout_s):
        """Import inference.py and load the model; returns what the worker learnt about it."""
        self._limit_s = timeout_s
        deadline = time.perf_counter() + timeout_s
        self._recv(deadline, "importing inference.py")
        self._send({"op": "load", "model": str(model_path),
                    "draft": str(draft_model_path) if draft_model_path else None,
                    "overrides": overrides or {}}, deadline, "load()")
        self.info = {**self._recv(deadline, "load()"), "sandbox": self.sandbox, "sandbox_why": self.sandbox_why}
        return self.info

    def generate(self, prompt, *, max_tokens, stop_at_eos, timeout_s, seed=None, keep=None):
        """Run one generate call and time it from this side of the pipe.

        Returns a dict: tokens, times (seconds after the request was sent, one per
        token), peak_memory_bytes (reported by the worker's MLX allocator).
        `seed` seeds MLX's random generator first, so sampling is repeatable.
        `keep` (a call id; speed calls only) has the worker keep the call's log-probs for
        timed_logprobs(), and this side the digests to check them by, until release(); the
        ids released since the last call go with this request. The worker checks every
        yielded pair either way.
        """
        with self._watching():
            return self._generate(prompt, max_tokens, stop_at_eos, timeout_s, seed, keep)

    def _generate(self, prompt, max_tokens, stop_at_eos, timeout_s, seed, keep):
        tokens, times, digests = [], [], []
        self._limit_s = timeout_s
        start = time.perf_counter()
        deadline = start + timeout_s
        self._released, released = [], self._released
        self._send({"op": "generate", "prompt": prompt, "max_tokens": max_tokens, "stop_at_eos": stop_at_eos,
                    "seed": seed, "keep": keep, "vocab": self.vocab_size, "drop": released},
                   deadline, "generate()")
        while True:
            message = self._recv(deadline, "generate()")
            now = time.perf_counter()
            if "t" in message:
                token = message["t"]
                if isinstance(token, bool) or not isinstance(token, int):
                    raise WorkerInvalid(f"generate() yielded a non-integer token: {token!r}")
                if self.vocab_size and not 0 <= token < self.vocab_size:
                    raise WorkerInvalid(f"generate() yielded token id {token}, outside the "
                                        f"vocabulary [0, {self.vocab_size})")
                if len(tokens) > max_tokens:  # frames written straight into the pipe: never hoard them
                    self.kill()
                    raise WorkerInvalid(f"generate() sent more than {max_tokens + 1} tokens into the pipe")
                tokens.append(token)
                times.append(now - start)
                digests.append(message.get("d"))
            else:
                if keep is not None:  # evicts what the worker evicts (the same keep_recent)
                    keep_recent(self._digests, keep, digests)
                return {"tokens": tokens, "times": times,
                        "peak_memory_bytes": message.get("peak_memory_bytes")}

    def score(self, tokens, *, timeout_s):
        """Yield float32 arrays (rows, vocab) of next-token log-probabilities, chunk by chunk."""
        with self._watching():
            yield from self._score(tokens, timeout_s)

    def _score(self, tokens, timeout_s):
        self._limit_s = timeout_s
        deadline = time.perf_counter() + timeout_s
        self._send({"op": "score", "tokens": tokens}, deadline, "score()")
        rows = 0
        while True:
            message = self._recv(deadline, "score()")
            if "done" in message:
                if rows != len(tokens):
                    raise WorkerInvalid(f"score() returned {rows} rows for {len(tokens)} tokens")
                return
            shape = tuple(message.get("shape") or ())
            if len(shape) != 2 or (self.vocab_size and shape[1] != self.vocab_size):
                self.kill()
                raise WorkerInvalid(f"score() yielded a chunk of shape {shape}, expected (rows, {self.vocab_size})")
            if rows + shape[0] > len(tokens):
                self.kill()
                raise WorkerInvalid(f"score() returned more than {len(tokens)} rows for {len(tokens)} tokens")
            block = self._recv_block(deadline, shape, "score()")
            rows += shape[0]
            yield block

    # -- process -----------------------------------------------------------
    def _reap(self, block):
        """Collect the exited worker with wait4, recording its peak resident memory.

        Returns True once the worker is gone. (Popen.wait would discard the rusage.)
        """
        if self.proc.returncode is not None:
            return True
        try:
            pid, status, usage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            self.proc.returncode = -1
            Worker._running.discard(self.proc.pid)
            return True
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        Worker._running.discard(self.proc.pid)
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        self.max_rss_bytes = max(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024), self._peak_rss)
        return True

    def alive(self):
        """True while the worker process runs."""
        return not self._reap(block=False)

    def close(self, grace_s=10.0):
        """Ask the worker to exit, wait a little, then make sure it and all it started have gone."""
        if self.alive():
            # bwrap may exit before its PID namespace is empty: know the namespace, to wait for it
            self._find_namespace()
            self._note_peak_rss()
            self.resume()  # a stopped worker cannot exit
            deadline = time.perf_counter() + grace_s
            try:
                self._channel.send({"op": "exit"}, deadline)
            except (OSError, PipeTimeout):
                pass
            while self.alive() and time.perf_counter() < deadline:
                time.sleep(0.01)
        self.kill()

    def kill(self):
        """Kill every process of the worker, reap it, close the pipes. Safe to call twice.

        Sandboxed, that is its PID namespace and whatever is below it; unsandboxed, its
        process group, its descendants and the strays (orphans re-parented to the harness).
        """
        self._find_namespace()
        if self.proc.returncode is None:
            self._note_peak_rss()
        sandbox.kill_all(self._members, waited=Worker._running)
        self._reap(block=True)
        self._paused = False
        self._channel.close()
        if not self._log.closed:
            self._log.close()
        remove_folder(self._folder)

    def pause(self):
        """Stop (SIGSTOP) every process of the worker, so it cannot use the CPU while another
        worker is timed. Returns once all of them are seen stopped."""
        if self.alive():
            self._find_namespace()
            self._paused = True
            if not sandbox.stop_all(self._members):
                invalid = WorkerInvalid("its processes could not all be stopped while the other worker "
                                        "was timed (they keep forking or waking each other)")
                invalid.worker = self.role
                self.kill()
                raise invalid

    def resume(self):
        """Continue (SIGCONT) what pause() stopped; strays stay stopped until they are killed."""
        if self._paused:
            self._paused = False
            sandbox.send(self._members(sandbox.process_table(), strays=False), signal.SIGCONT)

    def _note_peak_rss(self):
        """Read the worker's peak resident memory while it runs: through bwrap, the rusage
        that wait4 reports is the sandbox's outer process's, not the worker's."""
        self._peak_rss = max(self._peak_rss, memory.peak_rss(self._members(sandbox.process_table(), strays=False)))

    def _find_namespace(self):
        """Remember the sandbox's PID namespace while the sandbox is there to show it."""
        if self.sandbox == "bwrap" and self._namespace is None and self.proc.returncode is None:
            self._namespace = sandbox.inner_namespace(self.proc.pid, sandbox.process_table())

    def _members(self, table, strays=True):
        """The pids of this worker's processes in `table` (see kill())."""
        # Once reaped, the worker's pid may be someone else's; a group id is never reused while
        # the group has members, and a PID namespace lives as long as its processes.
        root = self.proc.pid if self.proc.returncode is None else None
        pgid = self.proc.pid if self.sandbox != "bwrap" else None  # bwrap's are in --new-session
        found = sandbox.members(table, root=root, pgid=pgid, ns=self._namespace)
        if strays and self.sandbox == "none":
            # Nothing escapes a PID namespace; without one, orphans come back to the harness
            # (a child subreaper). They cannot be told apart, so they are all stopped and killed.
            found |= sandbox.strays(table, Worker._running)
        return found

    @contextlib.contextmanager
    def _watching(self):
        """Sample the worker's resident memory on a thread while a call runs (memory.RssWatch)."""
        watch = memory.RssWatch(self._members(sandbox.process_table(), strays=False) if memory.HAS_PROC else ())
        watch.start()
        try:
            yield
        finally:
            watch.stop()
            self._peak_rss = max(self._peak_rss, watch.peak)

    def kept_calls(self):
        """Keep ids of calls whose log-probs the worker holds (not released or taken), oldest first."""
        return list(self._digests)

    def release(self, call_ids):
        """Let the worker free these calls' log-probs (it learns with the next generate request)."""
        for call in call_ids:
            if self._digests.pop(call, None) is not None:
                self._released.append(call)

    def timed_logprobs(self, call_ids, *, timeout_s):
        """{call_id: float32 array (n_tokens, vocab)}: the log-probs generate(..., keep=id) calls
        yielded, each row checked against the digest sent with its token; freed once sent.
        Raises ValueError, before sending, for an id not in kept_calls() or named twice (a
        harness bug, not the pipeline's doing)."""
        call_ids = list(call_ids)
        gone = [call for call in call_ids if call not in self._digests]
        if gone or len(set(call_ids)) != len(call_ids):
            raise ValueError(f"timed_logprobs: calls {gone or call_ids!r:.200} are not kept, or are named "
                             f"twice (a worker keeps the log-probs of calls not released, "
                             f"each taken once; kept now: {self.kept_calls()!r:.200})")
        self._limit_s = timeout_s
        deadline = time.perf_counter() + timeout_s
        self._send({"op": "logprobs", "calls": call_ids}, deadline, "logprobs")
        out = {}
        for call in call_ids:
            head = self._recv(deadline, "logprobs")
            rows = head.get("rows")
            # The call yielded one digest per token: exactly that many rows may come (a worker
            # announcing more would have the harness read without end).
            if head.get("call") != call or rows != len(self._digests[call]) or isinstance(rows, bool):
                self.kill()
                raise WorkerInvalid(f"logprobs: expected call {call!r}'s header with {len(self._digests[call])} "
                                    f"rows, got {str(head)[:80]}")
            blocks, got = [], 0
            while not blocks or got < rows:  # even 0 rows come as one (0, vocab) block
                shape = tuple(self._recv(deadline, "logprobs").get("shape") or ())
                if (len(shape) != 2 or got + shape[0] > rows
                        or (self.vocab_size and rows and shape[1] != self.vocab_size)):
                    self.kill()
                    raise WorkerInvalid(f"logprobs: call {call!r} sent a block of shape {shape} "
                                        f"for {rows} rows of {self.vocab_size}")
                blocks.append(self._recv_block(deadline, shape, "logprobs"))
                got += shape[0]
            out[call] = np.concatenate(blocks)
            self._check_digests(call, out[call])
        if "done" not in self._recv(deadline, "logprobs"):
            self.kill()
            raise WorkerInvalid("logprobs: no end after the last call")
        return out


    def _check_digests(self, call, rows):
        """The rows sent now must be the ones the worker had while the call was timed: each
        token's frame carried a digest of (part of) its row, computed before it left. Code in
        the worker process can change what it reports afterwards, never what it sent then."""
        digests = self._digests.pop(call, None)
        if digests is None or len(digests) != rows.shape[0] or any(
                row_digest(row) != digest for row, digest in zip(rows, digests)):
            self.kill()
            raise WorkerInvalid(f"logprobs of speed call {call!r} are not the ones generate() yielded "
                                f"while it was timed")


def remove_folder(folder):
    """Remove `folder` and everything in it, also what the pipeline made read-only (a folder
    without write permission would otherwise outlive the run for a user who is not root).
    Permissions are only ever changed inside `folder`, never on it or above it. Never raises:
    what cannot be removed stays behind (a cleanup must not end a run without its row)."""
    root = os.path.abspath(folder)

    def writable_then_retry(function, path, _):
        if not os.path.exists(root):
            return  # gone already
        for target in (os.path.dirname(path), path):
            if os.path.abspath(target).startswith(root + os.sep):
                try:
                    os.chmod(target, 0o700, follow_symlinks=False)
                except (OSError, NotImplementedError):
                    pass
        try:
            function(path)
        except OSError:
            pass
    try:
        shutil.rmtree(root, onerror=writable_then_retry)
    except (RecursionError, OSError):
        pass  # Python 3.11's rmtree recurses: a red team nested 3000 folders (RecursionError, no row)
    if os.path.lexists(root):  # find and rm walk any depth without recursion (fts)
        for command in (["find", root, "-mindepth", "1", "-type", "d", "-exec", "chmod", "u+rwx", "{}", "+"],
                        ["rm", "-rf", "--", root]):
            try:
                subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            except (OSError, subprocess.SubprocessError):
                pass


def _renumbered(fd):
    """`fd` moved to a free descriptor number drawn at random (the old one closed)."""
    while True:
        number = 64 + secrets.randbelow(900)
        try:
            os.fstat(number)
        except OSError:
            os.dup2(fd, number, inheritable=False)
            os.close(fd)
            return number


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
