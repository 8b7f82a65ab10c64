"""Speed/quality analysis of results.tsv files: agent runs and search trials alike.

    python prepare.py analyze FILE [FILE ...] [--target-quality Q] [--out DIR] [--json]

For each protocol (only runs of one protocol are comparable) it computes:
  * the Pareto frontier of decode tok/s against quality score, both maximized, over the
    points the verdicts support (below);
  * the fastest supported configuration reaching each quality target (0.90, 0.95, 0.99
    and any --target-quality): the recommendations;
  * the frontier of unconfirmed search trials: candidates to confirm, not recommendations;
  * the progress of each branch over time: its BASELINE's tok/s times the paired
    speedups of its KEEPs (see progress()).
It writes a PNG per protocol and one markdown report to --out (default analysis/),
and prints a `key: value` summary; with --json, also one JSON object as the last line
(see analysis_json()).

Which rows count (explicit, since most mistakes hide here):
  * CRASH, INVALID and REJECT rows are excluded: they measured nothing trustworthy.
  * A row whose quality gates failed (quality_pass false) is never on a frontier and
    never a target's answer, whatever its speed.
  * A row without a quality score is "unscored": plotted in a band of its own below
    the quality axis, never on a frontier, never a target's answer.
  * Only what a paired verdict supports is recommended ("supported" points):
      - champions: clean BASELINE and KEEP rows of agent runs (each KEEP beat the
        champion of its time side by side), less those a later champion superseded
        (see supersede(): absolute tok/s of runs hours apart swing with the load);
      - search trials confirmed by a paired run: a later clean KEEP row of the same
        protocol whose commit's inference.py (read with git from the repository that
        holds the results file) sets every knob of the trial's `config` to the trial's
        value. Without that repository no trial counts as confirmed.
    REVERT rows and other agent runs (MEASURED) are drawn but never recommended: a
    REVERT lost (or tied) side by side, however fast its absolute tok/s looked.
"""

import json
import math
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

from harness import gitops, knobs, ledger, plots
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
    kl = _float(row.get("kl_mean"))
    # 1 - quality_score, exactly: the score is exp(-kl_mean), and its 6 stored digits round
    # 0.9999997 to 1 where kl_mean keeps 3.46e-07.
    loss = -math.expm1(-max(kl, 0.0)) if kl is not None and quality is not None else None
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
            "loss": loss, "quality_pass": passed, "dirty": row.get("dirty") == "true",
            "config": row.get("config", ""), "status": status, "confirmed_by": None,
            "confirming": None, "superseded_by": None}


def kind(p):
    """How a point is drawn: kept, reverted, measured, search or confirmed (see harness.plots)."""
    return plots.kind(p)


def is_champion(p):
    """A clean BASELINE or KEEP row of an agent run: a champion of its branch in its time."""
    return p["source"] != "search" and p["decision"] in KEPT and not p["dirty"]


def supported(p):
    """Whether a paired verdict supports recommending `p`: a champion no later champion
    superseded, or a search trial confirmed by a later paired KEEP that was not superseded
    (see confirm_trials and supersede)."""
    if p["superseded_by"]:
        return False
    return is_champion(p) or bool(p["confirmed_by"])


def supersede(points):
    """Mark each champion that a later champion of the same protocol and file beat with a
    paired verdict: set its "superseded_by" to that champion's commit.

    Champion B supersedes A when A's commit is on B's kept chain (the commits of the
    champions of B's branch before B, its BASELINE's included: every KEEP on the way
    beat or matched its predecessor side by side) and B's quality is at least A's. So a
    quick-start BASELINE on main whose commit a branch started from is superseded by that
    branch's newest KEEP, however fast its absolute tok/s looked at a quiet moment. A
    champion with a better quality score stays: it answers a higher quality target.
    A confirmed search trial goes with its confirming KEEP."""
    champions = sorted((p for p in points if is_champion(p) and p["status"] == "scored"),
                       key=lambda p: (p["file"], p["line"] or 0))
    for b in champions:
        chain = {a["commit"] for a in champions if a["branch"] == b["branch"] and a["file"] == b["file"]
                 and a["protocol"] == b["protocol"] and (a["line"] or 0) < (b["line"] or 0)}
        for a in champions:
            if (a is not b and a["commit"] in chain and a["file"] == b["file"] and a["protocol"] == b["protocol"]
                    and (a["line"] or 0) < (b["line"] or 0) and _loss(b) <= _loss(a)):
                a["superseded_by"] = b["commit"]
    for p in points:
        if p.get("confirming") is not None and p["confirming"]["superseded_by"]:
            p["superseded_by"] = p["confirming"]["superseded_by"]
    return points


