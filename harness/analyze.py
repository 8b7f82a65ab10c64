"""Speed/quality analysis of results.tsv files: agent runs and search trials alike.

    python prepare.py analyze FILE [FILE ...] [--target-quality Q] [--out DIR] [--json]

For each protocol (only runs of one protocol are comparable) it computes:
  * the Pareto frontier of decode tok/s against quality score, both maximized;
  * the fastest configuration reaching each quality target (0.90, 0.95, 0.99 and
    any --target-quality);
  * the progress of each branch over time: its BASELINE's tok/s times the paired
    speedups of its KEEPs (see progress()).
It writes a PNG per protocol and one markdown report to --out (default analysis/),
and prints a `key: value` summary; with --json, also one JSON object as the last line
(see analysis_json()).

Which rows count (explicit, since most mistakes hide here):
  * CRASH, INVALID and REJECT rows are excluded: they measured nothing trustworthy.
  * A row whose quality gates failed (quality_pass false) is never on the frontier
    and never a target's answer, whatever its speed.
  * A row without a quality score is "unscored": plotted in a band of its own below
    the quality axis, never on the frontier, never a target's answer. Treating it as
    perfect would put every fast run on the frontier.
  * Every other row (BASELINE, MEASURED, KEEP, REVERT, search trials) is a point.
"""

import json
import math
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from harness import ledger
from harness.report import note
from harness.settings import ROOT

DEFAULT_TARGETS = (0.90, 0.95, 0.99)
EXCLUDED = ("CRASH", "INVALID", "REJECT")
KEPT = ("BASELINE", "KEEP")


class AnalyzeError(Exception):
    """Bad input the user can fix (missing or empty file); str(e) is one line."""


def _float(cell):
    try:
        value = float(cell) if cell not in ("", None) else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _time(cell):
    try:
        return datetime.fromisoformat(cell)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Reading and classifying
# ---------------------------------------------------------------------------
def load_points(paths):
    """Read results.tsv files into point dicts. Raises AnalyzeError for missing or empty input.

    Each point: file, line, timestamp, source, decision, branch, commit, subject,
    protocol, model, preset, decode_tps, quality, quality_pass, config, status, where
    status is one of "excluded", "quality_failed", "unscored", "scored".
    """
    points = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise AnalyzeError(f"{path} not found: pass results.tsv files written by prepare.py")
        try:
            ledger.check_header(path)
        except ledger.LedgerError:
            raise AnalyzeError(f"{path} is not a results.tsv written by this harness (its header differs)") from None
        rows, problems = ledger.read(path)
        for problem in problems:
            note(f"warning: {problem}")
        for row in rows:
            points.append(point(row, str(path)))
    if not points:
        raise AnalyzeError(f"no rows in {', '.join(str(p) for p in paths)}: run prepare.py (or search) first")
    return points


def point(row, file="results.tsv"):
    """One results.tsv row as a point for the analysis (see load_points)."""
    decode = _float(row.get("decode_tps"))
    quality = _float(row.get("quality_score"))
    passed = {"true": True, "false": False}.get(row.get("quality_pass", ""))
    decision = row.get("decision", "")
    if decision in EXCLUDED or decode is None:
        status = "excluded"
    elif passed is False:
        status = "quality_failed"
    elif quality is None:
        status = "unscored"
    else:
        status = "scored"
    return {"file": file, "line": row.get("line"), "timestamp": _time(row.get("timestamp")),
            "source": row.get("source") or "agent", "decision": decision, "reason": row.get("reason", ""),
            "branch": row.get("branch", ""), "commit": row.get("commit", ""), "subject": row.get("subject", ""),
            "protocol": row.get("protocol", ""), "model": row.get("model", ""), "preset": row.get("preset", ""),
            "decode_tps": decode, "speedup": _float(row.get("speedup")), "quality": quality,
            "quality_pass": passed,
            "config": row.get("config", ""), "status": status}


def kind(p):
    """How a point is drawn: search, kept, reverted or measured."""
    if p["source"] == "search":
        return "search"
    if p["decision"] in KEPT:
        return "kept"
    if p["decision"] == "REVERT":
        return "reverted"
    return "measured"


