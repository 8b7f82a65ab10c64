"""results.tsv: the append-only ledger of every run, and every query of it.

Untracked by git, so `git reset --hard` never touches it. Rows are appended whole
in one write and never rewritten; a malformed line is reported by its number and
left as it is.

The file is tab-separated, written by the `csv` module with minimal quoting: a cell
holding a tab or a double quote is quoted (quotes doubled), so any text round-trips
through `csv.DictReader(f, delimiter="\\t")` and `pandas.read_csv(sep="\\t")`. A cell
never spans lines: carriage returns and newlines become spaces. Files written before
quoting (cells were split on tabs, never quoted) still read exactly: see `parse_line`.

New columns are only ever added at the end: a file started by an older harness (its header
is a prefix of COLUMNS) still reads, and gets rows with its own columns only.

The harness keeps the sha256 of every line it writes in `results.tsv.sha256` beside the
ledger (written before the line). A row whose digest is not there was not written by the
harness: it is marked untrusted and never taken as baseline or champion. A ledger with no
index yet (from before it existed) is trusted as it is on the next write.
"""

import csv
import enum
import hashlib
import io
import json
import math
import os
import statistics
from pathlib import Path

from harness.report import visible

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
    # Added later (a file started before has only the columns above):
    "sandbox",             # the OS sandbox the pipeline ran in: bwrap | sandbox-exec | none
    "pairs",               # paired ratios the speedup rests on (earlier runs' pooled ones included)
    "pair_spread",         # robust standard deviation of the pairs' log ratios
    "min_detectable_effect",  # the smallest speedup these pairs could have KEPT
    "load_avg",            # the machine's 1-minute load average when the speed calls began
    "speed_s",             # seconds the speed calls took
    "stopped",             # why the A/B stopped: decided | budget | max_repeats
    "code_hash",           # sha256 of inference.py's syntax tree without docstrings (re-rolls pool)
    "ratios",              # the pairs' ratios, JSON {"decode_tps": [...], "end_to_end": [...]}
    "yardstick_ratio",     # the measured pipeline's speed over the yardstick's in this run (a KEEP: at least what its win implies)
    "yardstick_se",        # the standard error of log(yardstick_ratio)
    "champion_yardstick_pace",  # the champion's yardstick ratio now over its record (1: as it was)
]
HEADER = "\t".join(COLUMNS) + "\n"  # no column name needs quoting, so this is also the csv header
FIRST_COLUMNS = 32  # the columns of the first harness: every readable header has at least these


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
    # One physical line per row; tabs and quotes stay (csv quoting carries them). Other control
    # characters are written as escapes: a pipeline's error message or a commit subject must
    # not move a terminal's cursor (a red team drew a fake KEEP row over its CRASH row).
    return visible(str(value).replace("\r", " ").replace("\n", " "))


def format_row(row, columns=COLUMNS):
    """One results.tsv line, newline included, for `row` (a dict keyed by COLUMNS;
    missing keys are empty), with `columns` (an older file's own). Raises ValueError
    for a key that is not a column."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results.tsv columns: {sorted(unknown)}")
    return _csv_line([_cell(row.get(c)) for c in columns])


def index_path(path):
    """Where the digests of the lines the harness wrote to `path` are kept."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def line_digest(line):
    """The digest of one ledger line (without its newline) as the index keeps it."""
    return hashlib.sha256(line.rstrip("\n").encode()).hexdigest()


def _append_bytes(path, data, *, create_with=None):
    """Append `data` in one write (`create_with` first if the file is new); True if created."""
    try:
        # O_EXCL: of two runs creating the file at once, only one writes the header
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        data = (create_with or b"") + data
        created = True
    except FileExistsError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        created = False
        if path.stat().st_size and not _ends_with_newline(path):
            data = b"\n" + data  # a hand edit lost the last newline: never glue two rows
    try:
        os.write(fd, data)  # one write: concurrent appends never interleave
    finally:
        os.close(fd)
    return created