def _loss(p):
    return p["loss"] if p["loss"] is not None else 1.0 - p["quality"]


def _knobs_at(repo, commit, cache):
    """{knob: value} of inference.py at `commit` in `repo` (None when git cannot tell)."""
    key = (str(repo), commit)
    if key not in cache:
        try:
            cache[key] = knobs.values(gitops.file_at(repo, commit, "inference.py"))
        except Exception:  # not a repository, commit gone, file unparsable: cannot confirm
            cache[key] = None
    return cache[key]


def confirm_trials(points):
    """Mark each search trial that a later paired run confirmed: set its "confirmed_by"
    to that KEEP's commit. The KEEP must be clean, of the same protocol and results file,
    pass its gates, come later in the file, and its committed inference.py must set every
    knob of the trial's config to the trial's value."""
    cache = {}
    keeps = [p for p in points if is_champion(p) and p["decision"] == "KEEP" and p["quality_pass"]]
    for trial in points:
        if trial["source"] != "search" or trial["status"] != "scored" or not trial["config"]:
            continue
        try:
            config = json.loads(trial["config"])
        except ValueError:
            continue
        repo = Path(trial["file"]).resolve().parent
        for keep in keeps:
            if keep["file"] != trial["file"] or keep["protocol"] != trial["protocol"] \
                    or (keep["line"] or 0) <= (trial["line"] or 0):
                continue
            values = _knobs_at(repo, keep["commit"], cache)
            if values is not None and all(k in values and knobs.same(values[k], v) for k, v in config.items()):
                trial["confirmed_by"], trial["confirming"] = keep["commit"], keep
                break
    return points


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
    """Points that may be recommended: scored, gates passed, and supported by a paired verdict."""
    return [p for p in points if p["status"] == "scored" and supported(p)]


def frontier_points(points):
    """The frontier of the supported points (fastest first)."""
    return _frontier(eligible(points))


def candidate_points(points):
    """The frontier of the unconfirmed search trials (fastest first): worth a paired run,
    not a recommendation."""
    return _frontier([p for p in points if p["status"] == "scored" and p["source"] == "search"
                      and not p["confirmed_by"]])


def _frontier(good):
    return [good[i] for i in pareto_frontier([(p["decode_tps"], p["quality"]) for p in good])]


def best_at_targets(points, targets):
    """{target: the fastest supported point with quality >= target, or None}."""
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
        confirmed = f" (confirmed by KEEP `{p['confirmed_by']}`)" if p["confirmed_by"] else ""
        return f"search `{p['config']}`{confirmed}"
    return f"`{p['commit']}` {p['subject']}".strip()


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
def _format_number(value, digits=4):
    """A number for tables and the key: value block: 4 significant digits, '-' when missing."""
    return "-" if value is None else f"{value:.{digits}g}"


def _format_quality(value):
    """A quality score: enough digits to tell close scores apart."""
    return _format_number(value, 6)


def _format_excluded_by(excluded_by):
    """{decision: count} as 'CRASH 2, REJECT 1' (sorted), '' when nothing was excluded."""
    return ", ".join(f"{k} {v}" for k, v in sorted(excluded_by.items()))


def _point_rows(points, empty):
    """Markdown table rows for `points` (or one row saying `empty`)."""
    rows = [f"| {_format_number(p['decode_tps'])} | {_format_quality(p['quality'])} | {p['source']} | "
            f"{p['decision']} | {describe(p)} | {p['file']}:{p['line']} |" for p in points]
    return rows or [f"| - | - | - | - | {empty} | - |"]


