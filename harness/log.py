"""`python prepare.py log [--all] [--json]`: the branch's history from results.tsv.

One line per run, oldest first: commit, subject, decision, speedup against the champion
with its 95 % interval, decode tok/s, whether the quality gates passed, and the reason.
The champion (the run a new commit must beat) is marked with `*`. Only runs of commits
in the current branch's history are shown unless --all; a malformed ledger line is
reported on stderr and skipped.
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
    """Read `root`/results.tsv against the git history at `root`.

    Returns {"rows": [row + "in_history", "champion"], "champion": row or None,
    "problems": [...], "hidden": n rows not shown, "protocol": the newest protocol}.
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
        if in_history or show_all:
            shown.append(dict(row, in_history=in_history, champion=row is champion))
    return {"rows": shown, "champion": champion, "problems": problems,
            "hidden": len(rows) - len(shown), "protocol": protocol}


def format_table(data):
    """The history as a text table with a legend, for people."""
    header = ["", "commit", "subject", "decision", "speedup [95% CI]", "decode tok/s", "quality", "reason"]
    table, protocol = [], None
    for row in data["rows"]:
        if row["protocol"] != protocol:
            # speedups and speeds are only comparable within one protocol
            protocol = row["protocol"]
            table.append(f"-- protocol {protocol or '?'}: {row['model']} ({row['preset']}) --")
        mark = "*" if row["champion"] else ("x" if not row["in_history"] else "")
        commit = row["commit"] + ("+" if row["dirty"] == "true" else "")
        table.append([mark, commit, _cut(row["subject"], SUBJECT_WIDTH), row["decision"],
                      format_speedup(row["speedup"], row["speedup_lo"], row["speedup_hi"]),
                      _tps(row), _quality(row), _cut(row["reason"], REASON_WIDTH)])
    cells = [header] + [r for r in table if isinstance(r, list)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = {4, 5}  # numbers line up on the right

    def line(r):
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(parts).rstrip()

    out = [line(header)]
    out += [r if isinstance(r, str) else line(r) for r in table]
    champion = data["champion"]
    if champion:
        out.append(f"* champion: {champion['commit']} ({champion['decision']}, results.tsv line "
                   f"{champion['line']}): `git reset --hard {champion['commit']}` goes back to it")
    else:
        out.append("no champion yet: commit inference.py and run `python prepare.py` for a baseline")
    legend = []
    if any(r["dirty"] == "true" for r in data["rows"]):
        legend.append("+ after a commit: run on uncommitted changes")
    if any(not r["in_history"] for r in data["rows"]):
        legend.append("x: not in this branch's history")
    if legend:
        out.append("; ".join(legend))
    if data["hidden"]:
        out.append(f"{data['hidden']} run(s) of commits outside this branch's history hidden: --all shows them")
    return "\n".join(out)


def add_parser(sub):
    """Add the `log` subcommand to the argparse subparsers `sub`."""
    parser = sub.add_parser("log", help="show this branch's runs from results.tsv, champion marked *")
    parser.add_argument("--all", action="store_true", help="also show runs of commits on other branches")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=run)
    return parser


def run(args):
    """Print the history; returns the exit status.

    Raises LedgerError when results.tsv has another header (prepare.py exits 2 with the message).
    """
    root = Path(getattr(args, "root", None) or ROOT)
    if (root / "results.tsv").exists():
        ledger.check_header(root / "results.tsv")  # LedgerError: prepare.py says what to do, exit 2
    data = history(root, show_all=args.all)
    for problem in data["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        champion = data["champion"]
        print(json.dumps({"rows": data["rows"], "champion": champion["commit"] if champion else None,
                          "protocol": data["protocol"], "hidden": data["hidden"],
                          "problems": data["problems"]}, separators=(",", ":")))
        return 0
    if not (root / "results.tsv").exists():
        print("no results.tsv yet: run `python prepare.py` for a baseline", file=sys.stderr)
        return 0
    print(format_table(data))
    return 0