def append(path, row):
    """Append one row in a single write, writing the header first if the file is new,
    and record its digest in the index first.

    Raises LedgerError if an existing file has a header this harness cannot extend.
    """
    path = Path(path)
    columns = file_columns(path) if path.exists() else COLUMNS
    line = format_row(row, columns)
    index = index_path(path)
    if path.exists() and not index.exists():
        # A ledger from before the index: trust what it holds now, once.
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")[1:]
        _append_bytes(index, "".join(line_digest(t) + "\n" for t in lines if t.strip()).encode())
    _append_bytes(index, (line_digest(line) + "\n").encode())
    _append_bytes(path, line.encode(), create_with=HEADER.encode())


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def file_columns(path):
    """The columns of an existing results.tsv: COLUMNS, or an older harness's prefix of them.

    Raises LedgerError for any other header.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if not first:
        return COLUMNS
    names = first.rstrip("\n").split("\t")
    if len(names) < FIRST_COLUMNS or names != COLUMNS[:len(names)]:
        raise LedgerError(f"{path} has a different header than this harness writes: "
                          f"move it aside (e.g. to results.old.tsv) and run again")
    return names


def check_header(path):
    """Raise LedgerError if an existing results.tsv was written with other columns."""
    file_columns(path)


def fingerprint(path):
    """(size, sha256) of the ledger as it is now; (0, None) when it does not exist."""
    path = Path(path)
    if not path.exists():
        return 0, None
    blob = path.read_bytes()
    return len(blob), hashlib.sha256(blob).hexdigest()


def changed_since(path, before):
    """'' when the ledger is as `before` (a fingerprint) left it, else one line saying what
    changed: the lines something else appended, or that earlier content was rewritten."""
    size, digest = before
    path = Path(path)
    blob = path.read_bytes() if path.exists() else b""
    if len(blob) == size and (digest is None or hashlib.sha256(blob).hexdigest() == digest):
        return ""
    if len(blob) > size and (digest is None or hashlib.sha256(blob[:size]).hexdigest() == digest):
        # Rows another harness run appended meanwhile (e.g. a parallel search) are in the index.
        first = blob[:size].count(b"\n") + 1
        trusted = _trusted_digests(path) or set()
        appended = blob[size:].decode("utf-8", errors="replace").split("\n")
        if size == 0 and appended:
            appended[0] = ""  # the header of a ledger created meanwhile
        foreign = [str(first + i) for i, text in enumerate(appended)
                   if text.strip() and line_digest(text) not in trusted]
        if not foreign:
            return ""
        return f"{path.name} line(s) {', '.join(foreign)} were not written by the harness"
    return f"{path.name} was rewritten or truncated during the run (earlier rows changed)"


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
    try:
        columns = file_columns(path)
    except LedgerError:
        return [], [f"{path.name} line 1 is not this harness's header: move the file aside"]
    trusted = _trusted_digests(path)
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        fields = parse_line(text)
        if len(fields) != len(columns):
            problems.append(f"{path.name} line {number} has {len(fields)} fields, expected "
                            f"{len(columns)}: fix or delete that line (it is ignored)")
            continue
        row = dict.fromkeys(COLUMNS, "") | dict(zip(columns, fields))
        row["line"] = number
        row["trusted"] = trusted is None or line_digest(text) in trusted
        rows.append(row)
    return rows, problems


def _trusted_digests(path):
    """The set of digests in the index, or None when there is no index yet (all trusted)."""
    try:
        return set(index_path(path).read_text().split())
    except FileNotFoundError:
        return None


def champion_row(rows, ancestry, protocol=None, branch=None):
    """The row the next run is compared with, or None.

    The newest row (by file order) whose decision is in CHAMPION_DECISIONS (BASELINE or KEEP),
    that was not run on a dirty inference.py, whose commit is in `ancestry` (short hashes of
    HEAD and its ancestors), and whose protocol (and branch) match when given.
    """
    history = set(ancestry)
    for row in reversed(rows):
        if (row.get("decision") in CHAMPION_DECISIONS and row.get("dirty") != "true"
                and row.get("trusted", True)
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


def earlier_ratios(rows, *, protocol, champion, code_hash):
    """The paired ratios of earlier runs of the same code (`code_hash`) against the same
    champion commit under `protocol`, pooled: {metric: [ratios]}. Only rows the harness
    wrote (trusted) that measured cleanly and passed every quality gate count (a run that
    cut corners is not the code's speed); returns ({}, 0) when there are none, else
    (pooled ratios, how many runs)."""
    pooled, runs = {}, 0
    for row in rows:
        if not (row.get("trusted", True) and row.get("code_hash") == code_hash and row.get("ratios")
                and row.get("protocol") == protocol and row.get("champion") == champion
                and row.get("decision") not in FAILED and row.get("quality_pass") == "true"
                and row.get("dirty") != "true"
                and row.get("source") != "search"):
            continue
        try:
            ratios = json.loads(row["ratios"])
        except ValueError:
            continue
        earlier_run = {k: [float(x) for x in v] for k, v in ratios.items() if isinstance(v, list)}
        if _float(row.get("champion_yardstick_pace")) < POOL_PACE_FLOOR:
            # its champion ran slow (a REVERT, yet its pairs flatter the challenger): neither it
            # nor the runs it pooled count (red team: three such REVERTs pooled into KEEP +27 %)
            pooled, runs = {}, 0
            continue
        # a pooled row already holds the runs before it: the newest one holds them all
        pooled, runs = earlier_run, runs + 1
    return pooled, runs


POOL_PACE_FLOOR = 0.97  # an earlier run whose champion ran below this against its record is not pooled


def _clean_run(row, protocol):
    """A row the harness wrote of a committed pipeline measured cleanly under `protocol` that
    passed every gate (not a search trial): what that pipeline ran at, measured itself."""
    return (row.get("protocol") == protocol and row.get("trusted", True) and row.get("dirty") != "true"
            and row.get("quality_pass") == "true" and row.get("decision") not in FAILED
            and row.get("source") != "search")


def _float(text):
    """A cell as a float; nan when empty or not a number."""
    try:
        return float(text or "nan")
    except ValueError:
        return math.nan


def own_speed(rows, *, protocol, commit, metric):
    """The median `metric` (decode_tps or prefill_tps) of `commit`'s own clean runs under
    `protocol` (trusted, not dirty, gates passed), or None: what the champion ran at when it
    was measured as the challenger itself."""
    figures = []
    for row in rows:
        if row.get("commit") == commit and _clean_run(row, protocol):
            figures.append(_float(row.get(metric)))
    figures = [f for f in figures if f == f and f > 0]
    return statistics.median(figures) if figures else None


def yardstick_record(rows, champion, lineage):
    """(log ratio, se): the pipeline's speed over the yardstick's that the `champion` row's
    pipeline is held to, or (None, None) (rows of an older harness). The best of the clean
    runs (same protocol, any branch, any role) of its code (same code_hash) and of the
    commits in `lineage` (its commit and every commit it descends from:
    gitops.ancestry(root, commit)), the champion row's own included; of every clean run of
    the protocol when it does not descend from the protocol's first clean run (an orphan
    branch, or one started before that run). A pipeline cannot lower it by sandbagging a run
    of its own: a later BASELINE on a new branch or a re-run as the champion (red team: KEEP
    +39-49 % for no-ops, once per branch), nor by baselining slowed code first on a new
    branch (red team: KEEP +45 % per branch), an orphan one (+43-49 %, its code measured
    before) or one whose history was grafted away (+48 %)."""
    protocol, code = champion.get("protocol"), champion.get("code_hash")
    if not _float(champion.get("yardstick_ratio")) > 0:
        return None, None
    clean = [row for row in rows if _clean_run(row, protocol) and _float(row.get("yardstick_ratio")) > 0]
    lineage = set(lineage)
    if clean and clean[0].get("commit") not in lineage:  # not descended from the protocol's first run
        lineage = {row.get("commit") for row in clean}
    best = (None, None)
    for row in clean + [champion]:
        if row is champion or row.get("commit") in lineage or (code and row.get("code_hash") == code):
            ratio, se = _float(row.get("yardstick_ratio")), _float(row.get("yardstick_se"))
            if ratio > 0 and se > 0 and (best[0] is None or math.log(ratio) > best[0]):  # nan fails
                best = (math.log(ratio), se)
    return best


def usual_spread(rows, *, protocol, newest=20):
    """The median per-pair spread of this protocol's newest `newest` comparisons the harness
    wrote (None with fewer than 3): what this machine's noise usually is."""
    spreads = []
    for row in reversed(rows):
        try:
            spread = float(row.get("pair_spread") or "nan")
        except ValueError:
            continue
        if row.get("protocol") == protocol and row.get("trusted", True) and spread == spread:
            spreads.append(spread)
        if len(spreads) == newest:
            break
    return statistics.median(spreads) if len(spreads) >= 3 else None