def markdown(groups, targets):
    """The markdown report: per protocol, the recommendation per target, the frontier of
    supported points and the unconfirmed search candidates."""
    out = ["# Speed/quality analysis", ""]
    for g in groups:
        c = g["counts"]
        out += [f"## protocol `{g['protocol']}` ({g['model']}, {g['preset']} workload)", "",
                f"![speed vs quality]({g['plot'].name})", "",
                f"{c['points']} points ({c['scored']} scored, {c['unscored']} unscored, "
                f"{c['quality_failed']} failed quality gates); "
                f"{c['excluded']} rows excluded ({_format_excluded_by(c['excluded_by']) or 'none'}). "
                f"Recommended only: {c['champions']} champion row(s) (BASELINE/KEEP) and "
                f"{c['confirmed']} search trial(s) confirmed by a paired KEEP, less what a later "
                f"champion superseded ({c['superseded']}); "
                f"{c['reverted']} REVERT row(s) are drawn, never recommended.", "",
                "### Recommended: the fastest supported configuration per quality target", "",
                "| quality target | decode tok/s | quality | source | decision | configuration | row |",
                "|---|---|---|---|---|---|---|"]
        for target in targets:
            p = g["best"][target]
            if p is None:
                out.append(f"| {target:g} | - | - | - | - | no supported row reaches this quality | - |")
            else:
                out.append(f"| {target:g} | {_format_number(p['decode_tps'])} | {_format_quality(p['quality'])} | "
                           f"{p['source']} | {p['decision']} | {describe(p)} | {p['file']}:{p['line']} |")
        header = ["| decode tok/s | quality | source | decision | configuration | row |", "|---|---|---|---|---|---|"]
        out += ["", "### Pareto frontier of champions and confirmed trials (fastest first)", ""] + header
        out += _point_rows(g["frontier"], "no supported scored row: champions need quality_score")
        out += ["", "### Search candidates, not confirmed (fastest first)", "",
                "A search trial is one unpaired measurement: `git apply search-best.patch`, commit, "
                "and run `prepare.py`; a KEEP confirms it.", ""] + header
        out += _point_rows(g["candidates"], "no unconfirmed search trial")
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
            "champions": sum(is_champion(p) and p["status"] != "excluded" and not p["superseded_by"]
                             for p in points),
            "superseded": sum(bool(p["superseded_by"]) for p in points),
            "confirmed": sum(bool(p["confirmed_by"]) for p in points),
            "reverted": sum(p["decision"] == "REVERT" for p in points),
            "excluded_by": dict(Counter(p["decision"] or "no speed" for p in points
                                        if p["status"] == "excluded"))}


def analyze(paths, targets, out_dir):
    """Run the whole analysis; returns (groups, report): one group per protocol, and the markdown's path.

    A group: protocol, model, preset, points, counts, frontier (supported points),
    candidates (unconfirmed search trials), best ({target: point or None}) and plot (the PNG's path).
    """
    points = supersede(confirm_trials(load_points(paths)))
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
                       "candidates": candidate_points(mine),
                       "best": best_at_targets(mine, targets), "plot": path})
    report = Path(out_dir) / "analysis.md"
    report.write_text(markdown(groups, targets))
    return groups, report


def plot(points, frontier, targets, path, title):
    """Write the two-panel PNG (speed vs quality, progress over time) to `path`."""
    fig = plots.figure(points, frontier, targets, title, progress(points))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plots.pyplot().close(fig)


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
                  f"supported: {sum(supported(p) for p in g['points'])} (champions {c['champions']}, "
                  f"confirmed trials {c['confirmed']}; superseded {c['superseded']}; "
                  f"reverted {c['reverted']}, never recommended)",
                  f"frontier: {len(g['frontier'])}"]
        for i, p in enumerate(g["frontier"]):
            lines.append(f"frontier_{i}: {_point_text(p)}")
        lines.append(f"candidates: {len(g['candidates'])}")
        for i, p in enumerate(g["candidates"]):
            lines.append(f"candidate_{i}: {_point_text(p)}")
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
            "config": p["config"] or None, "confirmed_by": p["confirmed_by"],
            "superseded_by": p["superseded_by"], "supported": supported(p)}


def analysis_json(groups, report, paths, targets):
    """The --json object: what analysis_block says, with whole rows instead of one-line summaries."""
    protocols = []
    for g in groups:
        protocols.append({
            "protocol": g["protocol"], "model": g["model"], "preset": g["preset"], "counts": g["counts"],
            "frontier": [point_json(p) for p in g["frontier"]],
            "candidates": [point_json(p) for p in g["candidates"]],
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
