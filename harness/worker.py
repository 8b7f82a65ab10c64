"""The worker process that runs inference.py, and the parent's handle on it.

The parent starts `python -m harness.worker` with two private pipes: requests go
down one, replies come back on the other (framing in harness.pipe: JSON messages,
one per token during generation, plus raw float32 blocks for scores). The
worker's stdout and stderr go to a log file, so nothing the pipeline prints can
corrupt the protocol, and the last lines of that log explain a crash. The parent
owns every clock. The child runs in an OS sandbox (harness.sandbox), and the parent
stops it while another worker is timed and kills everything it started at the end.
"""

import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

# WorkerCrash and WorkerInvalid are defined with the framing that raises them;
# callers may keep importing them from here.
from harness import sandbox
from harness.models import cache_dir
from harness.pipe import Channel, PipeTimeout, WorkerCrash, WorkerInvalid, decode_block, decode_reply
from harness.settings import HARNESS_HOME

# The child runs in isolated mode (no script folder, user site or PYTHON* variables on
# its path) and imports the harness from its home, never from the repository.
LAUNCHER = "import sys; sys.path.append(sys.argv.pop(1)); from harness.worker import main; main()"


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

    def __init__(self, inference_path, log_path):
        self._folder = Path(tempfile.mkdtemp(prefix="mlx-hillclimb-worker-"))
        self.inference_path = self._folder / Path(inference_path).name
        shutil.copyfile(inference_path, self.inference_path)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        try:
            req_w, resp_r = self._start()
        except BaseException:
            self._log.close()
            shutil.rmtree(self._folder, ignore_errors=True)
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
        self._digests = {}  # keep id -> (probe, one digest per token), for timed_logprobs

    def _start(self):
        """Start the child in its sandbox, cwd its own folder; returns the parent's pipe ends."""
        folder = self.inference_path.parent  # the worker's own folder: its one writable place
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        try:
            command = [sys.executable, "-I", "-B", "-c", LAUNCHER, str(HARNESS_HOME), str(req_r), str(resp_w),
                       str(self.inference_path)]
            # The reference's log-probs are hidden: a pipeline could otherwise replay them.
            box = sandbox.wrap(command, folder, hide=[cache_dir() / "reference"],
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
            self.sandbox, self.sandbox_why = box.kind, box.why
            if box.kind == "none":
                sandbox.become_subreaper()  # so a double-forked daemon comes back to the harness
            self.proc = subprocess.Popen(
                box.command, cwd=str(folder), stdin=subprocess.DEVNULL, stdout=self._log,
                stderr=subprocess.STDOUT, pass_fds=(req_r, resp_w), env=box.env,
                start_new_session=True)  # its own process group: Ctrl-C reaches the parent only
        except BaseException:
            os.close(req_w)
            os.close(resp_r)
            raise
        finally:
            os.close(req_r)
            os.close(resp_w)
        return req_w, resp_r

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
        """The last lines the worker printed (its stderr and stdout)."""
        try:
            text = self.log_path.read_text(errors="replace")
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
        timed_logprobs(); the worker checks every yielded pair either way.
        """
        tokens, times, digests = [], [], []
        probe = secrets.randbelow(1 << 30)  # which entries of each row the in-window digest covers
        self._limit_s = timeout_s
        start = time.perf_counter()
        deadline = start + timeout_s
        self._send({"op": "generate", "prompt": prompt, "max_tokens": max_tokens, "stop_at_eos": stop_at_eos,
                    "seed": seed, "keep": keep, "vocab": self.vocab_size, "probe": probe},
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
                if keep is not None:
                    self._digests[keep] = (probe, digests)
                return {"tokens": tokens, "times": times,
                        "peak_memory_bytes": message.get("peak_memory_bytes")}

    def score(self, tokens, *, timeout_s):
        """Yield float32 arrays (rows, vocab) of next-token log-probabilities, chunk by chunk."""
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

    def token_stats(self, tokens, start, *, timeout_s):
        """Reference workers only: per-token NLL and entropy for tokens[start:]."""
        self._limit_s = timeout_s
        deadline = time.perf_counter() + timeout_s
        self._send({"op": "token_stats", "tokens": tokens, "start": start}, deadline, "token_stats()")
        return self._recv(deadline, "token_stats()")

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
        shutil.rmtree(self._folder, ignore_errors=True)

    def pause(self):
        """Stop (SIGSTOP) every process of the worker, so it cannot use the CPU while another
        worker is timed. Returns once all of them are seen stopped."""
        if self.alive():
            self._find_namespace()
            self._paused = True
            if not sandbox.stop_all(self._members):
                invalid = WorkerInvalid("its processes could not all be stopped while the other worker "
                                        "was timed (they keep forking or waking each other)")
                invalid.worker = Path(self.log_path).stem
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
        self._peak_rss = max(self._peak_rss, sandbox.peak_rss(self._members(sandbox.process_table(), strays=False)))

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

    def timed_logprobs(self, call_ids, *, timeout_s):
        """The log-probs that generate(..., keep=id) calls yielded, as the worker kept them
        (float16): {call_id: float32 array (n_tokens, vocab)}. The worker frees them once sent."""
        self._limit_s = timeout_s
        deadline = time.perf_counter() + timeout_s
        self._send({"op": "logprobs", "calls": list(call_ids)}, deadline, "logprobs")
        out = {}
        for call in call_ids:
            head = self._recv(deadline, "logprobs")
            rows = head.get("rows")
            if head.get("call") != call or isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
                self.kill()
                raise WorkerInvalid(f"logprobs: expected call {call!r}'s header, got {str(head)[:80]}")
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
        probe, digests = self._digests.pop(call, (None, None))
        if probe is None or len(digests) != rows.shape[0] or any(
                row_digest(row, probe) != digest for row, digest in zip(rows, digests)):
            self.kill()
            raise WorkerInvalid(f"logprobs of speed call {call!r} are not the ones generate() yielded "
                                f"while it was timed")


def row_digest(row, probe):
    """A digest of one log-prob row, as the worker sends it with the row's token: a strided
    ~2048 of its entries (offset chosen by the parent per call), rounded to float16 as the
    worker keeps them. Cheap in the timed window; binds the row that is reported later."""
    stride = max(1, row.shape[0] // 2048)
    sample = np.ascontiguousarray(np.asarray(row, dtype=np.float32)[probe % stride::stride].astype(np.float16))
    return hashlib.blake2b(sample.tobytes(), digest_size=8).hexdigest()


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# ---------------------------------------------------------------------------
# Worker side (runs in the child process; this is harness code, not the pipeline)
# ---------------------------------------------------------------------------
def _error(exc):
    lines = traceback.format_exception(exc)
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
            "traceback": "".join(lines)[-4000:]}


def _import_inference(path):
    spec = importlib.util.spec_from_file_location("inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["inference"] = module
    spec.loader.exec_module(module)
    for name in ("load", "generate", "score"):
        if not callable(getattr(module, name, None)):
            raise AttributeError(f"inference.py has no function {name}()")
    return module


def _apply_overrides(module, overrides):
    """Set knob values by name (the search mode); only existing UPPER_CASE knobs."""
    for name, value in overrides.items():
        if not name.isupper() or not hasattr(module, name):
            raise AttributeError(f"inference.py has no knob {name}")
        setattr(module, name, value)


def _model_info(pipeline):
    """Facts about the loaded model for the report (bytes of weights read per token)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    model = getattr(pipeline, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return {}
    arrays = [v for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array)]
    floats = [v for v in arrays if mx.issubdtype(v.dtype, mx.floating)]
    return {"weight_bytes": int(sum(v.nbytes for v in arrays)),
            # the KV cache is kept in the activations' dtype, which follows the float parameters
            "float_itemsize": int(floats[0].itemsize) if floats else 4}


def _load(channel, module, request):
    """Apply the knob overrides, load the model, reply with its facts; returns the pipeline."""
    _apply_overrides(module, request["overrides"])
    pipeline = module.load(request["model"], request["draft"])
    channel.send({"loaded": True, **_model_info(pipeline)})
    return pipeline


# What generate() must yield, quoted by every reason that rejects an item.
PAIR_CONTRACT = ("generate() must yield (token, logprobs) pairs: an int token id and the "
                 "log-probabilities it was sampled from, an mx.array of shape (vocab,) or (1, vocab)")


class _Broken(Exception):
    """A yielded item that breaks the contract; str(e) is the one-line reason."""


def _pair(item):
    """(token, logprobs) from one item generate() yielded, or _Broken naming the contract."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise _Broken(f"{PAIR_CONTRACT}; it yielded {type(item).__name__} {item!r:.60}")
    token, logprobs = item
    if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
        raise _Broken(f"generate() yielded a non-integer token: {type(token).__name__} {token!r:.60}")
    return int(token), logprobs


def _logprob_row(logprobs, vocab):
    """`logprobs` as one 1-D numpy row of `vocab` floats (vocab None: any length).

    np.asarray waits for MLX to finish computing them: the evaluation happens here, in the
    timed window before the token is sent, so no lazy work can hide past the last token.
    """
    import mlx.core as mx

    if isinstance(logprobs, mx.array):
        if logprobs.dtype not in (mx.float32, mx.float16):
            logprobs = logprobs.astype(mx.float32)  # numpy has no bfloat16
        row = np.asarray(logprobs)
    elif isinstance(logprobs, np.ndarray):
        row = logprobs
    else:
        raise _Broken(f"{PAIR_CONTRACT}; its logprobs is a {type(logprobs).__name__}")
    if row.ndim == 2 and row.shape[0] == 1:
        row = row[0]
    if row.ndim != 1 or not np.issubdtype(row.dtype, np.floating):
        raise _Broken(f"{PAIR_CONTRACT}; its logprobs has shape {row.shape} and dtype {row.dtype}")
    if vocab is not None and row.shape[0] != vocab:
        raise _Broken(f"generate() yielded {row.shape[0]} log-probabilities for a token, "
                      f"expected {vocab} (the vocabulary)")
    return row


def _generate(channel, module, pipeline, request, kept):
    """Send each generated token as it comes, then the peak memory.

    Every item must be a (token, logprobs) pair (PAIR_CONTRACT). Its log-probs are copied
    into a float32 row before the token is sent (see _logprob_row), in every call alike:
    that forces their evaluation inside the timed window. (numpy's float32 -> float16
    conversion costs ~10x the copy, 0.2 ms a token for a 49k vocabulary, so it waits until
    after the last token.) The request's "vocab" (when given) is the length a row must
    have; otherwise the first row's length is, and token ids must lie below it.
    A call whose request carries "keep": <call id> (a speed call; task calls never do)
    keeps its (n_tokens, vocab) rows as float16 in `kept` until an {"op": "logprobs"}
    request takes them. Memory bound: kept calls x max_tokens x vocab x 2 bytes (64 tokens
    of a 150k vocabulary: 19 MB a call), plus one call's float32 rows while it runs.
    """
    import mlx.core as mx

    if request.get("seed") is not None:
        mx.random.seed(request["seed"])
    mx.reset_peak_memory()
    cap = request["max_tokens"] + 1  # one past the cap proves "too many"
    vocab, rows, count = request.get("vocab"), None, 0
    try:
        for item in module.generate(pipeline, list(request["prompt"]), max_tokens=request["max_tokens"],
                                    stop_at_eos=request["stop_at_eos"]):
            token, logprobs = _pair(item)
            row = _logprob_row(logprobs, vocab)
            if rows is None:
                vocab, rows = row.shape[0], np.empty((cap, row.shape[0]), dtype=np.float32)
            if not 0 <= token < vocab:
                raise _Broken(f"generate() yielded token id {token}, outside the vocabulary [0, {vocab})")
            rows[count] = row  # evaluated and copied before the token leaves
            channel.send({"t": token, "d": row_digest(row, request.get("probe", 0))})
            count += 1
            if count >= cap:
                break
    except _Broken as exc:
        channel.send({"invalid": str(exc)})
        return
    if request.get("keep") is not None:
        kept[request["keep"]] = (rows[:count] if rows is not None else np.zeros((0, 0))).astype(np.float16)
    channel.send({"done": True, "peak_memory_bytes": int(mx.get_peak_memory())})


def _send_logprobs(channel, request, kept):
    """Send the kept log-probs of each call in request["calls"], in that order, and free them.

    Per call: {"call": id, "rows": n}, then its (n, vocab) rows as float32 blocks
    (Channel.send_block); after the last call, {"done": true}. An id with nothing kept
    raises before anything is sent.
    """
    missing = [call for call in request["calls"] if call not in kept]
    if missing:
        raise ValueError(f"no log-probs kept for calls {missing!r:.100}")
    for call in request["calls"]:
        rows = kept.pop(call)
        channel.send({"call": call, "rows": int(rows.shape[0])})
        channel.send_block(rows)  # float32 on the wire
    channel.send({"done": True})


def _score(channel, module, pipeline, request):
    """Send each chunk of log-probabilities as a float32 block, then the peak memory."""
    import mlx.core as mx

    mx.reset_peak_memory()
    for chunk in module.score(pipeline, list(request["tokens"])):
        block = np.asarray(mx.array(chunk).astype(mx.float32))
        if block.ndim != 2:
            channel.send({"invalid": f"score() yielded an array of shape {block.shape}, expected (rows, vocab)"})
            break
        channel.send_block(block)
    channel.send({"done": True, "peak_memory_bytes": int(mx.get_peak_memory())})


def _serve(channel, inference_path):
    """Import inference.py, then answer requests until the parent says exit."""
    # MLX before inference.py, so that a broken MLX install kills the worker here
    # instead of reading as an error in the pipeline's import.
    importlib.import_module("mlx.core")

    try:
        module = _import_inference(inference_path)
    except BaseException as exc:  # a syntax or import error is the pipeline's, not ours
        channel.send(_error(exc))
        return
    channel.send({"ready": True})
    pipeline = None
    kept = {}  # call id -> its (n_tokens, vocab) float16 log-probs, until fetched
    while True:
        request = channel.recv()
        op = request["op"]
        if op == "exit":
            return
        try:
            if op == "load":
                pipeline = _load(channel, module, request)
            elif op == "generate":
                _generate(channel, module, pipeline, request, kept)
            elif op == "logprobs":
                _send_logprobs(channel, request, kept)
            elif op == "score":
                _score(channel, module, pipeline, request)
            elif op == "token_stats":
                channel.send(module.token_stats(pipeline, request["tokens"], request["start"]))
        except Exception as exc:
            channel.send(_error(exc))


def main():
    """Entry point of `python -m harness.worker REQUEST_FD REPLY_FD INFERENCE_PATH`."""
    req_fd, resp_fd, inference_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    channel = Channel(send_fd=resp_fd, recv_fd=req_fd)
    # The pipeline must not touch the protocol pipes through sys.stdout.
    sys.stdout = sys.stderr
    try:
        _serve(channel, inference_path)
    except (EOFError, BrokenPipeError):
        pass  # the parent went away: nothing left to do


if __name__ == "__main__":
    main()
