"""The worker pipe's framing (harness/pipe.py) under attack.

The pipeline runs in the worker process, so it can write any bytes into its reply
pipe. Every attack here goes through a real OS pipe pair and a real Channel and must
fail promptly with a one-line reason, never block past its deadline and never
allocate more than a frame's limit. The last tests run whole evaluations of a tiny
model whose pipeline attacks the pipe itself.
"""

import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid

import numpy as np
import pytest

from harness import pipe, sandbox
from harness.pipe import Channel, PipeTimeout, WorkerCrash, WorkerInvalid, decode_block, decode_reply

DEADLINE_S = 0.5
SLACK_S = 0.2  # a stalled read may end this much after its deadline (poll rounding, a busy CI core)


class Pair:
    """A parent and a child Channel over two real OS pipes, as harness.worker wires them.

    `reply_fd` is the child's end of the reply pipe and `request_fd` the parent's end of
    the request pipe, for writing raw bytes past the framing as a pipeline could.
    """

    def __init__(self):
        req_r, self.request_fd = os.pipe()
        resp_r, self.reply_fd = os.pipe()
        self.parent = Channel(send_fd=self.request_fd, recv_fd=resp_r)
        self.child = Channel(send_fd=self.reply_fd, recv_fd=req_r)

    def write(self, data):
        """Raw bytes into the reply pipe, as the pipeline would write them (at most a pipe's worth)."""
        assert os.write(self.reply_fd, data) == len(data)

    def write_in_background(self, data):
        """Raw bytes into the reply pipe from a thread (for more than a pipe holds); returns the thread."""
        writer = threading.Thread(target=pipe._write_all, args=(self.reply_fd, data, time.perf_counter() + 10))
        writer.start()
        return writer

    def close_reply(self):
        """The pipeline closes its reply pipe (or dies)."""
        os.close(self.reply_fd)
        self.child._send_fd = -1  # so that close() cannot close a reused fd number

    def close(self):
        self.parent.close()
        self.child.close()


@pytest.fixture
def pair():
    channels = Pair()
    yield channels
    channels.close()


def _deadline():
    return time.perf_counter() + DEADLINE_S


def _fails_fast(pair, exc_type, label):
    """Read one frame with a DEADLINE_S deadline; it must raise `exc_type` before any wait."""
    start = time.perf_counter()
    with pytest.raises(exc_type) as info:
        pair.parent.recv_bytes(start + DEADLINE_S)
    elapsed = time.perf_counter() - start
    print(f"\n  time-to-failure {label}: {elapsed * 1000:.2f} ms ({type(info.value).__name__}: {info.value})")
    assert elapsed < SLACK_S
    return info.value


def _times_out(call, label):
    """call(deadline) must raise PipeTimeout at its DEADLINE_S deadline, not before, not much after."""
    start = time.perf_counter()
    with pytest.raises(PipeTimeout) as info:
        call(start + DEADLINE_S)
    elapsed = time.perf_counter() - start
    print(f"\n  time-to-failure {label}: {elapsed:.3f} s for a {DEADLINE_S} s deadline ({info.value})")
    assert DEADLINE_S - 0.01 <= elapsed <= DEADLINE_S + SLACK_S
    return info.value


def _collect_blocks(parent, deadline):
    """The parent's score loop (Worker.score): count rows over shape + block pairs until "done"."""
    blocks = []
    while True:
        message = decode_reply(parent.recv_bytes(deadline), "score()")
        if "done" in message:
            return blocks
        shape = tuple(message["shape"])
        blocks.append(decode_block(parent.recv_bytes(deadline), shape, "score()"))


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------
def test_messages_round_trip_both_ways(pair):
    pair.parent.send({"op": "generate", "prompt": [1, 2, 3], "note": "héllo ✓"}, _deadline())
    assert pair.child.recv() == {"op": "generate", "prompt": [1, 2, 3], "note": "héllo ✓"}
    for token in range(500):  # more than one pipe buffer's worth of small frames, in order
        pair.child.send({"t": token})
        assert decode_reply(pair.parent.recv_bytes(_deadline()), "generate()") == {"t": token}
    pair.child.send({"done": True, "peak_memory_bytes": None})
    assert decode_reply(pair.parent.recv_bytes(_deadline()), "generate()")["done"] is True