def branch_baseline(rows, ancestry, branch):
    """This branch's newest BASELINE row whose commit is in `ancestry`, whatever its protocol,
    or None: the commit every file but inference.py is locked to."""
    history = set(ancestry)
    for row in reversed(rows):
        if (row.get("decision") == Decision.BASELINE and row.get("commit") in history
                and row.get("branch") == branch and row.get("trusted", True)):
            return row
    return None


def branch_rows(rows, branch):
    """The rows run on `branch` (its `branch` column), in file order: kept, reverted and
    crashed alike, including commits a reset has since removed from the branch's history."""
    return [row for row in rows if row.get("branch") == branch]


def kept_since_baseline(rows, ancestry, branch, protocol):
    """(baseline row, [KEEP rows]) of the chain that leads to this branch's champion.

    The baseline is the newest clean, trusted BASELINE of `branch` and `protocol` whose commit
    is in `ancestry`; the KEEPs are the clean, trusted KEEP rows of the same branch and protocol after it
    (in file order) whose commits are in `ancestry`. (None, []) when there is no baseline.
    """
    history = set(ancestry)

    def ours(row):
        return (row.get("branch") == branch and row.get("protocol") == protocol
                and row.get("dirty") != "true" and row.get("trusted", True)
                and row.get("commit") in history)

    baseline = next((row for row in reversed(rows)
                     if row.get("decision") == Decision.BASELINE and ours(row)), None)
    if baseline is None:
        return None, []
    keeps = [row for row in rows if row.get("decision") == Decision.KEEP and ours(row)
             and row["line"] > baseline["line"]]
    return baseline, keeps
