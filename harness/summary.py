"""The morning summary of a branch: `python prepare.py log --summary [--json]`.

Built from results.tsv and git alone (the run files add only the hours spent):
  * baseline vs champion: decode, prefill, time to first token, memory, perplexity, KL,
    top-1, sanity and quality score of this branch's BASELINE and its current champion,
    and the chained speedup: the product of the paired speedups of the KEEPs that lead
    from the baseline to the champion. Absolute tok/s of two runs taken hours apart swing
    with the machine's load; the chained speedup is what side-by-side runs showed.
  * every experiment of the branch (its agent runs of the champion's protocol, in order):
    decision, speedup with its 95 % interval, speeds, quality, code lines against the
    baseline, the change monitor's tradeoff warnings, and the reason.
  * counts by decision and the hours spent.
`harness/morning.py` renders the same data as an HTML page.
"""

import json
import re
import sys
from datetime import datetime
from pathlib import Path

from harness import gitops, ledger
from harness.log import format_speedup, history

# (label, column, how the change is shown: "relative" %, "absolute" difference, or None)
METRICS = [
    ("decode tok/s", "decode_tps", "relative"),
    ("prefill tok/s", "prefill_tps", "relative"),
    ("time to first token (s)", "ttft_s", "relative"),
    ("peak memory (GB)", "peak_memory_gb", "relative"),
    ("perplexity", "perplexity", "relative"),
    ("KL mean (nats)", "kl_mean", "absolute"),
    ("top-1 agreement", "top1_agreement", "absolute"),
    ("sanity (tasks passed)", "sanity", "absolute"),
    ("quality score", "quality_score", "absolute"),
    ("quality gates", "quality_pass", None),
]
DECISION_ORDER = ["BASELINE", "KEEP", "REVERT", "CRASH", "INVALID", "REJECT", "MEASURED"]


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def lines_delta(changes):
    """Code lines against the baseline from a `changes` cell ('...; -12 lines; ...' -> -12), or None."""
    match = re.search(r"(?:^|; )([+-]\d+) lines(?:;|$)", changes or "")
    return int(match.group(1)) if match else None


def warning_ids(changes):
    """The tradeoff warnings' ids from a `changes` cell ('...; warnings: argmax, compile' -> [...])."""
    match = re.search(r"(?:^|; )warnings: (.*)$", changes or "")
    if not match:
        return []
    return [w.strip() for w in match.group(1).rstrip(".").split(",") if w.strip()]


def _hours(rows, root):
    """(first timestamp, last timestamp, hours between them, hours of run time or None).

    Run time adds up `elapsed_s` from the rows' run files, when every one can be read."""
    stamps = sorted(t for t in (_time(r["timestamp"]) for r in rows) if t)
    if not stamps:
        return None, None, None, None
    elapsed = []
    for row in rows:
        try:
            result = json.loads((Path(root) / row["run_file"]).read_text())["result"]
            elapsed.append(float(result["elapsed_s"]))
        except (OSError, ValueError, KeyError, TypeError):
            elapsed = None
            break
    span = (stamps[-1] - stamps[0]).total_seconds() / 3600
    return stamps[0], stamps[-1], span, (sum(elapsed) / 3600 if elapsed else None)


