"""The worker process: runs inside the sandbox, imports inference.py and serves the
harness's requests over the pipes (framing in harness.pipe). This is harness code, but it
shares its process with the pipeline, so nothing it reports is trusted as such: the parent
owns the clock, and the log-probs it keeps are bound to the timed window by the digests
sent with each token (row_digest).

Started by harness.worker.Worker as
    python -I -B -c LAUNCHER HARNESS_HOME REQUEST_FD REPLY_FD INFERENCE_PATH
"""

import hashlib
import importlib
import importlib.util
import linecache
import os
import sys
import traceback

import numpy as np

from harness.pipe import Channel, keep_recent


def row_digest(row):
    """The digest of one whole log-prob row (float32 bytes), as the worker sends it with the
    row's token: it binds the row reported after the call to the one the pipeline had while
    it was timed (any subset of the entries could be rewritten afterwards). sha256 runs at
    about 0.1 ms a token for a 49k vocabulary here, in both workers alike."""
    return hashlib.sha256(np.ascontiguousarray(row, dtype=np.float32).tobytes()).hexdigest()[:32]


def _error(exc):
    lines = traceback.format_exception(exc)
    return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
            "traceback": "".join(lines)[-4000:]}


def _import_inference(path):
    """Import inference.py from `path`, leaving no source behind to read.

    The file is compiled, removed, and only then run: no pipeline code runs while it exists,
    so nothing the code does not say can be read back from it (whitespace, layout: a red team
    kept a payload in blank lines, read it with open(__file__) and imported it, uncounted).
    The code object keeps the file name and line numbers for tracebacks; __file__ still names
    the file (its folder is the worker's own), and the spec's loader finds nothing there.
    linecache is emptied too: a warning shown while compiling would have cached every line.
    """
    with open(path, "rb") as f:
        source = f.read()
    try:
        # Compiled from the UTF-8 text the harness read (a str's coding cookie is ignored): from
        # bytes, a `# -*- coding: utf-7 -*-` line made comments to the harness run as code here.
        code = compile(source.decode("utf-8"), path, "exec", dont_inherit=True)
    finally:
        os.unlink(path)
        linecache.clearcache()
    spec = importlib.util.spec_from_file_location("inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["inference"] = module
    exec(code, module.__dict__)  # noqa: S102 - what import would do, from the compiled code
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
    into a float32 row before the token is sent (see _logprob_row), and the row's digest goes
    with the token, in every call alike: that forces their evaluation inside the timed
    window and binds what is reported later. The request's "vocab" (when given) is the length a row must
    have; otherwise the first row's length is, and token ids must lie below it.
    A call whose request carries "keep": <call id> (every speed call of both workers, warm-up
    calls included; task calls never do) keeps its (n_tokens, vocab) float32 rows in `kept`
    until an {"op": "logprobs"} request takes them or a later request's "drop" list releases
    them (the parent takes every measured call's rows right after it). Memory bound:
    harness.pipe.KEPT_CALLS + 1 calls x max_tokens x vocab x 4 bytes, plus this call's own
    buffer (64 tokens of a 150k vocabulary: 38 MB a call, 115 MB in all).
    """
    import mlx.core as mx

    for call in request.get("drop") or ():
        kept.pop(call, None)
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
            channel.send({"t": token, "d": row_digest(row)})
            count += 1
            if count >= cap:
                break
    except _Broken as exc:
        channel.send({"invalid": str(exc)})
        return
    if request.get("keep") is not None:
        keep_recent(kept, request["keep"],
                    rows[:count].copy() if rows is not None else np.zeros((0, 0), np.float32))
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
    kept = {}  # call id -> its (n_tokens, vocab) float32 log-probs, until fetched or dropped
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
        except Exception as exc:
            channel.send(_error(exc))


# Per-user kernel counts are shared by every process of one user: red teams passed the role
# through the pending-signal count (one worker queued signals until the user's allowance ran
# out, the other saw sigqueue fail; a KEEP won), the pipe-buffer pages (1100 pipes held: the
# other's new pipes got 8 KiB, not 64 KiB) and the epoll watches. As root the harness runs each
# sandbox as a user of its own (harness.sandbox), which closes them all. For a harness that
# cannot switch users, each worker also caps its share here, inside the sandbox (a cap set
# before bwrap would become the shared allowance). Descriptors stay at 4096 (mlx_lm raises its
# own limit to 2048/4096 on import), which still lets one worker hold 2048 pipes: without
# separate users the pipe-page and epoll allowances stay open (the README's threat model).
SHARED_COUNT_LIMITS = {"RLIMIT_SIGPENDING": 256, "RLIMIT_MSGQUEUE": 0, "RLIMIT_NOFILE": 4096}
# A worker that runs as a user of its own also gets a process and thread count: every one
# takes a process id from the machine's one range (pid_max, often 32768), which a worker
# could otherwise use up for the harness and the other worker (a red team made 5000
# threads; the user's allowance was 96k). The harness's own user may run far more, so
# without a user of its own it stays uncapped.
OWN_USER_PROCESSES = 1024


def _cap_shared_counts():
    """Lower this process's soft and hard limits to SHARED_COUNT_LIMITS (and RLIMIT_NPROC to
    OWN_USER_PROCESSES when it runs as a user of its own). Never above the hard limit it
    already has. Linux only."""
    import resource

    from harness.sandbox import USER_RANGE

    limits = dict(SHARED_COUNT_LIMITS)
    if USER_RANGE[0] <= os.getuid() < USER_RANGE[1]:
        limits["RLIMIT_NPROC"] = OWN_USER_PROCESSES
    for name, cap in limits.items():
        limit = getattr(resource, name, None)  # Linux only
        if limit is not None:
            hard = resource.getrlimit(limit)[1]
            cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)  # never above what it has
            resource.setrlimit(limit, (cap, cap))


def main():
    """Entry point of `python -m harness.worker REQUEST_FD REPLY_FD INFERENCE_PATH`."""
    _cap_shared_counts()
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
