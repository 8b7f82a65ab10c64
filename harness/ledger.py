"""results.tsv: the append-only ledger of every run.

Untracked by git, so `git reset --hard` never touches it. Rows are appended whole
in one write and never rewritten; a malformed line is reported by its number and
left as it is.
"""

import os
from pathlib import Path

COLUMNS = [
    "timestamp",           # ISO 8601, UTC
    "commit",              # short hash of HEAD when the run started
    "branch",
    "subject",             # the commit's subject line
    "source",              # agent (a normal run) | search (a search trial)
    "protocol",            # hash of model + locked settings: only equal protocols are compared
    "model",
    "preset",              # full | quick
    "decision",            # BASELINE | MEASURED | KEEP | REVERT | REJECT | CRASH | INVALID
    "reason",              # one line
    "decode_tps", "decode_tps_lo", "decode_tps_hi",
    "prefill_tps", "ttft_s", "peak_memory_gb",
    "champion",            # commit this run was compared with, if any
    "speedup", "speedup_lo", "speedup_hi",
    "perplexity", "kl_mean", "top1_agreement", "sanity",
    "quality_score", "quality_adjusted_tps", "quality_pass",
    "roofline_fraction",
    "dirty",               # true when inference.py had uncommitted changes
    "changes",             # the change monitor's one-line summary
    "config",              # knob overrides (search trials), JSON
    "run_file",            # the run's JSON file with every raw sample
]
HEADER = "\t".join(COLUMNS) + "\n"


class LedgerError(Exception):
    """results.tsv cannot be used as it is; str(e) says what to do."""


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return " ".join(str(value).split())  # no tabs or newlines inside a cell


def format_row(row):
    """One TSV line for `row` (a dict keyed by COLUMNS; missing keys are empty)."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results.tsv columns: {sorted(unknown)}")
    return "\t".join(_cell(row.get(c)) for c in COLUMNS) + "\n"


def append(path, row):
    """Append one row in a single write, writing the header first if the file is new."""
    path = Path(path)
    line = format_row(row)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        line = HEADER + line
    except FileExistsError:
        check_header(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if path.stat().st_size and not _ends_with_newline(path):
            line = "\n" + line  # a hand edit lost the last newline: never glue two rows
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def check_header(path):
    """Raise LedgerError if an existing results.tsv was written with other columns."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if first and first != HEADER:
        raise LedgerError(f"{path} has a different header than this harness writes: "
                          f"move it aside (e.g. to results.old.tsv) and run again")


def read(path):
    """Read results.tsv. Returns (rows, problems).

    rows: dicts keyed by COLUMNS, plus "line" (1-based line number).
    problems: one message per malformed line, e.g. "results.tsv line 7 has 12 fields, expected 31".
    """
    path = Path(path)
    if not path.exists():
        return [], []
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    if lines and lines[0] + "\n" != HEADER:
        return [], [f"{path.name} line 1 is not this harness's header: move the file aside"]
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != len(COLUMNS):
            problems.append(f"{path.name} line {number} has {len(fields)} fields, expected "
                            f"{len(COLUMNS)}: fix or delete that line (it is ignored)")
            continue
        row = dict(zip(COLUMNS, fields))
        row["line"] = number
        rows.append(row)
    return rows, problems
