"""Message framing between the harness and its worker process.

Each direction is one private OS pipe, read and written here with raw system calls
(os.readv, os.write) on non-blocking file descriptors, waiting in select.poll, so
that every wait has a deadline.

A frame is a 9-byte header, then its body:

    kind    1 byte              b"M": a message (UTF-8 JSON, a dict), at most MESSAGE_LIMIT bytes
                                b"B": a block of raw float32 scores, at most BLOCK_LIMIT bytes
    length  8 bytes, big-endian the body's size in bytes
    body    `length` bytes

A block always follows a message {"shape": [rows, vocab]}; send_block splits a
block bigger than BLOCK_LIMIT into several such pairs of whole rows, so a reader
counting rows until "done" needs nothing else.

The worker runs the pipeline's code, which can write any bytes into its reply pipe,
close it, or stop half-way through a frame. So the parent reads every frame, header
and body, before a deadline, checks the header before it allocates anything, and
never allocates more than the limit of the frame's kind:

    stalled past the deadline             -> PipeTimeout (the parent reports a CRASH)
    bad kind byte, over the limit,        -> WorkerInvalid naming what was wrong
      not a JSON dict, a malformed field
    pipe closed, also half-way            -> EOFError (or OSError), as from a dead worker

Both sides use this module: the parent (harness.worker.Worker) with deadlines, the
child (harness/child.py) without (deadline=None waits as long as it takes).
It knows nothing about processes; the caller decides what a timeout or a closed
pipe means.
"""

import json
import math
import os
import select
import struct
import time

import numpy as np

HEADER = struct.Struct(">cQ")  # kind, body length
MESSAGE = b"M"
BLOCK = b"B"
MESSAGE_LIMIT = 1 << 20  # 1 MiB: the largest request or reply is a few tens of KiB of JSON
BLOCK_LIMIT = 64 << 20  # 64 MiB of float32 scores per frame (about 100 rows of a 150k vocabulary)
_SMALL = 1 << 16  # up to this size header and body go in one os.write: one system call, no torn small frame

# How many speed calls' log-probs a worker holds for the quality check: the parent takes
# each measured call's rows right after it (bench.run_workload) and releases a warm-up's
# with the next request, so one is all it ever needs. Every speed call of both workers
# carries a keep id (no request tells a pipeline that it is measured, or that it is the
# challenger).
KEPT_CALLS = 1


def keep_recent(store, call, value):
    """Put `value` under `call` as the newest entry of the dict `store`, then evict the oldest
    entries until at most KEPT_CALLS + 1 are left (one not taken yet and the call just made). A
    safety net for memory: the parent's releases keep the store below it. The child (its
    log-prob rows) and the parent (their digests) both store through here, so they keep the
    same ids in the same order."""
    store.pop(call, None)  # a repeated id counts as the newest call
    store[call] = value
    while len(store) > KEPT_CALLS + 1:
        del store[next(iter(store))]  # dicts keep insertion order: the first is the oldest


class WorkerCrash(Exception):
    """The worker died, hung past its timeout, or the pipeline raised. str(e) is one line."""

    def __init__(self, message, log_tail=""):
        super().__init__(message)
        self.log_tail = log_tail


class WorkerInvalid(Exception):
    """The pipeline broke the contract (wrong token count, non-integer tokens, bad scores,
    a malformed frame in the pipe). str(e) is one line."""


class PipeTimeout(Exception):
    """A frame was not read (or written) completely before its deadline.

    Not an OSError on purpose: a caller that treats OSError as "the other end is
    gone" must not mistake a stall for an exit.
    """


def _limit(kind):
    """(name, byte limit) of a frame kind, or None for an unknown kind byte.

    The limits are read at call time, so a test can shrink them.
    """
    return {MESSAGE: ("message", MESSAGE_LIMIT), BLOCK: ("block", BLOCK_LIMIT)}.get(kind)


def _wait(fd, event, deadline, doing):
    """Block until `fd` is ready for `event` (select.POLLIN or POLLOUT).

    `deadline` is a time.perf_counter() value, or None to wait as long as it takes.
    Raises PipeTimeout once it has passed; `doing` says what was under way, for the message.
    """
    poller = select.poll()
    poller.register(fd, event)
    while True:
        timeout_ms = None
        if deadline is not None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise PipeTimeout(f"the deadline passed while {doing}")
            timeout_ms = math.ceil(remaining * 1000)  # round up: never spin on a 0 ms poll
        if poller.poll(timeout_ms):
            return  # ready, or hung up / closed: the read or write that follows says which


