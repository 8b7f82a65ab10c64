"""`python prepare.py log [--all] [--summary] [--json]`: this branch's experiments from results.tsv.

One line per run, oldest first: commit, subject, decision, speedup against the champion
with its 95 % interval, decode tok/s, whether the quality gates passed, and the reason.

Which runs are shown:
  * this branch's runs: every row whose `branch` column is the current branch (kept,
    reverted, crashed ...), including commits a `git reset` has since removed from the
    branch (marked `x`). The champion (the run a new commit must beat) is marked `*`; a
    row the harness did not write (see harness/ledger.py) is marked `!`.
  * runs of other branches whose commits are in this branch's history (for example
    the quick start's BASELINE on `main`), in a separate section labelled with their
    branch: they are never compared with this branch's runs.
  * runs of other branches outside this branch's history are hidden and counted;
    `--all` shows them in that section too.
A malformed ledger line is reported on stderr and skipped.

`--summary` prints the morning summary instead (see harness/summary.py); `--json`
prints one JSON object on stdout instead of the text.
"""

import json
import sys
from pathlib import Path

from harness import gitops, ledger
from harness.settings import ROOT

SUBJECT_WIDTH = 34
REASON_WIDTH = 90


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def format_speedup(speedup, low=None, high=None):
    """A speed ratio as a percentage with its interval: 1.041, 1.02, 1.063 -> '+4.1 % [+2.0, +6.3]'."""
    ratio, low, high = _number(speedup), _number(low), _number(high)
    if ratio is None:
        return "-"
    text = f"{(ratio - 1) * 100:+.1f} %"
    if low is not None and high is not None:
        text += f" [{(low - 1) * 100:+.1f}, {(high - 1) * 100:+.1f}]"
    return text


def _quality(row):
    value = row.get("quality_pass")
    return {"true": "pass", "false": "FAIL"}.get(value, "-")


def _tps(row):
    value = _number(row.get("decode_tps"))
    return "-" if value is None else f"{value:.1f}"


def _cut(text, width):
    text = text.replace("\t", " ")  # a tab in a subject (csv carries it) would break the columns
    return text if len(text) <= width else text[:width - 3] + "..."


def history(root, *, show_all=False):
    """Read `root`/results.tsv against the git state at `root`.

    Returns {"rows", "champion", "problems", "hidden", "protocol", "branch"}:
        rows: the rows shown, in file order, each a ledger row plus "in_history" (its
            commit is HEAD or an ancestor), "this_branch" (run on the current branch) and
            "champion" (it is the champion);
        champion: the champion row or None; problems: malformed-line messages;
        hidden: rows of other branches not shown (outside this branch's history, without
            show_all); protocol: the newest protocol in this branch's history;
        branch: the current branch ('' on a detached HEAD).
    """
    root = Path(root)
    rows, problems = ledger.read(root / "results.tsv")
    ancestry = gitops.ancestry(root)
    history_set = set(ancestry)
    protocol = ledger.newest_protocol(rows, ancestry)
    branch = gitops.state(root)["branch"]
    champion = ledger.champion_row(rows, ancestry, protocol=protocol, branch=branch)
    shown = []
    for row in rows:
        in_history = row["commit"] in history_set
        this_branch = row["branch"] == branch
        if this_branch or in_history or show_all:
            shown.append(dict(row, in_history=in_history, this_branch=this_branch,
                              champion=row is champion))
    return {"rows": shown, "champion": champion, "problems": problems,
            "hidden": len(rows) - len(shown), "protocol": protocol, "branch": branch}


HEADER = ["", "commit", "subject", "decision", "speedup [95% CI]", "decode tok/s", "quality", "reason"]


