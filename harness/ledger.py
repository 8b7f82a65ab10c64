"""results.tsv: the append-only ledger of every run, and every query of it.

Untracked by git, so `git reset --hard` never touches it. Rows are appended whole
in one write and never rewritten; a malformed line is reported by its number and
left as it is.

The file is tab-separated, written by the `csv` module with minimal quoting: a cell
holding a tab or a double quote is quoted (quotes doubled), so any text round-trips
through `csv.DictReader(f, delimiter="\\t")` and `pandas.read_csv(sep="\\t")`. A cell
never spans lines: carriage returns and newlines become spaces. Files written before
quoting (cells were split on tabs, never quoted) still read exactly: see `parse_line`.
"""

import csv
import enum
import io
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
    "decision",            # a Decision: BASELINE | MEASURED | KEEP | REVERT | REJECT | CRASH | INVALID
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
HEADER = "\t".join(COLUMNS) + "\n"  # no column name needs quoting, so this is also the csv header


class Decision(enum.StrEnum):
    """What a run's verdict was. Members equal their names as plain strings ("KEEP"),
    so rows keep storing and comparing plain text."""

    BASELINE = "BASELINE"  # first good run of a protocol on a branch
    KEEP = "KEEP"          # faster than the champion beyond noise, quality gates passed
    REVERT = "REVERT"      # not better than the champion, or a quality gate failed
    MEASURED = "MEASURED"  # measured, no verdict (uncommitted changes, search trial, HEAD is the champion)
    CRASH = "CRASH"        # the pipeline's worker raised or died
    INVALID = "INVALID"    # the pipeline broke the contract (e.g. wrong token count)
    REJECT = "REJECT"      # refused before measuring (locked files changed)


# Decisions whose (clean) run can be the champion the next run is compared with.
CHAMPION_DECISIONS = frozenset({Decision.BASELINE, Decision.KEEP})
# Decisions of a run that produced no usable measurement.
FAILED = frozenset({Decision.CRASH, Decision.INVALID, Decision.REJECT})
# Decisions after which `--apply` resets inference.py to the champion.
RESETTABLE = frozenset({Decision.REVERT}) | FAILED


class LedgerError(Exception):
    """results.tsv cannot be used as it is; str(e) says what to do."""


def _csv_line(fields):
    """`fields` as one line, exactly as `append` writes it."""
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerow(fields)
    return buffer.getvalue()


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    # One physical line per row; tabs and quotes stay (csv quoting carries them).
    return str(value).replace("\r", " ").replace("\n", " ")


def format_row(row):
    """One results.tsv line, newline included, for `row` (a dict keyed by COLUMNS;
    missing keys are empty). Raises ValueError for a key that is not a column."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results.tsv columns: {sorted(unknown)}")
    return _csv_line([_cell(row.get(c)) for c in COLUMNS])


def append(path, row):
    """Append one row in a single write, writing the header first if the file is new.

    Raises LedgerError if an existing file has another header.
    """
    path = Path(path)
    line = format_row(row)
    try:
        # O_EXCL: of two runs creating the file at once, only one writes the header
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        line = HEADER + line
    except FileExistsError:
        check_header(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        if path.stat().st_size and not _ends_with_newline(path):
            line = "\n" + line  # a hand edit lost the last newline: never glue two rows
    try:
        os.write(fd, line.encode())  # one write: concurrent appends never interleave
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


def parse_line(text):
    """The cells of one results.tsv line (without its newline).

    A line this module wrote is csv: parsing it and writing the fields back gives the same
    line. A line written before quoting (split on tabs, never quoted) usually does not, e.g.
    a subject `"a" b` parses as `a" b`: such a line is split on tabs, so it reads exactly.
    """
    try:
        fields = next(csv.reader([text], delimiter="\t", quoting=csv.QUOTE_MINIMAL), [])
    except csv.Error:
        return text.split("\t")
    if _csv_line(fields) == text + "\n":
        return fields
    return text.split("\t")


def read(path):
    """Read results.tsv. Returns (rows, problems).

    rows: dicts keyed by COLUMNS with text cells, plus "line" (1-based line number).
    problems: one message per malformed line, e.g. "results.tsv line 7 has 12 fields, expected 32";
    that line is skipped. A file with another header gives no rows and one problem.
    """
    path = Path(path)
    if not path.exists():
        return [], []
    rows, problems = [], []
    # Line by line: a hand-damaged line (say, an unclosed quote) never swallows the next rows.
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [text.rstrip("\n") for text in f]
    if lines and lines[0] + "\n" != HEADER:
        return [], [f"{path.name} line 1 is not this harness's header: move the file aside"]
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        fields = parse_line(text)
        if len(fields) != len(COLUMNS):
            problems.append(f"{path.name} line {number} has {len(fields)} fields, expected "
                            f"{len(COLUMNS)}: fix or delete that line (it is ignored)")
            continue
        row = dict(zip(COLUMNS, fields))
        row["line"] = number
        rows.append(row)
    return rows, problems


def champion_row(rows, ancestry, protocol=None, branch=None):
    """The row the next run is compared with, or None.

    The newest row (by file order) whose decision is in CHAMPION_DECISIONS (BASELINE or KEEP),
    that was not run on a dirty inference.py, whose commit is in `ancestry` (short hashes of
    HEAD and its ancestors), and whose protocol (and branch) match when given.
    """
    history = set(ancestry)
    for row in reversed(rows):
        if (row.get("decision") in CHAMPION_DECISIONS and row.get("dirty") != "true"
                and row.get("commit") in history
                and (protocol is None or row.get("protocol") == protocol)
                and (branch is None or row.get("branch") == branch)):
            return row
    return None


def newest_protocol(rows, ancestry):
    """The protocol of the newest row whose commit is in `ancestry` (None when there is none)."""
    history = set(ancestry)
    for row in reversed(rows):
        if row.get("commit") in history and row.get("protocol"):
            return row["protocol"]
    return None


def branch_baseline(rows, ancestry, branch):
    """This branch's newest BASELINE row whose commit is in `ancestry`, whatever its protocol,
    or None: the commit every file but inference.py is locked to."""
    history = set(ancestry)
    for row in reversed(rows):
        if (row.get("decision") == Decision.BASELINE and row.get("commit") in history
                and row.get("branch") == branch):
            return row
    return None