def test_block_round_trip(pair):
    block = np.arange(21, dtype=np.float32).reshape(3, 7) - 10.5
    pair.child.send_block(block)
    pair.child.send({"done": True})
    (received,) = _collect_blocks(pair.parent, _deadline())
    assert received.dtype == np.float32 and np.array_equal(received, block)


def test_big_block_is_split_into_whole_rows(pair, monkeypatch):
    monkeypatch.setattr(pipe, "BLOCK_LIMIT", 3 * 7 * 4)  # three rows of a 7-token vocabulary
    block = np.random.default_rng(0).standard_normal((10, 7)).astype(np.float32)
    pair.child.send_block(block)
    pair.child.send({"done": True})
    blocks = _collect_blocks(pair.parent, _deadline())
    assert [b.shape[0] for b in blocks] == [3, 3, 3, 1]
    assert np.array_equal(np.concatenate(blocks), block)


def test_block_over_the_default_limit_goes_in_several_frames(pair):
    block = np.arange(17 << 20, dtype=np.float32).reshape(17, 1 << 20)  # 68 MiB, 4 MiB a row
    sender = threading.Thread(target=lambda: (pair.child.send_block(block), pair.child.send({"done": True})))
    sender.start()
    blocks = _collect_blocks(pair.parent, time.perf_counter() + 30)
    sender.join()
    assert [b.shape[0] for b in blocks] == [16, 1]
    assert np.array_equal(np.concatenate(blocks), block)


def test_oversized_sends_are_refused_before_anything_is_written(pair, monkeypatch):
    with pytest.raises(ValueError, match="limit"):
        pair.child.send({"t": "x" * pipe.MESSAGE_LIMIT})
    monkeypatch.setattr(pipe, "BLOCK_LIMIT", 16)
    with pytest.raises(ValueError, match="one row"):
        pair.child.send_block(np.zeros((2, 5), dtype=np.float32))
    assert not pair.parent.wait(time.perf_counter() + 0.05)


def test_frames_at_exactly_the_limits_pass(pair, monkeypatch):
    monkeypatch.setattr(pipe, "MESSAGE_LIMIT", 64)
    monkeypatch.setattr(pipe, "BLOCK_LIMIT", 64)
    body = json.dumps({"t": "x" * 55}).encode()
    assert len(body) == 64
    pair.write(pipe.HEADER.pack(b"M", 64) + body + pipe.HEADER.pack(b"B", 64) + bytes(64))
    assert decode_reply(pair.parent.recv_bytes(_deadline()), "generate()") == {"t": "x" * 55}
    assert len(pair.parent.recv_bytes(_deadline())) == 64


# ---------------------------------------------------------------------------
# Attacks on the reader: each fails promptly, with a reason
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [b"M", b"B"])
def test_header_announcing_2_to_the_62_bytes(pair, kind):
    pair.write(pipe.HEADER.pack(kind, 2**62))
    tracemalloc.start()
    try:
        error = _fails_fast(pair, WorkerInvalid, f"2**62-byte {kind.decode()} header")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(2**62) in str(error) and "limit" in str(error)
    assert peak < 1 << 20  # nothing of the announced size was allocated


def test_multiprocessing_style_huge_header_is_garbage(pair):
    pair.write(struct.pack("!i", -1) + struct.pack("!Q", 2**62))  # the old framing's long header
    error = _fails_fast(pair, WorkerInvalid, "old-style 2**62 header")
    assert "garbage" in str(error)


@pytest.mark.parametrize("kind, limit_name", [(b"M", "MESSAGE_LIMIT"), (b"B", "BLOCK_LIMIT")])
def test_frame_one_byte_over_the_limit(pair, kind, limit_name):
    limit = getattr(pipe, limit_name)
    pair.write(pipe.HEADER.pack(kind, limit + 1) + b"{}")
    error = _fails_fast(pair, WorkerInvalid, f"{kind.decode()} frame one byte over the limit")
    assert f"{limit + 1} bytes" in str(error) and f"{limit}-byte limit" in str(error)