# ---------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------
def pareto_frontier(pairs):
    """Indices of the non-dominated (speed, quality) pairs, both maximized, fastest first.

    A pair is dominated when another is at least as good in both and better in one.
    Equal pairs do not dominate each other: both stay.
    """
    frontier = []
    for i, (s, q) in enumerate(pairs):
        dominated = any(s2 >= s and q2 >= q and (s2 > s or q2 > q) for s2, q2 in pairs)
        if not dominated:
            frontier.append(i)
    return sorted(frontier, key=lambda i: (-pairs[i][0], pairs[i][1]))


def eligible(points):
    """Points that may be on the frontier or answer a target: scored, gates passed."""
    return [p for p in points if p["status"] == "scored"]


def frontier_points(points):
    """The frontier of `points` (fastest first)."""
    good = eligible(points)
    return [good[i] for i in pareto_frontier([(p["decode_tps"], p["quality"]) for p in good])]


def best_at_targets(points, targets):
    """{target: the fastest eligible point with quality >= target, or None}."""
    good = eligible(points)
    out = {}
    for target in targets:
        reaching = [p for p in good if p["quality"] >= target]
        out[target] = max(reaching, key=lambda p: p["decode_tps"]) if reaching else None
    return out


def progress(points):
    """{branch: [(time, decode tok/s of the kept line), ...]} over its BASELINE/KEEP rows in time order.

    The line starts at the BASELINE's tok/s and each KEEP multiplies it by the KEEP's
    paired speedup (champion and challenger measured side by side). Absolute tok/s of
    runs taken at different times swing with the machine's load; the paired ratios do
    not, so this line only rises, by what each kept change was shown to win. A KEEP
    without a speedup moves the line to its own tok/s if that is higher.
    """
    out = {}
    kept = sorted((p for p in points if p["decision"] in KEPT and p["source"] != "search"
                   and p["status"] != "excluded" and p["timestamp"]), key=lambda p: p["timestamp"])
    for p in kept:
        line = out.setdefault(p["branch"] or "-", [])
        if p["decision"] == "BASELINE" or not line:
            level = p["decode_tps"]
        elif p["speedup"]:
            level = line[-1][1] * max(p["speedup"], 1.0)
        else:
            level = max(line[-1][1], p["decode_tps"])
        line.append((p["timestamp"], level))
    return out


def describe(p):
    """What a point is, for tables: the knobs of a search trial, the commit subject of a run."""
    if p["source"] == "search" and p["config"]:
        return f"search `{p['config']}`"
    return f"`{p['commit']}` {p['subject']}".strip()


# ---------------------------------------------------------------------------
# Plot and tables
# ---------------------------------------------------------------------------
STYLE = {  # kind: (marker, color, label)
    "kept": ("o", "#2ca02c", "kept (BASELINE/KEEP)"),
    "reverted": ("x", "#d62728", "reverted (REVERT)"),
    "measured": ("s", "#1f77b4", "measured (agent)"),
    "search": ("^", "#ff7f0e", "search trial"),
}


def plot(points, frontier, targets, path, title):
    """Write the two-panel PNG: speed vs quality with the frontier, and progress over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 10), gridspec_kw={"height_ratios": [3, 2]})
    draw_quality_panel(top, points, frontier, targets, title)
    draw_progress_panel(bottom, points)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_axis(points, targets):
    """(q_low, q_high, span, band) of the quality axis; band is where unscored points sit."""
    scored = [p for p in points if p["status"] != "excluded" and p["quality"] is not None]
    qualities = [p["quality"] for p in scored] + [t for t in targets if scored]
    q_low, q_high = (min(qualities), max(qualities)) if qualities else (0.0, 1.0)
    span = max(q_high - q_low, 0.02)
    band = q_low - 0.15 * span  # below every real score, so an unscored point never reads as a score
    return q_low, q_high, span, band


def draw_quality_panel(ax, points, frontier, targets, title):
    """Top panel: every point by kind and status, the frontier, the quality targets."""
    shown = [p for p in points if p["status"] != "excluded"]
    has_scores = any(p["quality"] is not None for p in shown)
    q_low, q_high, span, band = quality_axis(points, targets)
    for k in STYLE:
        _scatter_kind(ax, [p for p in shown if kind(p) == k], STYLE[k], band)
    _draw_frontier(ax, frontier)
    if has_scores:  # with no score on the axis a target line has nothing to compare with
        _draw_targets(ax, targets)
    if any(p["quality"] is None for p in shown):
        _draw_no_score_band(ax, has_scores, q_low, q_high, span, band)
    ax.set_xlabel("decode speed (tokens/s, median over the workload's calls)")
    ax.set_ylabel("quality score (1.0 = the float32 reference)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def _scatter_kind(ax, mine, style, band):
    """One kind's points: scored in colour, gate failures grey, unscored in the band."""
    marker, color, label = style
    ok = [p for p in mine if p["status"] == "scored"]
    failed = [p for p in mine if p["status"] == "quality_failed" and p["quality"] is not None]
    no_score = [p for p in mine if p["quality"] is None]
    if ok:
        ax.scatter([p["decode_tps"] for p in ok], [p["quality"] for p in ok], marker=marker,
                   color=color, s=45, alpha=0.85, label=label, zorder=3)
    if failed:  # grey (hollow where the marker can be): measured, but its quality gates failed
        face = {"color": "grey"} if marker == "x" else {"facecolors": "none", "edgecolors": "grey"}
        ax.scatter([p["decode_tps"] for p in failed], [p["quality"] for p in failed], marker=marker,
                   s=45, alpha=0.8, label=f"{label.split(' (')[0]}, quality gates failed", zorder=3,
                   linewidths=1.2, **face)
    if no_score:  # labelled only when the kind has no other entry in the legend
        ax.scatter([p["decode_tps"] for p in no_score], [band] * len(no_score), marker=marker,
                   color=color, s=30, alpha=0.5, zorder=3, label=None if ok or failed else label)


