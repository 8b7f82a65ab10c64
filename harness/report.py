"""What a run prints: the grep-able `key: value` block and the --json line on stdout;
progress, stage lines and notes for people on stderr."""

import json
import sys
import time
import unicodedata

# The key: value block, in order. Later keys are added at the end, never renamed.
BLOCK_KEYS = [
    "decision", "reason", "commit", "subject", "branch", "dirty", "model", "protocol", "preset",
    "decode_tps", "decode_tps_ci", "prefill_tps", "prefill_tps_ci", "ttft_s", "peak_memory_gb",
    "max_rss_gb", "champion", "speedup", "speedup_ci", "prefill_ratio", "end_to_end_ratio", "memory_ratio", "lines_vs_champion",
    "perplexity", "perplexity_se", "kl_mean", "kl_p99", "top1_agreement", "sanity",
    "continuation_nll", "repetition", "quality_score", "quality_adjusted_tps", "quality_pass",
    "bytes_per_token", "roofline_fraction", "quality_s", "elapsed_s", "run_file",
    "sandbox", "timed_kl_mean", "timed_kl_p99", "timed_top1", "self_consistency", "end_to_end_ci",
    "continuation_fit", "pairs", "pooled_pairs", "pair_spread", "min_detectable_effect", "load_avg",
    "speed_s", "stopped", "champion_pace", "yardstick_ratio", "yardstick_se",
    "champion_yardstick_pace", "end_to_end_total",
]


def visible(text, *, newlines=False):
    """`text` with control and format characters written as escapes (tab kept; newlines kept
    when `newlines`): what a pipeline wrote (an error message, its log) must not move a
    terminal's cursor (a red team drew a fake KEEP row over its CRASH row). Lone surrogates
    too: no UTF-8 holds them, and one in an error message stopped the run before its row."""
    keep = "\t\n" if newlines else "\t"
    return "".join(c if c in keep or unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Cs")
                   else f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in str(text))


def _block_text(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_block_text(v) for v in value) + "]"
    return visible(str(value).replace("\r", " ").replace("\n", " "))


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


def quoted(text):
    """What a worker wrote (its log, a traceback), each line behind '  | ': no line of it can
    pass for one of the run's own (a red team's traceback printed `decision: KEEP` lines where
    program.md greps the log for them)."""
    return "\n".join("  | " + line for line in str(text).splitlines())


def note(message):
    """A line for people, on stderr (control characters escaped: see visible)."""
    print(visible(message, newlines=True), file=sys.stderr, flush=True)


def _clock():
    """The wall-clock time for progress lines, e.g. '03:14:07' (local time, as `tail` readers expect)."""
    return time.strftime("%H:%M:%S")


def stage(name, stream=None):
    """Say that a stage of the run begins: '[03:14:07] stage: speed (36 calls)' on stderr.

    Always printed, terminal or not, so `tail run.log` tells where a run is.
    """
    stream = stream or sys.stderr
    stream.write(f"[{_clock()}] stage: {name}\n")
    stream.flush()


class Progress:
    """Progress of a long stage on stderr.

    On a terminal: a one-line bar redrawn in place. Otherwise (output redirected to
    run.log, as program.md does): plain timestamped lines such as
    '[03:14:07] speed 12/36 calls (champion explain_transformers)', one at the first
    step, then at most one every `every_s` seconds, and one at the last step, so the
    log tells where the run is without filling up.
    """

    def __init__(self, label, stream=None, *, unit="", every_s=15.0):
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.every_s = every_s
        self.start = time.perf_counter()
        self._last_line = None  # perf_counter of the last plain line written

    def __call__(self, done, total, what=""):
        if self.enabled:
            self._bar(done, total, what)
        else:
            self._line(done, total, what)

    def _line(self, done, total, what):
        now = time.perf_counter()
        due = self._last_line is None or now - self._last_line >= self.every_s
        if not (due or done >= total):
            return
        self._last_line = now
        count = f"{done}/{total}" + (f" {self.unit}" if self.unit else "")
        self.stream.write(f"[{_clock()}] {self.label} {count}" + (f" ({what})" if what else "") + "\n")
        self.stream.flush()

    def _bar(self, done, total, what):
        width = 28
        filled = int(width * done / max(total, 1))
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{total} {elapsed:5.0f}s {what[:40]:<40}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
