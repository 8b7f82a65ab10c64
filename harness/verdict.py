"""The verdict: champion and challenger compared pair by pair, and the decision as one
pure function of the figures (no files, no git, no clocks)."""

from harness import stats
from harness.ledger import Decision


def paired_ratios(samples, metric):
    """Challenger / champion ratios of `metric`, one per (repeat, prompt) pair.

    For prefill_tps only prefill-kind prompts count (all, if the workload has none).
    "end_to_end" is champion / challenger whole-call time (request to last token), on
    every prompt.
    """
    by_key = {}
    for s in samples:
        if s.repeat >= 0:
            by_key.setdefault((s.repeat, s.prompt), {})[s.worker] = s
    pairs = [p for p in by_key.values() if "champion" in p and "challenger" in p]
    if metric == "prefill_tps":
        pairs = [p for p in pairs if p["challenger"].kind == "prefill"] or pairs
    if metric == "end_to_end":
        return [p["champion"].total_s / p["challenger"].total_s for p in pairs]
    return [getattr(p["challenger"], metric) / getattr(p["champion"], metric) for p in pairs]


def comparison(samples, primary_metric):
    """The paired figures of a champion-vs-challenger run: speedup of the primary metric
    with its 95 % interval, and the prefill, whole-call and first-token-share ratios."""
    ratios = paired_ratios(samples, primary_metric)
    speedup, low, high = stats.conservative_median_ci(ratios)
    e2e, e2e_low, e2e_high = stats.conservative_median_ci(paired_ratios(samples, "end_to_end"))
    return {"speedup": speedup, "speedup_ci": [low, high], "primary_metric": primary_metric, "pairs": len(ratios),
            "prefill_ratio": stats.median_ci(paired_ratios(samples, "prefill_tps"))[0],
            "end_to_end_ratio": e2e, "end_to_end_ci": [e2e_low, e2e_high]}


def pct(x):
    """A ratio as a signed percentage: 1.041 -> '+4.1 %'."""
    return f"{(x - 1) * 100:+.1f} %"


def decide(*, gate_reason, has_champion, dirty, search, min_effect, speedup=None, speedup_ci=None, pairs=None,
           primary_metric="decode_tps", end_to_end_ratio=None, end_to_end_ci=None, lines_vs_champion=None):
    """The decision and its one-line reason for a run that measured cleanly.

    Args:
        gate_reason: "" when every quality gate passed, else the failed gates.
        has_champion: a champion exists on this branch and protocol.
        dirty: inference.py had uncommitted changes; search: a search trial.
        speedup, speedup_ci: the primary metric's median paired ratio and its 95 % interval
            (None when the challenger was measured alone, i.e. HEAD is the champion).
        pairs: how many paired ratios the interval rests on; fewer than a 95 % interval
            needs (stats.fewest_for_interval) and nothing is decided.
        primary_metric: what `speedup` is the ratio of (decode_tps or prefill_tps).
        end_to_end_ratio, end_to_end_ci: whole calls, champion time / challenger time, with
            its 95 % interval. A decode KEEP needs it above 1 + min_effect too: a
            pipeline that holds tokens back and bursts them looks fast between its first
            and last token, never over the whole call.
        lines_vs_champion: code lines added (+) or removed (-) against the champion.
    Returns:
        (Decision, reason)
    """
    speed = f"{pct(speedup)} [{pct(speedup_ci[0])}, {pct(speedup_ci[1])}]" if speedup is not None else ""
    if search:
        return Decision.MEASURED, "search trial: " + (gate_reason or "quality gates pass")
    if dirty:
        return Decision.MEASURED, ("inference.py has uncommitted changes: commit it for a verdict"
                                   + (f" (speedup {speed})" if speed else "")
                                   + (f"; {gate_reason}" if gate_reason else ""))
    if gate_reason:
        if not has_champion:
            return Decision.MEASURED, gate_reason + " (not a baseline: fix inference.py)"
        return Decision.REVERT, gate_reason
    if not has_champion:
        return Decision.BASELINE, "first good run of this protocol on this branch"
    if speedup is None:
        return Decision.MEASURED, "HEAD is the champion itself: commit a change to compare"
    fewest = stats.fewest_for_interval()
    if pairs is not None and pairs < fewest:
        return Decision.MEASURED, (f"too few pairs to decide: {pairs} (a 95 % interval needs {fewest}); "
                                   f"this preset measures ({speed}), the full preset decides")
    need = 1 + min_effect
    low, high = speedup_ci
    if low > need and primary_metric == "decode_tps" and not end_to_end_ci[0] > need:
        whole = f"{pct(end_to_end_ratio)} [{pct(end_to_end_ci[0])}, {pct(end_to_end_ci[1])}]"
        return Decision.REVERT, (f"decode looks {speed} faster, but whole calls are not surely faster "
                                 f"({whole}): a decode win must shorten whole calls too")
    if low > need:
        return Decision.KEEP, f"faster: {speed} beats the noise (needs > {pct(need)})"
    simpler = ""
    if (lines_vs_champion or 0) < 0:
        # Simplicity wins: fewer lines at a speed the noise can't tell from the champion's
        # (the interval reaches above 1) and a median no worse than 1 - min_effect.
        if high > 1 and speedup >= 1 - min_effect:
            return Decision.KEEP, f"simpler: {lines_vs_champion} lines at equal speed ({speed})"
        simpler = (f"; not simpler: {lines_vs_champion} lines, but "
                   + ("the interval is wholly below 1" if high <= 1
                      else f"the median {pct(speedup)} is below {pct(1 - min_effect)}"))
    if speedup < 1 and high < 1:
        return Decision.REVERT, f"slower: {speed}{simpler}"
    return Decision.REVERT, f"within noise: {speed} (needs > {pct(need)}){simpler}"