def test_garbage_bytes(pair):
    pair.write(b"hello harness, here are some tokens: 1 2 3\n")
    error = _fails_fast(pair, WorkerInvalid, "garbage bytes")
    assert "garbage" in str(error) and "hello" in str(error)


def test_half_a_header_then_silence(pair):
    pair.write(pipe.HEADER.pack(b"M", 10)[:4])
    error = _times_out(pair.parent.recv_bytes, "half a header, then silence")
    assert "header" in str(error)


def test_full_header_half_a_body_then_silence(pair):
    pair.write(pipe.HEADER.pack(b"B", 4096) + bytes(2048))
    error = _times_out(pair.parent.recv_bytes, "a header and half a body, then silence")
    assert "2048 of 4096" in str(error)


def test_slow_drip_cannot_stretch_the_deadline(pair):
    frame = pipe.HEADER.pack(b"M", 200) + b" " * 198 + b"{}"
    stop = threading.Event()

    def drip():
        for byte in frame:
            if stop.wait(0.02):  # one byte every 20 ms: each read makes progress, the frame never ends in time
                return
            os.write(pair.reply_fd, bytes([byte]))

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        _times_out(pair.parent.recv_bytes, "one byte every 20 ms")
    finally:
        stop.set()
        dripper.join()


def test_endless_valid_frames_stop_at_the_deadline(pair):
    stop = threading.Event()
    frame = pipe.HEADER.pack(b"M", 8) + b'{"t": 1}'

    def flood():
        while not stop.is_set():
            try:
                os.write(pair.reply_fd, frame * 100)
            except BlockingIOError:
                time.sleep(0.001)

    flooder = threading.Thread(target=flood)
    flooder.start()

    def read_forever(deadline):
        while True:
            decode_reply(pair.parent.recv_bytes(deadline), "generate()")

    try:
        _times_out(read_forever, "an endless stream of valid frames")
    finally:
        stop.set()
        flooder.join()


def test_passed_deadline_raises_even_with_a_frame_waiting(pair):
    pair.child.send({"t": 1})
    with pytest.raises(PipeTimeout):
        pair.parent.recv_bytes(time.perf_counter() - 1)


def test_full_request_pipe_cannot_block_the_sender(pair):
    while True:  # the pipeline fills the request pipe (reopened for writing through /proc) and reads no more
        try:
            os.write(pair.request_fd, bytes(1 << 16))
        except BlockingIOError:
            break
    error = _times_out(lambda deadline: pair.parent.send({"op": "generate"}, deadline), "send into a full pipe")
    assert "writing" in str(error)


@pytest.mark.parametrize("cut", [0, 4, pipe.HEADER.size, pipe.HEADER.size + 5])
def test_eof_at_or_within_a_frame(pair, cut):
    pair.write((pipe.HEADER.pack(b"M", 10) + b'{"t": 123}')[:cut])
    pair.close_reply()
    _fails_fast(pair, EOFError, f"EOF after {cut} bytes")


# ---------------------------------------------------------------------------
# Well-framed but malformed replies
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"[1, 2, 3]", b'"done"', b"null", b"42", b"\xff\xfe{}", b"{'t': 1}",
                                  b"[" * 100_000 + b"]" * 100_000, b'{"t": ' + b"9" * 5000 + b"}"],
                         ids=["list", "string", "null", "number", "bad-utf8", "python-repr", "nesting-bomb",
                              "5000-digit-int"])
def test_json_frame_that_is_not_a_dict(pair, body):
    pair.write_in_background(pipe.HEADER.pack(b"M", len(body)) + body)
    raw = pair.parent.recv_bytes(_deadline())
    with pytest.raises(WorkerInvalid, match="garbage") as info:
        decode_reply(raw, "generate()")
    assert "\n" not in str(info.value) and str(info.value).startswith("generate()")


