"""The plots of `analyze` and of the morning report (matplotlib, Agg backend).

Points are harness.analyze point dicts. Three panels:
  * speed vs quality: every point by kind, the frontier of what the verdicts support;
    the quality axis is the quality loss 1 - quality_score on a log scale (lower loss is
    drawn higher), so points that all sit near 1.0 still show their differences;
  * progress over time: every run's decode tok/s, one kept line per branch;
  * speedups: each experiment's paired speedup with its 95 % interval.
"""

import math
from datetime import timedelta

STYLE = {  # kind: (marker, color, label)
    "kept": ("o", "#2ca02c", "kept (BASELINE/KEEP)"),
    "reverted": ("x", "#d62728", "reverted (REVERT): never recommended"),
    "measured": ("s", "#1f77b4", "measured (agent)"),
    "search": ("^", "#ff7f0e", "search trial (unconfirmed)"),
    "confirmed": ("^", "#9467bd", "search trial confirmed by a paired KEEP"),
}
DECISION_COLORS = {"BASELINE": "#2ca02c", "KEEP": "#2ca02c", "REVERT": "#d62728", "MEASURED": "#1f77b4",
                   "CRASH": "black", "INVALID": "black", "REJECT": "black"}
NO_SCORE = 10.0  # where unscored points sit on the loss axis: below a score of 0
LOSS_FLOOR = 1e-7  # 1 - quality below this is drawn at it (identical to the reference, as measured)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def kind(p):
    """How a point is drawn: kept, reverted, measured, search or confirmed."""
    if p["source"] == "search":
        return "confirmed" if p.get("confirmed_by") else "search"
    if p["decision"] in ("BASELINE", "KEEP"):
        return "kept"
    if p["decision"] == "REVERT":
        return "reverted"
    return "measured"


def loss(quality):
    """Where a quality score sits on the loss axis: 1 - quality, floored for the log scale."""
    return max(1.0 - quality, LOSS_FLOOR)


def point_loss(p):
    """Where point `p` sits on the loss axis: its precise loss (analyze.point derives it from
    kl_mean, which results.tsv keeps to 6 significant digits while a quality score near 1
    rounds to 1), else 1 - its quality score."""
    value = p.get("loss")
    return max(value, LOSS_FLOOR) if value is not None else loss(p["quality"])


def quality_label(loss_value):
    """The quality score at a point of the loss axis, as a tick label: 0.1 -> '0.9',
    0.001 -> '0.999', 1e-6 -> '1-1e-06' (nines are unreadable beyond four)."""
    if loss_value >= 1:
        return {1: "0", NO_SCORE: "no score"}.get(loss_value, "")
    if loss_value >= 1e-4:
        digits = max(1, round(-math.log10(loss_value)))
        return f"{1 - loss_value:.{digits}f}"
    return f"1-{loss_value:.0e}"


def figure(points, frontier, targets, title, kept_lines):
    """The two-panel figure of `analyze`: speed vs quality on top, progress below."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 10), gridspec_kw={"height_ratios": [3, 2]})
    quality_panel(top, points, frontier, targets, title)
    progress_panel(bottom, points, kept_lines)
    fig.tight_layout()
    return fig


def quality_panel(ax, points, frontier, targets, title):
    """Speed vs quality loss: every point by kind and status, the frontier, the targets."""
    shown = [p for p in points if p["status"] != "excluded"]
    scored = [p for p in shown if p["quality"] is not None]
    band = NO_SCORE  # below (worse than) every real score, so an unscored point never reads as one
    for k in STYLE:
        _scatter_kind(ax, [p for p in shown if kind(p) == k], STYLE[k], band)
    if frontier:
        xs = [p["decode_tps"] for p in reversed(frontier)]  # slowest first
        ys = [point_loss(p) for p in reversed(frontier)]
        ax.step(xs, ys, where="pre", color="black", linewidth=1.6, zorder=2,
                label="frontier of champions and confirmed trials")
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)
    ax.set_yscale("log")
    for target in targets if scored else []:
        ax.axhline(loss(target), color="grey", linestyle=":", linewidth=0.8, zorder=1)
        ax.annotate(f"quality {target:g}", (1.0, loss(target)), xycoords=("axes fraction", "data"),
                    ha="right", va="bottom", fontsize=8, color="grey")
    if any(p["quality"] is None for p in shown):
        ax.axhline(band / 3, color="lightgrey", linewidth=0.8, zorder=1)
    if not scored:
        ax.text(0.5, 0.75, "no row has a quality score: the frontier needs quality_score",
                transform=ax.transAxes, ha="center", fontsize=9, color="grey")
    ax.invert_yaxis()  # less loss = closer to the reference = higher, as "better" reads
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: quality_label(y)))
    ax.set_xlabel("decode speed (tokens/s, median over the workload's calls)")
    ax.set_ylabel("quality score (log scale of 1 - score; 1.0 = the float32 reference)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _scatter_kind(ax, mine, style, band):
    """One kind's points: scored in colour, gate failures grey, unscored in the band."""
    marker, color, label = style
    ok = [p for p in mine if p["status"] == "scored"]
    failed = [p for p in mine if p["status"] == "quality_failed" and p["quality"] is not None]
    no_score = [p for p in mine if p["quality"] is None]
    if ok:
        ax.scatter([p["decode_tps"] for p in ok], [point_loss(p) for p in ok], marker=marker,
                   color=color, s=45, alpha=0.85, label=label, zorder=3)
    if failed:  # grey (hollow where the marker can be): measured, but its quality gates failed
        face = {"color": "grey"} if marker == "x" else {"facecolors": "none", "edgecolors": "grey"}
        ax.scatter([p["decode_tps"] for p in failed], [point_loss(p) for p in failed], marker=marker,
                   s=45, alpha=0.8, label=f"{label.split(' (')[0]}, quality gates failed", zorder=3,
                   linewidths=1.2, **face)
    if no_score:  # labelled only when the kind has no other entry in the legend
        ax.scatter([p["decode_tps"] for p in no_score], [band] * len(no_score), marker=marker,
                   color=color, s=30, alpha=0.5, zorder=3, label=None if ok or failed else label)