def _table_lines(rows, *, with_branch=False):
    """Text lines of one table of runs, a protocol line before each change of protocol."""
    header = HEADER[:2] + ["branch"] + HEADER[2:] if with_branch else HEADER
    table, protocol = [], None
    for row in rows:
        if row["protocol"] != protocol:
            # speedups and speeds are only comparable within one protocol
            protocol = row["protocol"]
            table.append(f"-- protocol {protocol or '?'}: {row['model']} ({row['preset']}) --")
        mark = "*" if row["champion"] else ("x" if not row["in_history"] else "")
        mark = "!" if not row.get("trusted", True) else mark
        commit = row["commit"] + ("+" if row["dirty"] == "true" else "")
        cells = [mark, commit, _cut(row["subject"], SUBJECT_WIDTH), row["decision"],
                 format_speedup(row["speedup"], row["speedup_lo"], row["speedup_hi"]),
                 _tps(row), _quality(row), _cut(row["reason"], REASON_WIDTH)]
        table.append(cells[:2] + [row["branch"] or "(detached)"] + cells[2:] if with_branch else cells)
    cells = [header] + [r for r in table if isinstance(r, list)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = {len(header) - 4, len(header) - 3}  # speedup and tok/s line up on the right

    def line(r):
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(parts).rstrip()

    return [line(header)] + [r if isinstance(r, str) else line(r) for r in table]


def format_table(data):
    """The history as text for people: this branch's runs, then other branches' runs."""
    mine = [r for r in data["rows"] if r["this_branch"]]
    others = [r for r in data["rows"] if not r["this_branch"]]
    name = data["branch"] or "(detached HEAD)"
    out = [f"branch {name}: {len(mine)} run(s)"]
    out += _table_lines(mine) if mine else ["  no runs on this branch yet"]
    champion = data["champion"]
    if champion:
        out.append(f"* champion: {champion['commit']} ({champion['decision']}, results.tsv line "
                   f"{champion['line']}): `git reset --hard {champion['commit']}` goes back to it")
    else:
        out.append("no champion on this branch yet: commit inference.py and run "
                   "`.venv/bin/python prepare.py` for a baseline")
    legend = []
    if any(r["dirty"] == "true" for r in data["rows"]):
        legend.append("+ after a commit: run on uncommitted changes")
    if any(not r["in_history"] for r in data["rows"]):
        legend.append("x: no longer in this branch's history (reset away after its verdict)")
    if any(not r.get("trusted", True) for r in data["rows"]):
        legend.append("!: not written by the harness (missing from results.tsv.sha256): never a champion")
    if legend:
        out.append("; ".join(legend))
    if others:
        out += ["", "other branches (runs shown for context; never compared with this branch's):"]
        out += _table_lines(others, with_branch=True)
    if data["hidden"]:
        out.append(f"{data['hidden']} run(s) of other branches outside this branch's history "
                   f"hidden: --all shows them")
    return "\n".join(out)


def add_parser(sub):
    """Add the `log` subcommand to the argparse subparsers `sub`."""
    parser = sub.add_parser("log", help="show this branch's runs from results.tsv, champion marked *")
    parser.add_argument("--all", action="store_true", help="also show runs of other branches outside this history")
    parser.add_argument("--summary", action="store_true",
                        help="the morning summary: baseline vs champion, every experiment, counts, hours")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.set_defaults(func=run)
    return parser


def history_json(data):
    """The --json object of the history (fields are added over time, never removed)."""
    champion = data["champion"]
    return {"rows": data["rows"], "champion": champion["commit"] if champion else None,
            "protocol": data["protocol"], "hidden": data["hidden"], "problems": data["problems"],
            "branch": data["branch"]}


def run(args):
    """Print the history (or the summary); returns the exit status.

    Raises LedgerError when results.tsv has another header (prepare.py exits 2 with the message).
    """
    from harness import summary  # summary uses this module's formatting: imported when needed

    root = Path(getattr(args, "root", None) or ROOT)
    if (root / "results.tsv").exists():
        ledger.check_header(root / "results.tsv")  # LedgerError: prepare.py says what to do, exit 2
    if getattr(args, "summary", False):
        return summary.run(root, as_json=args.json)
    data = history(root, show_all=args.all)
    for problem in data["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(history_json(data), separators=(",", ":")))
        return 0
    if not (root / "results.tsv").exists():
        print("no results.tsv yet: run `.venv/bin/python prepare.py` for a baseline", file=sys.stderr)
        return 0
    print(format_table(data))
    return 0