@pytest.mark.parametrize("message", [{"shape": 5}, {"shape": [1.5, 2]}, {"shape": [True, 2]}, {"shape": [-1, 2]},
                                     {"shape": [1, 2, 3]}, {"done": True, "peak_memory_bytes": "lots"},
                                     {"loaded": True, "weight_bytes": -1}, {"loaded": True, "float_itemsize": 0},
                                     {"nll": [1, "x"], "entropy": []}, {"done": True, "rows": None},
                                     # integers no float holds (a peak of 10**400 overflowed the report: no row)
                                     {"done": True, "peak_memory_bytes": 10 ** 400}, {"loaded": True, "weight_bytes": 2 ** 60},
                                     {"loaded": True, "float_itemsize": 10 ** 6}, {"nll": [10 ** 400], "entropy": []}])
def test_reply_field_of_the_wrong_type(message):
    with pytest.raises(WorkerInvalid) as info:
        decode_reply(json.dumps(message).encode(), "score()")
    key = next(k for k in message if k not in ("done", "loaded"))
    assert repr(key) in str(info.value) and "expected" in str(info.value)


def test_error_and_invalid_replies_become_one_line():
    raw = json.dumps({"error": "RuntimeError: boom\nsecond line", "traceback": "Traceback...\nboom"}).encode()
    with pytest.raises(WorkerCrash) as crash:
        decode_reply(raw, "generate()")
    assert str(crash.value) == "generate() raised RuntimeError: boom" and crash.value.log_tail.endswith("boom")
    with pytest.raises(WorkerInvalid) as invalid:
        decode_reply(json.dumps({"invalid": "x" * 1000 + "\nmore"}).encode(), "generate()")
    assert str(invalid.value) == "x" * 300


def test_block_frame_where_a_message_belongs(pair):
    body = b"{" + b" " * ((2 << 20) - 2) + b"}"  # 2 MiB of valid JSON: more than a pipe holds
    pair.write_in_background(pipe.HEADER.pack(b"B", len(body)) + body)
    raw = pair.parent.recv_bytes(time.perf_counter() + 5)
    with pytest.raises(WorkerInvalid, match="message limit"):
        decode_reply(raw, "generate()")


@pytest.mark.parametrize("raw, shape", [(bytes(12), (2, 2)), (bytes(14), (1, 3)), (bytes(0), (-1, 2)),
                                        (bytes(8), (1.0, 2))])
def test_block_that_does_not_match_its_shape(raw, shape):
    with pytest.raises(WorkerInvalid, match="score()"):
        decode_block(raw, shape, "score()")


# ---------------------------------------------------------------------------
# End to end: a pipeline that attacks its own pipe, in a real evaluation
# ---------------------------------------------------------------------------
CALL_S = 3
WATCHDOG_S = 150  # a run still going then is killed (and fails the test): the attacks sleep for an hour
AFTER_ATTACK_S = CALL_S + 5  # from the attack to the end of the run: call_s, then the report

# Appended to inference.py: generate() attacks before its first token. The attack marks
# itself (its process name, and a child process with the marker in its command line)
# so the test can tell afterwards that nothing of the worker survived.
HOSTILE = '''

import os as _os, struct as _struct, subprocess as _subprocess, sys as _sys, time as _time

_MARKER = "{marker}"
_ATTACKED = []


def _reply_fd():
    """The worker's reply pipe: harness.child gets argv [-c, REQUEST_FD, REPLY_FD, INFERENCE_PATH]."""
    return int(_sys.argv[2])


def _leave_traces():
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(_MARKER)
    except OSError:
        pass
    _subprocess.Popen([_sys.executable, "-c", "import time; time.sleep(600)", _MARKER])
    _time.sleep(0.5)  # long enough for the test's scan of /proc to see both


def _attack():
    if _ATTACKED:
        return
    _ATTACKED.append(True)
    _leave_traces()
{attack}


_honest_generate = generate


def generate(pipeline, prompt, **kwargs):
    _attack()
    yield from _honest_generate(pipeline, prompt, **kwargs)
'''

