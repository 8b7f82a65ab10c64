"""A worker's memory, read by the parent from /proc (Linux): peaks and a sampler that
nothing in the worker can reset."""

import os
import threading

HAS_PROC = os.path.isdir("/proc/self")  # Linux: memory and processes read from /proc


def _status_bytes(pid, key):
    """A memory figure (e.g. "VmRSS") of `pid` from /proc/PID/status, in bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss(pids):
    """The largest peak resident set (VmHWM, bytes) among `pids`; 0 where /proc cannot tell."""
    return max((_status_bytes(pid, "VmHWM") for pid in pids), default=0)


def resident_bytes(pids):
    """The resident memory (VmRSS, bytes) of `pids` together, now; 0 where /proc cannot tell."""
    return sum(_status_bytes(pid, "VmRSS") for pid in pids)


RSS_SAMPLE_S = 0.05  # how often the harness looks at a worker's resident memory during a call


class RssWatch:
    """The worker's resident memory, sampled by the parent on a thread every RSS_SAMPLE_S
    from request to reply: unlike the peaks the process keeps about itself (VmHWM,
    ru_maxrss, MLX's counter), nothing in the worker can reset what was seen here."""

    def __init__(self, pids):
        self.pids, self.peak = tuple(pids), 0
        self._stop, self._thread = threading.Event(), None

    def start(self):
        if self.pids:
            self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)
            self._thread.start()

    def _run(self):
        while True:
            self.peak = max(self.peak, resident_bytes(self.pids))
            if self._stop.wait(RSS_SAMPLE_S):
                return

    def stop(self):
        self._stop.set()
        if self._thread:
            self._thread.join()
