"""The worker process that runs inference.py, and the parent's handle on it.

The parent starts `python -m harness.worker` with two private pipes: requests go
down one, replies come back on the other (framing in harness.pipe: JSON messages,
one per token during generation, plus raw float32 blocks for scores). The
worker's stdout and stderr go to a log file, so nothing the pipeline prints can
corrupt the protocol, and the last lines of that log explain a crash. The parent
owns every clock.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# WorkerCrash and WorkerInvalid are defined with the framing that raises them;
# callers may keep importing them from here.
from harness.pipe import Channel, WorkerCrash, WorkerInvalid, decode_block, decode_reply
from harness.settings import HARNESS_HOME

# The child runs in isolated mode (no script folder, user site or PYTHON* variables on
# its path) and imports the harness from its home, never from the repository.
LAUNCHER = "import sys; sys.path.append(sys.argv.pop(1)); from harness.worker import main; main()"


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------
class Worker:
    """A running worker process serving one inference.py.

    Args:
        inference_path: the inference.py to import (the challenger's or the champion's copy).
        log_path: where the worker's stdout/stderr go.
    """

    def __init__(self, inference_path, log_path):
        self.inference_path = Path(inference_path)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", LAUNCHER, str(HARNESS_HOME), str(req_r), str(resp_w),
             str(self.inference_path)],
            cwd=str(self.inference_path.parent), stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            pass_fds=(req_r, resp_w), env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True)  # its own process group: Ctrl-C reaches the parent only
        os.close(req_r)
        os.close(resp_w)
        self._channel = Channel(send_fd=req_w, recv_fd=resp_r)
        self.max_rss_bytes = None
        self.vocab_size = None  # when set, generated token ids must lie in [0, vocab_size)
        self.info = {}
        self._limit_s = 0.0

    # -- messages (a failure kills the worker, so it cannot linger half-way through a call)
    def _send(self, message):
        try:
            self._channel.send(message)
        except OSError:  # includes BrokenPipeError
            raise self._crash("the worker exited before it took a request") from None

    def _recv_bytes(self, deadline, what):
        """Next frame; a WorkerCrash if the worker dies or the deadline passes."""
        # A dead worker past its deadline still gets its last frames read: its exit
        # status says more than "timeout".
        if not self._channel.wait(deadline) and self.alive():
            raise self._crash(f"timeout: {what} ran past {self._limit_s:g} s (timeouts in harness.yaml)")
        try:
            return self._channel.recv_bytes()
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
        if code is not None and code < 0:
            message += f" (killed by signal {signal.Signals(-code).name})"
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
                    "overrides": overrides or {}})
        self.info = self._recv(deadline, "load()")
        return self.info

    def generate(self, prompt, *, max_tokens, stop_at_eos, timeout_s, seed=None):
        """Run one generate call and time it from this side of the pipe.

        Returns a dict: tokens, times (seconds after the request was sent, one per
        token), peak_memory_bytes (reported by the worker's MLX allocator).
        `seed` seeds MLX's random generator first, so sampling is repeatable.
        """
        tokens, times = [], []
        self._limit_s = timeout_s
        start = time.perf_counter()
        deadline = start + timeout_s
        self._send({"op": "generate", "prompt": prompt, "max_tokens": max_tokens,
                    "stop_at_eos": stop_at_eos, "seed": seed})
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
                tokens.append(token)
                times.append(now - start)
            else:
                return {"tokens": tokens, "times": times,
                        "peak_memory_bytes": message.get("peak_memory_bytes")}

    def score(self, tokens, *, timeout_s):
        """Yield float32 arrays (rows, vocab) of next-token log-probabilities, chunk by chunk."""
        self._limit_s = timeout_s
        deadline = time.perf_counter() + timeout_s
        self._send({"op": "score", "tokens": tokens})
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
            block = self._recv_block(deadline, shape, "score()")
            rows += shape[0]
            yield block

    def token_stats(self, tokens, start, *, timeout_s):
        """Reference workers only: per-token NLL and entropy for tokens[start:]."""
        self._limit_s = timeout_s
        self._send({"op": "token_stats", "tokens": tokens, "start": start})
        return self._recv(time.perf_counter() + timeout_s, "token_stats()")

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
            return True
        if pid == 0:
            return False
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
        self.max_rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return True

    def alive(self):
        """True while the worker process runs."""
        return not self._reap(block=False)

    def close(self, grace_s=10.0):
        """Ask the worker to exit, wait a little, then make sure it has gone."""
        if self.alive():
            try:
                self._channel.send({"op": "exit"})
            except OSError:
                pass
            deadline = time.perf_counter() + grace_s
            while self.alive() and time.perf_counter() < deadline:
                time.sleep(0.01)
        self.kill()

    def kill(self):
        """Kill the worker's whole process group (if still running), reap it, close pipes."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._reap(block=True)
        self._channel.close()
        if not self._log.closed:
            self._log.close()


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


def _generate(channel, module, pipeline, request):
    """Send each generated token as it comes, then the peak memory."""
    import mlx.core as mx

    if request.get("seed") is not None:
        mx.random.seed(request["seed"])
    mx.reset_peak_memory()
    cap = request["max_tokens"] + 1  # one past the cap proves "too many"
    count = 0
    for token in module.generate(pipeline, list(request["prompt"]),
                                 max_tokens=request["max_tokens"],
                                 stop_at_eos=request["stop_at_eos"]):
        if isinstance(token, (bool, np.bool_)) or not isinstance(token, (int, np.integer)):
            channel.send({"invalid": f"generate() yielded a non-integer token: {type(token).__name__} {token!r:.60}"})
            break
        channel.send({"t": int(token)})
        count += 1
        if count >= cap:
            break
    channel.send({"done": True, "peak_memory_bytes": int(mx.get_peak_memory())})


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
    while True:
        request = channel.recv()
        op = request["op"]
        if op == "exit":
            return
        try:
            if op == "load":
                pipeline = _load(channel, module, request)
            elif op == "generate":
                _generate(channel, module, pipeline, request)
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