ATTACKS = {
    # A frame header announcing 2**62 bytes, then silence: the old harness died of MemoryError.
    "huge_header": ("INVALID", ["generate()", str(2**62), "limit"], """
    _os.write(_reply_fd(), _struct.pack(">cQ", b"M", 2**62))
    _time.sleep(3600)
"""),
    # Half a frame, then silence: the old harness waited for the rest past call_s, forever.
    "half_frame": ("CRASH", ["timeout", "generate()", f"{CALL_S} s"], """
    _os.write(_reply_fd(), _struct.pack(">cQ", b"M", 100) + b'{"t": 1')
    _time.sleep(3600)
"""),
    # Fill the request pipe (reopened for writing through /proc) and stop reading requests:
    # the old harness blocked for ever sending the next one.
    "full_request_pipe": ("CRASH", ["timeout", "request", f"{CALL_S} s"], """
    import harness.pipe
    request = _os.open(f"/proc/self/fd/{int(_sys.argv[1])}", _os.O_WRONLY | _os.O_NONBLOCK)
    try:
        while True:
            _os.write(request, bytes(1 << 16))
    except BlockingIOError:
        pass
    harness.pipe.Channel.recv = lambda self, deadline=None: _time.sleep(3600)
"""),
}


def _marked_processes(marker):
    """Live (not zombie) processes whose name or command line carries `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{entry}/comm", "rb") as f:
                comm = f.read().decode(errors="replace").strip()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if state != b"Z" and (comm == marker or marker in cmdline):
            found.append((int(entry), comm, cmdline.replace("\0", " ")))
    return found


def _evaluate_watching(project, marker, tmp_path):
    """Run a quick evaluation, scanning /proc for the marker while it runs.

    Returns (exit status, result dict, seconds from the attack's first trace to the
    end of the run, marked processes seen during the run).
    """
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    seen, first_seen = set(), None
    start = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "prepare.py", "--quick", "--json", "--model", str(project.model_dir)],
                                cwd=project.root, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        while proc.poll() is None and time.perf_counter() - start < WATCHDOG_S:
            marked = _marked_processes(marker)
            if marked and first_seen is None:
                first_seen = time.perf_counter()
            seen.update((pid, comm) for pid, comm, _ in marked)
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.perf_counter() - (first_seen or start)
    lines = out.read_text().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    assert result is not None, out.read_text() + err.read_text()
    return proc.returncode, result, elapsed, seen


@pytest.mark.skipif(sys.platform != "linux", reason="the attacks and the process scan use /proc")
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_pipeline_attacking_its_pipe_ends_with_a_row(tmp_path, tiny_llama, attack):
    from conftest import make_project

    decision, words, code = ATTACKS[attack]
    if attack == "full_request_pipe" and sandbox._switching_users() and sandbox._bwrap_prefix()[0]:
        words = ["PermissionError", "/proc/self/fd/"]  # a user of its own cannot reopen the harness's pipe
    marker = "px" + uuid.uuid4().hex[:12]  # at most 15 characters: it is also a process name
    project = make_project(tmp_path / "p", tiny_llama, call_s=CALL_S)  # committed before the first run
    project.inference.write_text(project.inference.read_text() + HOSTILE.format(marker=marker, attack=code))
    project.commit(f"attack: {attack}")

    status, result, elapsed, seen = _evaluate_watching(project, marker, tmp_path)
    print(f"\n  {attack}: {result['decision']} {elapsed:.1f} s after the attack: {result['reason']}")
    assert status == 0
    assert result["decision"] == decision, result
    assert "\n" not in result["reason"] and all(word in result["reason"] for word in words), result["reason"]
    assert elapsed < AFTER_ATTACK_S
    rows = project.ledger_lines()
    assert len(rows) == 2 and decision in rows[1].split("\t")  # the header and this run's row
    assert seen, "the attack never ran (no marked process seen during the run)"
    assert _marked_processes(marker) == []  # the worker and its child are gone