def _time(text):
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _monitor_from_run_file(root, row):
    """(lines, warning ids) against the baseline from the row's run file, or (None, []).

    For `changes` cells cut short before they ended with the line delta (ledgers written
    before harness/monitor.py kept that tail whole)."""
    try:
        changes = json.loads((Path(root) / row["run_file"]).read_text())["changes"]["vs_baseline"]
        return changes["lines"]["delta"], [w["id"] for w in changes["warnings"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def experiment(row, number, root="."):
    """One row of the experiment table as plain data."""
    lines, warnings = lines_delta(row["changes"]), warning_ids(row["changes"])
    if lines is None and row["changes"].endswith("..."):
        lines, warnings = _monitor_from_run_file(root, row)
    return {"number": number, "line": row["line"], "commit": row["commit"], "subject": row["subject"],
            "decision": row["decision"], "speedup": _number(row["speedup"]),
            "speedup_lo": _number(row["speedup_lo"]), "speedup_hi": _number(row["speedup_hi"]),
            "decode_tps": _number(row["decode_tps"]), "prefill_tps": _number(row["prefill_tps"]),
            "perplexity": _number(row["perplexity"]), "kl_mean": _number(row["kl_mean"]),
            "sanity": _number(row["sanity"]), "quality_pass": row["quality_pass"] or None,
            "lines": lines, "warnings": warnings,
            "reason": row["reason"], "dirty": row["dirty"] == "true",
            "in_history": row["in_history"], "champion": row["champion"], "timestamp": row["timestamp"]}


def _metrics(baseline, champion):
    """[{label, column, baseline, champion, change}] for the baseline-vs-champion table."""
    out = []
    for label, column, how in METRICS:
        before = baseline.get(column) if baseline else None
        after = champion.get(column) if champion else None
        b, a = _number(before), _number(after)
        change = None
        if how == "relative" and b and a is not None:
            change = f"{(a / b - 1) * 100:+.1f} %"
        elif how == "absolute" and b is not None and a is not None:
            change = f"{a - b:+.3g}"
        if how is None:  # quality_pass: text, not a number
            b, a = (before or None), (after or None)
        out.append({"label": label, "column": column, "baseline": b, "champion": a, "change": change})
    return out


def build(root):
    """The summary of the current branch of the repository at `root`, as plain data
    (the --json object; see the module docstring)."""
    root = Path(root)
    data = history(root)
    rows, _ = ledger.read(root / "results.tsv")
    branch, protocol, champion = data["branch"], data["protocol"], data["champion"]
    if champion:
        protocol = champion["protocol"]
    baseline, keeps = ledger.kept_since_baseline(rows, gitops.ancestry(root), branch, protocol)
    if champion:  # only the KEEPs up to the champion: it is the newest, but be explicit
        keeps = [k for k in keeps if k["line"] <= champion["line"]]
    chained = 1.0
    for keep in keeps:
        chained *= _number(keep["speedup"]) or 1.0
    mine = [r for r in data["rows"] if r["this_branch"]]
    agent = [r for r in mine if r["source"] != "search"]
    experiments = [experiment(r, i, root) for i, r in enumerate(r for r in agent if r["protocol"] == protocol)]
    first, last, span, run_hours = _hours(mine, root)
    counts = {}
    for r in agent:
        counts[r["decision"]] = counts.get(r["decision"], 0) + 1
    shown = next((r for r in agent if r["protocol"] == protocol), None)
    return {"branch": branch, "protocol": protocol,
            "model": shown["model"] if shown else None, "preset": shown["preset"] if shown else None,
            "baseline": _commit_of(baseline), "champion": _commit_of(champion),
            "metrics": _metrics(baseline, champion),
            "chained_speedup": chained if baseline else None,
            "champion_warnings": warning_ids(champion["changes"]) if champion else [],
            "keeps": [{"commit": k["commit"], "subject": k["subject"], "speedup": _number(k["speedup"])}
                      for k in keeps],
            "experiments": experiments,
            "counts": {d: counts[d] for d in DECISION_ORDER if d in counts},
            "other_protocols": sum(1 for r in agent if r["protocol"] != protocol),
            "search_trials": sum(1 for r in mine if r["source"] == "search"),
            "first_run": first.isoformat() if first else None, "last_run": last.isoformat() if last else None,
            "span_hours": span, "run_hours": run_hours, "problems": data["problems"]}


def _commit_of(row):
    return {"commit": row["commit"], "subject": row["subject"], "line": row["line"],
            "decision": row["decision"]} if row else None


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------
def show(value, digits=4):
    """A figure for tables: 4 significant digits, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _grid(header, rows, right=()):
    """Rows of cells as aligned text lines (columns in `right` right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _cut(text, width):
    text = (text or "").replace("\t", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def counts_text(data):
    """'BASELINE 1, KEEP 2, REVERT 3' and the hours, one line."""
    counts = ", ".join(f"{d} {n}" for d, n in data["counts"].items()) or "no runs"
    text = f"runs: {sum(data['counts'].values())} ({counts})"
    if data["search_trials"]:
        text += f"; {data['search_trials']} search trial(s) (see `prepare.py analyze`)"
    if data["span_hours"] is not None:
        text += f"; {duration(data['span_hours'])} from the first run's start to the last's"
    if data["run_hours"] is not None:
        text += f", {duration(data['run_hours'])} of run time"
    return text


def duration(hours):
    """Hours for people: '7.6 h', or '12 min' under an hour."""
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def experiment_cells(e):
    """The text cells of one experiment (shared by the text and HTML tables)."""
    mark = "*" if e["champion"] else ("x" if not e["in_history"] else "")
    return [str(e["number"]), mark, e["commit"] + ("+" if e["dirty"] else ""), e["subject"], e["decision"],
            format_speedup(e["speedup"], e["speedup_lo"], e["speedup_hi"]),
            show(e["decode_tps"]), show(e["prefill_tps"]), show(e["perplexity"]), show(e["sanity"], 3),
            "-" if e["lines"] is None else f"{e['lines']:+d}", ", ".join(e["warnings"]) or "-", e["reason"]]


EXPERIMENT_HEADER = ["#", "", "commit", "experiment", "decision", "speedup [95% CI]", "decode tok/s",
                     "prefill tok/s", "ppl", "sanity", "lines", "tradeoff warnings", "reason"]


def format_text(data):
    """The summary as text for people (what `log --summary` prints)."""
    out = [f"# Morning summary: branch {data['branch'] or '(detached HEAD)'}"]
    if data["model"]:
        out.append(f"model {data['model']}, {data['preset']} workload, protocol {data['protocol']}")
    out.append(counts_text(data))
    out += ["", "## Baseline vs champion"]
    if data["baseline"] is None:
        out.append("no baseline on this branch yet: run `.venv/bin/python prepare.py`")
    else:
        base, champ = data["baseline"], data["champion"] or data["baseline"]
        rows = [[m["label"], show(m["baseline"]), show(m["champion"]), m["change"] or ""] for m in data["metrics"]]
        out += _grid(["metric", f"baseline {base['commit']}", f"champion {champ['commit']}", "change"],
                     rows, right={1, 2, 3})
        keeps = data["keeps"]
        out.append(f"chained speedup: {format_speedup(data['chained_speedup'])} "
                   f"(product of the paired speedups of {len(keeps)} KEEP(s) since the baseline"
                   + (": " + ", ".join(f"{k['commit']} {format_speedup(k['speedup'])}" for k in keeps)
                      if keeps else "") + ")")
        out.append("(the decode tok/s change compares two runs taken at different times; "
                   "the chained speedup is what side-by-side runs showed)")
        out.append("tradeoffs the champion carries (vs the baseline): "
                   + (", ".join(data["champion_warnings"]) or "none"))
    out += ["", "## Experiments"]
    cells = [[_cut(c, w) for c, w in zip(experiment_cells(e), _WIDTHS)] for e in data["experiments"]]
    out += _grid(EXPERIMENT_HEADER, cells, right={5, 6, 7, 8, 9, 10}) if cells else ["no experiments yet"]
    legend = ["* champion", "x reset away after its verdict", "lines: code lines against the baseline"]
    out.append("; ".join(legend))
    if data["other_protocols"]:
        out.append(f"{data['other_protocols']} run(s) of other protocols (another model, preset or "
                   f"settings) not shown: `prepare.py log` lists them")
    return "\n".join(out)


# column widths of the text experiment table (the HTML page shows everything)
_WIDTHS = [4, 1, 9, 40, 8, 30, 12, 13, 8, 6, 5, 30, 70]


def run(root, *, as_json=False):
    """Print the summary of the branch at `root` (text, or one JSON object); exit status."""
    data = build(root)
    for problem in data["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if as_json:
        print(json.dumps(data, separators=(",", ":"), default=str))
    else:
        print(format_text(data))
    return 0
