"""What a run prints: the grep-able `key: value` block and the --json line on stdout;
progress and notes for people on stderr."""

import json
import sys
import time

# The key: value block, in order. Later keys are added at the end, never renamed.
BLOCK_KEYS = [
    "decision", "reason", "commit", "subject", "branch", "dirty", "model", "protocol", "preset",
    "decode_tps", "decode_tps_ci", "prefill_tps", "prefill_tps_ci", "ttft_s", "peak_memory_gb",
    "max_rss_gb", "champion", "speedup", "speedup_ci", "prefill_ratio", "end_to_end_ratio", "memory_ratio", "lines_vs_champion",
    "perplexity", "perplexity_se", "kl_mean", "kl_p99", "top1_agreement", "sanity",
    "continuation_nll", "repetition", "quality_score", "quality_adjusted_tps", "quality_pass",
    "bytes_per_token", "roofline_fraction", "quality_s", "elapsed_s", "run_file",
]


def _block_text(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_block_text(v) for v in value) + "]"
    return str(value)


def block(result):
    """The `key: value` lines for `result` (keys that are absent print as '-')."""
    lines = ["---"]
    for key in BLOCK_KEYS:
        lines.append(f"{key}: {_block_text(result.get(key))}")
    for gate in result.get("gates", []):
        status = "pass" if gate["passed"] else "FAIL"
        lines.append(f"gate_{gate['name']}: {status} {_block_text(gate['value'])} "
                     f"({gate['op']} {_block_text(gate['threshold'])})")
    return "\n".join(lines)


def json_line(result):
    """The --json object: one line, the last of stdout."""
    return json.dumps({k: v for k, v in result.items() if not k.startswith("_")},
                      separators=(",", ":"), default=str)


def note(message):
    """A line for people, on stderr."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label, stream=sys.stderr):
        self.label = label
        self.stream = stream
        self.enabled = stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, done, total, what=""):
        if not self.enabled:
            return
        width = 28
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{total} {elapsed:5.0f}s {what[:40]:<40}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