def _read_exact(fd, size, deadline, what):
    """Exactly `size` bytes from `fd` as a bytearray, or PipeTimeout / EOFError.

    The deadline holds for the whole read, not for each piece: a writer that drips
    a byte at a time cannot stretch it.
    """
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        if deadline is not None and time.perf_counter() >= deadline:
            raise PipeTimeout(f"the deadline passed while reading {what} ({done} of {size} bytes came)")
        try:
            got = os.readv(fd, [view[done:]])
        except BlockingIOError:  # nothing in the pipe yet (the fd is non-blocking)
            _wait(fd, select.POLLIN, deadline, f"reading {what} ({done} of {size} bytes came)")
            continue
        if got == 0:
            raise EOFError(f"the pipe closed after {done} of the {size} bytes of {what}")
        done += got
    return buffer


def _write_all(fd, data, deadline):
    """Write all of `data` to `fd`, waiting (until `deadline`) while the pipe is full."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
        except BlockingIOError:  # the pipe is full: the reader has not taken the last frames
            _wait(fd, select.POLLOUT, deadline, f"writing a frame ({done} of {len(view)} bytes went)")


class Channel:
    """One end of the protocol: a pipe to send on and one to receive from.

    Args:
        send_fd: file descriptor of the pipe this end writes.
        recv_fd: file descriptor of the pipe this end reads.

    Both become non-blocking: every wait goes through select.poll with a deadline.
    Deadlines are time.perf_counter() values; None waits as long as it takes.
    """

    def __init__(self, send_fd, recv_fd):
        self._send_fd = send_fd
        self._recv_fd = recv_fd
        os.set_blocking(send_fd, False)
        os.set_blocking(recv_fd, False)

    # -- sending -------------------------------------------------------------
    def _send_frame(self, kind, body, deadline):
        name, limit = _limit(kind)
        if len(body) > limit:
            raise ValueError(f"a {name} of {len(body)} bytes is over the {limit}-byte limit")
        header = HEADER.pack(kind, len(body))
        if len(body) <= _SMALL:
            _write_all(self._send_fd, header + body, deadline)
        else:  # no copy of a large block
            _write_all(self._send_fd, header, deadline)
            _write_all(self._send_fd, body, deadline)

    def send(self, message, deadline=None):
        """Send one JSON message (a dict).

        Raises ValueError over MESSAGE_LIMIT, PipeTimeout when the pipe stays full
        past `deadline`, BrokenPipeError once the other end has closed.
        """
        self._send_frame(MESSAGE, json.dumps(message).encode(), deadline)

    def send_block(self, block, deadline=None):
        """Send a 2-D float32 array as {"shape": [rows, vocab]} messages, each followed by a
        block frame of its raw bytes; whole rows, as many as fit under BLOCK_LIMIT per frame."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        rows, vocab = block.shape
        row_bytes = vocab * block.itemsize
        limit = _limit(BLOCK)[1]
        if row_bytes > limit:  # checked before anything is sent, so the reader never waits for a half
            raise ValueError(f"one row of {row_bytes} bytes is over the {limit}-byte block limit")
        step = limit // row_bytes if row_bytes else max(rows, 1)
        for start in range(0, max(rows, 1), step):  # a (0, vocab) block still goes as one chunk
            chunk = block[start:start + step]
            self.send({"shape": list(chunk.shape)}, deadline)
            self._send_frame(BLOCK, memoryview(chunk.reshape(-1).view(np.uint8)), deadline)

    # -- receiving -----------------------------------------------------------
    def wait(self, deadline):
        """True when bytes (or the end of the pipe) are ready before `deadline`, False once
        it has passed. Not needed before recv_bytes, which keeps the deadline itself."""
        try:
            _wait(self._recv_fd, select.POLLIN, deadline, "waiting")
        except PipeTimeout:
            return False
        return True

    def recv_bytes(self, deadline=None):
        """The body of the next frame (a bytearray), header and body read before `deadline`.

        Raises PipeTimeout when the frame is not complete by then (also when the
        deadline has already passed, even with bytes waiting: a writer that never
        stops must not keep a reader past it), WorkerInvalid for a header with an
        unknown kind or a length over its kind's limit (checked before anything is
        allocated), EOFError when the pipe closes (before or within a frame).
        """
        header = _read_exact(self._recv_fd, HEADER.size, deadline, "a frame header")
        kind, length = HEADER.unpack(header)
        known = _limit(kind)
        if known is None:
            raise WorkerInvalid(f"garbage in the pipe: a frame header starting {bytes(header)!r} "
                                f"(a frame starts with b'M' or b'B')")
        name, limit = known
        if length > limit:
            raise WorkerInvalid(f"a frame header announced a {name} of {length} bytes, "
                                f"over the {limit}-byte limit")
        return _read_exact(self._recv_fd, length, deadline, f"a {length}-byte {name}")

    def recv(self, deadline=None):
        """The next JSON message (the worker's requests; it waits as long as it takes)."""
        return json.loads(self.recv_bytes(deadline))

    def close(self):
        """Close both pipes; closing twice is harmless (and never closes a reused fd number)."""
        for name in ("_send_fd", "_recv_fd"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


# ---------------------------------------------------------------------------
# Decoding replies (parent side): anything malformed is WorkerInvalid, never a harness error
# ---------------------------------------------------------------------------
def _is_count(value):
    # Below 2**53: a float holds it (a reported peak of 10**400 overflowed in the report: no row).
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 53


def _is_shape(value):
    return isinstance(value, list) and len(value) == 2 and all(_is_count(v) for v in value)


def _is_number(value):
    return not isinstance(value, bool) and (isinstance(value, float)
                                            or isinstance(value, int) and abs(value) < 2 ** 53)


def _is_numbers(value):
    return isinstance(value, list) and all(_is_number(v) for v in value)


# Fields the harness computes with: a wrong type must end as INVALID here, not as a
# TypeError somewhere in the report. (Token ids "t" are checked by Worker.generate.)
_FIELDS = {
    "shape": (_is_shape, "[rows, vocab], two non-negative integers"),
    "peak_memory_bytes": (lambda v: v is None or _is_count(v), "a non-negative integer below 2**53"),
    "weight_bytes": (_is_count, "a non-negative integer below 2**53"),
    "float_itemsize": (lambda v: _is_count(v) and 0 < v <= 16, "a positive integer up to 16"),
    "rows": (_is_count, "a non-negative integer below 2**53"),
    "nll": (_is_numbers, "a list of numbers"),
    "entropy": (_is_numbers, "a list of numbers"),
}


def _one_line(value, limit=300):
    """`value` as text on one line, at most `limit` characters (it ends up in a reason)."""
    lines = str(value).strip().splitlines() or [""]
    return lines[0][:limit]


def decode_reply(raw, what):
    """The reply frame `raw` as a dict, or the failure it reports.

    Raises WorkerInvalid for garbage (anything but a JSON object of at most
    MESSAGE_LIMIT bytes), for a known field of the wrong type, and for an
    {"invalid": reason} reply; WorkerCrash for an {"error": ..., "traceback": ...}
    reply. `what` names the call for the message, e.g. "generate()".
    """
    if len(raw) > MESSAGE_LIMIT:
        raise WorkerInvalid(f"{what}: a reply of {len(raw)} bytes, over the {MESSAGE_LIMIT}-byte message limit")
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
        message = None
    if not isinstance(message, dict):
        raise WorkerInvalid(f"{what}: something wrote garbage into the harness's pipe ({bytes(raw[:40])!r})")
    if "error" in message:
        raise WorkerCrash(f"{what} raised {_one_line(message['error'])}", str(message.get("traceback", ""))[-4000:])
    if "invalid" in message:
        raise WorkerInvalid(_one_line(message["invalid"]))
    for key, (valid, expected) in _FIELDS.items():
        if key in message and not valid(message[key]):
            raise WorkerInvalid(f"{what}: the reply's {key!r} is {_one_line(repr(message[key]), 60)}, "
                                f"expected {expected}")
    return message


def decode_block(raw, shape, what):
    """The raw float32 frame that followed a {"shape": shape} header, as an array of that shape.

    Raises WorkerInvalid when the shape is not two non-negative integers or the
    frame's size does not match it.
    """
    shape = list(shape)
    if not _is_shape(shape):
        raise WorkerInvalid(f"{what} announced a chunk of shape {_one_line(shape, 60)}")
    rows, vocab = shape
    if len(raw) != rows * vocab * 4:
        raise WorkerInvalid(f"{what} chunk size does not match its shape "
                            f"({len(raw)} bytes for {rows} x {vocab} float32)")
    return np.frombuffer(raw, dtype=np.float32).reshape(rows, vocab)
