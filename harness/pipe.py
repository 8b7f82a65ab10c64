"""Message framing between the harness and its worker process.

Each direction is one private OS pipe wrapped in a multiprocessing Connection.
A message is one Connection frame holding UTF-8 JSON (a dict); a block of scores
is a JSON header {"shape": [rows, vocab]} followed by one frame of raw float32
bytes, so large arrays never go through JSON. Replies that are not a dict, or
that report an error or a broken contract, become the two exceptions below.

Both sides use this module: the parent (harness.worker.Worker) and the child
(`python -m harness.worker`). It knows nothing about processes; the caller
decides what a timeout or a closed pipe means.
"""

import json
import time
from multiprocessing.connection import Connection

import numpy as np


class WorkerCrash(Exception):
    """The worker died, hung past its timeout, or the pipeline raised. str(e) is one line."""

    def __init__(self, message, log_tail=""):
        super().__init__(message)
        self.log_tail = log_tail


class WorkerInvalid(Exception):
    """The pipeline broke the contract (wrong token count, non-integer tokens, bad scores)."""


class Channel:
    """One end of the protocol: a Connection to send on and one to receive from.

    Args:
        send_fd: file descriptor of the pipe this end writes.
        recv_fd: file descriptor of the pipe this end reads.
    """

    def __init__(self, send_fd, recv_fd):
        self._send_conn = Connection(send_fd, readable=False)
        self._recv_conn = Connection(recv_fd, writable=False)

    def send(self, message):
        """Send one JSON message (a dict)."""
        self._send_conn.send_bytes(json.dumps(message).encode())

    def send_block(self, block):
        """Send a 2-D float32 array: its shape as a message, then its raw bytes."""
        self.send({"shape": list(block.shape)})
        self._send_conn.send_bytes(np.ascontiguousarray(block).tobytes())

    def wait(self, deadline):
        """True when a frame (or the end of the pipe) is ready before `deadline`,
        a time.perf_counter() value; False once it has passed."""
        remaining = deadline - time.perf_counter()
        return remaining > 0 and self._recv_conn.poll(remaining)

    def recv_bytes(self):
        """The next frame, waiting as long as it takes.

        Raises EOFError (or OSError) once the other end has closed its pipe.
        """
        return self._recv_conn.recv_bytes()

    def recv(self):
        """The next JSON message, waiting as long as it takes (the worker's requests)."""
        return json.loads(self.recv_bytes())

    def close(self):
        """Close both Connections; closing twice is harmless."""
        for conn in (self._send_conn, self._recv_conn):
            try:
                conn.close()
            except OSError:
                pass


def decode_reply(raw, what):
    """The reply frame `raw` as a dict, or the failure it reports.

    Raises WorkerInvalid for garbage (anything but a JSON object) and for an
    {"invalid": reason} reply, WorkerCrash for an {"error": ..., "traceback": ...}
    reply. `what` names the call for the message, e.g. "generate()".
    """
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        message = None
    if not isinstance(message, dict):
        raise WorkerInvalid(f"{what}: something wrote garbage into the harness's pipe ({raw[:40]!r})")
    if "error" in message:
        raise WorkerCrash(f"{what} raised {message['error']}", message.get("traceback", ""))
    if "invalid" in message:
        raise WorkerInvalid(message["invalid"])
    return message


def decode_block(raw, shape, what):
    """The raw float32 frame that followed a {"shape": shape} header, as an array of that shape.

    Raises WorkerInvalid when the frame's size does not match the shape.
    """
    block = np.frombuffer(raw, dtype=np.float32)
    if block.size != shape[0] * shape[1]:
        raise WorkerInvalid(f"{what} chunk size does not match its shape")
    return block.reshape(shape)