def _draw_frontier(ax, frontier):
    """The frontier as a black step line, its points ringed."""
    if not frontier:
        return
    xs = [p["decode_tps"] for p in reversed(frontier)]  # slowest first
    ys = [p["quality"] for p in reversed(frontier)]
    ax.step(xs, ys, where="pre", color="black", linewidth=1.6, zorder=2, label="Pareto frontier")
    ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)


def _draw_targets(ax, targets):
    """Each quality target as a dotted line, labelled at the right edge."""
    for target in targets:
        ax.axhline(target, color="grey", linestyle=":", linewidth=0.8, zorder=1)
        ax.annotate(f"quality {target:g}", (1.0, target), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=8, color="grey")


def _draw_no_score_band(ax, has_scores, q_low, q_high, span, band):
    """Give unscored points a band of their own, with its own tick, below every real score."""
    if has_scores:
        ax.axhline((band + q_low) / 2, color="lightgrey", linewidth=0.8, zorder=1)
        ax.set_ylim(band - 0.1 * span, q_high + 0.1 * span)
        ticks = [t for t in ax.get_yticks() if (band + q_low) / 2 < t <= q_high + 0.1 * span]
    else:
        ax.set_ylim(band - 0.5 * span, band + 0.5 * span)
        ticks = []
        ax.text(0.5, 0.75, "no row has a quality score: the frontier needs quality_score",
                transform=ax.transAxes, ha="center", fontsize=9, color="grey")
    ax.set_yticks(ticks + [band], [f"{t:g}" for t in ticks] + ["no score"])