def progress_panel(ax, points, kept_lines):
    """Decode tok/s of every run over time, one kept line per branch, failures dashed.

    `kept_lines` is analyze.progress(points): {branch: [(time, level), ...]}. A branch's
    line ends at its own last run; a branch with a single kept point is a marker, not a
    flat line across the night."""
    import matplotlib.dates as mdates

    colors = ["#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2"]
    last_run = {}
    for p in points:
        if p["timestamp"]:
            branch = p["branch"] or "-"
            last_run[branch] = max(last_run.get(branch, p["timestamp"]), p["timestamp"])
    for i, (branch, series) in enumerate(sorted(kept_lines.items())):
        color = colors[i % len(colors)]
        label = f"kept line, {branch}: baseline x paired speedups of KEEPs"
        end = max(last_run.get(branch, series[-1][0]), series[-1][0])
        if len(series) == 1 and end == series[0][0]:
            ax.scatter([series[0][0]], [series[0][1]], marker="D", s=60, color=color, zorder=4,
                       label=f"{branch}: baseline only")
            continue
        times = [t for t, _ in series] + [end]
        levels = [b for _, b in series] + [series[-1][1]]
        ax.step(times, levels, where="post", linewidth=1.8, color=color, label=label)
    shown = [p for p in points if p["status"] != "excluded" and p["timestamp"]]
    for k in STYLE:
        mine = [p for p in shown if kind(p) == k]
        if mine:
            marker, color, label = STYLE[k]
            ax.scatter([p["timestamp"] for p in mine], [p["decode_tps"] for p in mine], marker=marker,
                       color=color, s=25, alpha=0.7, label=label, zorder=3)
    failures = [p for p in points if p["status"] == "excluded" and p["timestamp"]]
    for p in failures:
        ax.axvline(p["timestamp"], color="black", alpha=0.25, linewidth=0.8, linestyle="--")
    if failures:
        ax.plot([], [], color="black", alpha=0.4, linestyle="--", label=f"CRASH/INVALID/REJECT ({len(failures)})")
    if shown or failures:
        stamps = [p["timestamp"] for p in shown + failures]
        pad = max((max(stamps) - min(stamps)) * 0.03, timedelta(seconds=30))
        ax.set_xlim(min(stamps) - pad, max(stamps) + pad)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    ax.set_xlabel("time of the run (UTC)")
    ax.set_ylabel("decode speed (tokens/s)")
    ax.set_title("progress over time (absolute tok/s swing with load; the kept line uses paired speedups)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def speedup_panel(ax, experiments, min_effect):
    """Each experiment's paired speedup (%) with its 95 % interval, coloured by decision,
    the first experiment at the top (a hollow dot: its quality gates failed); runs without a
    speedup are listed with their decision."""
    n = len(experiments)
    for i, e in enumerate(experiments):
        y = n - 1 - i
        color = DECISION_COLORS.get(e["decision"], "grey")
        if e["speedup"] is not None:
            x = (e["speedup"] - 1) * 100
            if e["speedup_lo"] is not None and e["speedup_hi"] is not None:
                ax.plot([(e["speedup_lo"] - 1) * 100, (e["speedup_hi"] - 1) * 100], [y, y], color=color,
                        linewidth=2.2, alpha=0.7)
            if e.get("quality_pass") == "false":  # the speed may look good; the gates failed
                ax.scatter([x], [y], s=40, zorder=3, facecolors="white", edgecolors=color)
                ax.annotate("quality gates failed", (x, y), xytext=(6, 3), textcoords="offset points",
                            fontsize=7, color=color)
            else:
                ax.scatter([x], [y], color=color, s=40, zorder=3)
        else:
            ax.annotate(e["decision"], (0, y), xytext=(4, -3), textcoords="offset points", fontsize=8,
                        color=color)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.axvline(min_effect * 100, color="grey", linestyle=":", linewidth=0.8)
    ax.set_yticks(range(n), [_short(f"{e['number']} {e['subject']}") for e in reversed(experiments)],
                  fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"paired speedup vs the champion of the time, % (95 % interval; KEEP needs the "
                  f"interval above +{min_effect * 100:g} %)")
    ax.set_title("what each experiment won or lost, side by side with its champion", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


def _short(text, width=38):
    return text if len(text) <= width else text[:width - 3] + "..."