def draw_progress_panel(ax, points):
    """Bottom panel: decode tok/s of every run over time, each branch's kept line, failures."""
    import matplotlib.dates as mdates

    _draw_kept_lines(ax, points)
    shown = [p for p in points if p["status"] != "excluded"]
    for k in ("kept", "reverted", "measured", "search"):
        mine = [p for p in shown if kind(p) == k and p["timestamp"]]
        if mine:
            marker, color, label = STYLE[k]
            ax.scatter([p["timestamp"] for p in mine], [p["decode_tps"] for p in mine], marker=marker,
                       color=color, s=25, alpha=0.7, label=label, zorder=3)
    _draw_failures(ax, points)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.set_xlabel("time of the run (UTC)")
    ax.set_ylabel("decode speed (tokens/s)")
    ax.set_title("progress over time", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _draw_kept_lines(ax, points):
    """Each branch's kept line (see progress()), held level a little past the last run."""
    stamps = [p["timestamp"] for p in points if p["timestamp"]]
    end = max(stamps) + max((max(stamps) - min(stamps)) * 0.03, timedelta(seconds=1)) if stamps else None
    for branch, series in progress(points).items():
        times = [t for t, _ in series] + [end]  # the line holds its level past the last run
        best = [b for _, b in series] + [series[-1][1]]
        ax.step(times, best, where="post", linewidth=1.8,
                label=f"kept line, {branch}: baseline x paired speedups of KEEPs")


def _draw_failures(ax, points):
    """CRASH/INVALID/REJECT runs as dashed vertical lines, with one legend entry for all."""
    failures = [p for p in points if p["status"] == "excluded" and p["timestamp"]]
    if not failures:
        return
    for p in failures:
        ax.axvline(p["timestamp"], color="black", alpha=0.25, linewidth=0.8, linestyle="--")
    ax.plot([], [], color="black", alpha=0.4, linestyle="--", label=f"CRASH/INVALID/REJECT ({len(failures)})")


def _format_number(value, digits=4):
    """A number for tables and the key: value block: 4 significant digits, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}g}"


def _format_quality(value):
    """A quality score: enough digits to tell close scores apart."""
    return _format_number(value, 6)


def _format_excluded_by(excluded_by):
    """{decision: count} as 'CRASH 2, REJECT 1' (sorted), '' when nothing was excluded."""
    return ", ".join(f"{k} {v}" for k, v in sorted(excluded_by.items()))


def markdown(groups, targets):
    """The markdown report: per protocol, the best point per target and the frontier."""
    out = ["# Speed/quality analysis", ""]
    for g in groups:
        c = g["counts"]
        out += [f"## protocol `{g['protocol']}` ({g['model']}, {g['preset']} workload)", "",
                f"![speed vs quality]({g['plot'].name})", "",
                f"{c['points']} points ({c['scored']} scored, {c['unscored']} unscored, "
                f"{c['quality_failed']} failed quality gates); "
                f"{c['excluded']} rows excluded ({_format_excluded_by(c['excluded_by']) or 'none'}).", "",
                "### Best configuration per quality target", "",
                "| quality target | decode tok/s | quality | source | decision | configuration | row |",
                "|---|---|---|---|---|---|---|"]
        for target in targets:
            p = g["best"][target]
            if p is None:
                out.append(f"| {target:g} | - | - | - | - | no row reaches this quality | - |")
            else:
                out.append(f"| {target:g} | {_format_number(p['decode_tps'])} | {_format_quality(p['quality'])} | "
                           f"{p['source']} | {p['decision']} | {describe(p)} | {p['file']}:{p['line']} |")
        out += ["", "### Pareto frontier (fastest first)", "",
                "| decode tok/s | quality | source | decision | configuration | row |", "|---|---|---|---|---|---|"]
        for p in g["frontier"]:
            out.append(f"| {_format_number(p['decode_tps'])} | {_format_quality(p['quality'])} | {p['source']} | "
                       f"{p['decision']} | {describe(p)} | {p['file']}:{p['line']} |")
        if not g["frontier"]:
            out.append("| - | - | - | - | no scored row: the frontier needs quality_score | - |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def row_counts(points):
    """How many rows of one protocol fall in each class (see the module docstring)."""
    statuses = Counter(p["status"] for p in points)
    return {"rows": len(points), "agent": sum(p["source"] != "search" for p in points),
            "search": sum(p["source"] == "search" for p in points),
            "points": len(points) - statuses["excluded"], "scored": statuses["scored"],
            "unscored": statuses["unscored"], "quality_failed": statuses["quality_failed"],
            "excluded": statuses["excluded"],
            "excluded_by": dict(Counter(p["decision"] or "no speed" for p in points
                                        if p["status"] == "excluded"))}


def analyze(paths, targets, out_dir):
    """Run the whole analysis; returns (groups, report): one group per protocol, and the markdown's path.

    A group: protocol, model, preset, points, counts, frontier, best ({target: point or None})
    and plot (the PNG's path).
    """
    points = load_points(paths)
    by_protocol = {}
    for p in points:
        by_protocol.setdefault(p["protocol"] or "-", []).append(p)
    groups = []
    for protocol, mine in sorted(by_protocol.items(), key=lambda kv: -len(kv[1])):
        first = next((p for p in mine if p["model"]), mine[0])
        c = row_counts(mine)
        frontier = frontier_points(mine)
        path = Path(out_dir) / f"pareto-{protocol}.png"
        title = (f"{first['model']}  |  protocol {protocol}  |  {first['preset']} workload\n"
                 f"{c['agent']} agent runs, {c['search']} search trials, {c['excluded']} excluded")
        plot(mine, frontier, targets, path, title)
        groups.append({"protocol": protocol, "model": first["model"], "preset": first["preset"],
                       "points": mine, "counts": c, "frontier": frontier,
                       "best": best_at_targets(mine, targets), "plot": path})
    report = Path(out_dir) / "analysis.md"
    report.write_text(markdown(groups, targets))
    return groups, report


def _point_text(p):
    """A frontier or best point on one line of the key: value block."""
    return (f"decode_tps={_format_number(p['decode_tps'])} quality={_format_quality(p['quality'])} "
            f"source={p['source']} row={p['file']}:{p['line']}")


def analysis_block(groups, report, paths, targets):
    """The printed `key: value` block of `analyze`."""
    lines = ["---", f"files: {' '.join(str(p) for p in paths)}", f"protocols: {len(groups)}"]
    for g in groups:
        c = g["counts"]
        lines += [f"protocol: {g['protocol']}", f"model: {g['model']}", f"preset: {g['preset']}",
                  f"rows: {c['rows']} (agent {c['agent']}, search {c['search']})",
                  f"points: {c['points']} (scored {c['scored']}, unscored {c['unscored']}, "
                  f"quality_failed {c['quality_failed']})",
                  f"excluded: {c['excluded']}" + (f" ({_format_excluded_by(c['excluded_by'])})"
                                                  if c["excluded"] else ""),
                  f"frontier: {len(g['frontier'])}"]
        for i, p in enumerate(g["frontier"]):
            lines.append(f"frontier_{i}: {_point_text(p)}")
        for target in targets:
            p = g["best"][target]
            lines.append(f"best_at_{target:g}: " + ("none" if p is None else _point_text(p)))
        lines.append(f"plot: {g['plot']}")
    lines.append(f"table: {report}")
    return "\n".join(lines)


def point_json(p):
    """A point for --json: where its row is, and that row's values (results.tsv's column names)."""
    return {"file": p["file"], "line": p["line"],
            "timestamp": p["timestamp"].isoformat() if p["timestamp"] else None,
            "source": p["source"], "decision": p["decision"], "reason": p["reason"], "branch": p["branch"],
            "commit": p["commit"], "subject": p["subject"], "decode_tps": p["decode_tps"],
            "quality_score": p["quality"], "quality_pass": p["quality_pass"], "speedup": p["speedup"],
            "config": p["config"] or None}


def analysis_json(groups, report, paths, targets):
    """The --json object: what analysis_block says, with whole rows instead of one-line summaries."""
    protocols = []
    for g in groups:
        protocols.append({
            "protocol": g["protocol"], "model": g["model"], "preset": g["preset"], "counts": g["counts"],
            "frontier": [point_json(p) for p in g["frontier"]],
            # JSON keys are strings: the target as the key: value block writes it (best_at_0.9)
            "best": {f"{t:g}": None if g["best"][t] is None else point_json(g["best"][t]) for t in targets},
            "plot": str(g["plot"])})
    return {"files": [str(p) for p in paths], "targets": list(targets), "protocols": protocols,
            "table": str(report), "written": [str(g["plot"]) for g in groups] + [str(report)]}


def add_parser(sub):
    """Add the `analyze` subcommand to argparse subparsers `sub`."""
    p = sub.add_parser("analyze", help="Pareto frontier of speed vs quality, best config per quality target, plot")
    p.add_argument("files", nargs="+", metavar="FILE", help="results.tsv files (agent runs and search trials)")
    p.add_argument("--target-quality", type=float, action="append", default=[], metavar="Q",
                   help=f"also report the fastest configuration with quality >= Q "
                        f"(always: {', '.join(f'{t:g}' for t in DEFAULT_TARGETS)}); may repeat")
    p.add_argument("--out", default=None, help="folder for the PNG and the markdown (default: analysis/)")
    p.add_argument("--json", action="store_true",
                   help="also print the analysis as one JSON object, the last line of stdout")
    p.set_defaults(func=run)


def run(args):
    """`python prepare.py analyze`: write the plot(s) and the report, print the summary. Exit status."""
    targets = sorted(set(DEFAULT_TARGETS) | set(args.target_quality))
    out_dir = Path(args.out) if args.out else ROOT / "analysis"
    try:
        groups, report = analyze(args.files, targets, out_dir)
    except AnalyzeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(analysis_block(groups, report, args.files, targets))
    if args.json:
        print(json.dumps(analysis_json(groups, report, args.files, targets), separators=(",", ":")))
    return 0
