"""The verdict: champion and challenger compared pair by pair, and the decision as one
pure function of the figures (no files, no git, no clocks)."""

import math
import statistics

from harness import stats
from harness.ledger import Decision


def paired_ratios(samples, metric):
    """Challenger / champion ratios of `metric`, one per (repeat, prompt) pair.

    For prefill_tps only prefill-kind prompts count (all, if the workload has none).
    "end_to_end" is champion / challenger whole-call time (request to last token), on
    every prompt.
    """
    pairs = _pairs(samples)
    if metric == "prefill_tps":
        pairs = [p for p in pairs if p["challenger"].kind == "prefill"] or pairs
    if metric == "end_to_end":
        return [p["champion"].total_s / p["challenger"].total_s for p in pairs]
    return [getattr(p["challenger"], metric) / getattr(p["champion"], metric) for p in pairs]


def _pairs(samples):
    """{worker: Sample} for each (repeat, prompt) both pipelines were timed on."""
    by_key = {}
    for s in samples:
        if s.repeat >= 0:
            by_key.setdefault((s.repeat, s.prompt), {})[s.worker] = s
    return [p for p in by_key.values() if "champion" in p and "challenger" in p]


# The whole-call ratio is a guard, not the headline figure: a decode win must show that whole
# calls got faster too (holding tokens back and bursting them only looks faster between the
# first and last token). Where a prompt token costs about what a generated one does (CPUs),
# whole calls move by half the decode win or less, and with each pair counted up to x1.5 the
# guard needed ~57 pairs to confirm a true +10 % decode win, more than the full preset's
# budget gives on a 2-core CPU (measured there: decode +11.1 % [+4.4, +15.0], whole calls
# +4.8 % [-0.6, +9.3] after 33 pairs); counted up to x1.1, ~24 (simulated with those spreads).
# A whole-call pair beyond +-10 % counts as +-10 %: end_to_end_ratio never shows more.
WHOLE_CALL_CAP = 1.1


# The pairs count capped, so one disturbed call sways little; but then a challenger fast on most
# calls could stall a few for as long as it liked, at -10 % a pair (red team 21: 2 calls in 20
# stalled 5 s before their first token, KEEP +39.6 % while its whole calls took 13.4 s in all
# against the champion's 4.5 s). A KEEP also needs the ratio of the whole calls' times, each
# summed over every pair, uncapped, past the line it was kept on: 1 + min_effect (a win),
# 1 - min_effect (a simpler KEEP). A point figure, not a test: an honest win's total moves
# with its pairs (their spread over the square root of their count: ~0.5 % at 30 pairs).
def total_time_ratio(samples):
    """Champion / challenger whole-call time (request to last token), each summed over every
    pair of this run: what a few stalled calls cost counts whole. None without pairs."""
    pairs = _pairs(samples)
    mine = sum(p["challenger"].total_s for p in pairs)
    return sum(p["champion"].total_s for p in pairs) / mine if pairs and mine > 0 else None


def comparison(samples, primary_metric, *, min_effect, earlier=None, detectable=True):
    """The paired figures of a champion-vs-challenger run: speedup of the primary metric
    (the capped geometric mean of the paired ratios, stats.ratio_with_sequence) with its
    95 % confidence sequence, the whole-call ratio with its own (pairs capped to
    WHOLE_CALL_CAP), the prefill
    ratio, and how noisy the pairs were.

    `earlier` ({"decode_tps"|"prefill_tps"|"end_to_end": [ratios]}) are the pairs of
    earlier runs of the same code against the same champion: pooled in front of this
    run's, as one sequence (the intervals hold at every length, so continuing is fair).
    `detectable=False` leaves min_detectable_effect out (a bisection: ~0.3 s at 180 pairs),
    for the looks between rounds that only ask whether the A/B has settled.
    """
    earlier = earlier or {}
    ratios = list(earlier.get(primary_metric, [])) + paired_ratios(samples, primary_metric)
    whole = list(earlier.get("end_to_end", [])) + paired_ratios(samples, "end_to_end")
    speedup, low, high = stats.ratio_with_sequence(ratios)
    e2e, e2e_low, e2e_high = stats.ratio_with_sequence(whole, cap=WHOLE_CALL_CAP)
    spread = stats.robust_spread([math.log(r) for r in ratios if r > 0])
    return {"speedup": speedup, "speedup_ci": [low, high], "primary_metric": primary_metric, "pairs": len(ratios),
            "pooled_pairs": len(earlier.get(primary_metric, [])),
            "prefill_ratio": stats.median_ci(paired_ratios(samples, "prefill_tps"))[0],
            "end_to_end_ratio": e2e, "end_to_end_ci": [e2e_low, e2e_high], "end_to_end_total": total_time_ratio(samples),
            "pair_spread": spread, "min_detectable_effect": min_detectable_effect(ratios, speedup, min_effect) if detectable else None,
            "ratios": {primary_metric: ratios, "end_to_end": whole}}


def _speed(sample, metric):
    """A call's `metric`; "end_to_end" is whole calls, 1 / (request to last token)."""
    return 1 / sample.total_s if metric == "end_to_end" else getattr(sample, metric)


def yardstick_ratio(samples, worker, metric=None, *, cap=stats.RATIO_CAP):
    """(log ratio, se): `worker`'s speed relative to the yardstick's in one run, or
    (None, None) without at least two yardstick calls. The machine's load, which moves both
    alike, cancels out; what is left is the pipeline's own pace, comparable across runs of
    the same protocol (pace.check_champion_yardstick).

    The worker's side is the verdict's own statistic: each call's log `metric` about its
    prompt's median, capped to +-log(cap), averaged (a champion slowing a few calls a lot
    counts as it does in the speedup; a pipeline that plants slow calls to lower its record
    pays for them in its speedup just as much). The yardstick's side is the median of its
    calls, all on one prompt (they differ by noise alone); the prompts' offsets are the same
    in every run, each round having every prompt. The se uses the yardstick's spread (robust:
    the median absolute deviation) for both terms: the worker cannot widen it by varying its
    speed. For prefill_tps only the prefill-kind prompts count, as in paired_ratios.
    `metric` defaults to YARDSTICK_METRIC.
    """
    metric = metric or YARDSTICK_METRIC
    mine = [s for s in samples if s.worker == worker and s.repeat >= 0]
    if metric == "prefill_tps":
        mine = [s for s in mine if s.kind == "prefill"] or mine
    theirs = [math.log(_speed(s, metric)) for s in samples if s.worker == "yardstick" and s.repeat >= 0]
    if not mine or len(theirs) < 2:
        return None, None
    by_prompt = {}
    for s in mine:
        by_prompt.setdefault(s.prompt, []).append(math.log(_speed(s, metric)))
    centre, bound = {p: statistics.median(v) for p, v in by_prompt.items()}, math.log(cap)
    level = sum(centre[p] + min(max(x - centre[p], -bound), bound) for p, v in by_prompt.items() for x in v) / len(mine)
    middle = statistics.median(theirs)
    # robust (MAD): one yardstick call caught by a burst of load does not widen the bound for all
    spread = max(1.4826 * statistics.median(abs(x - middle) for x in theirs), SPREAD_FLOOR)
    # a median of n normal draws varies pi/2 times as much as their mean
    return level - middle, spread * math.sqrt(1 / len(mine) + math.pi / 2 / len(theirs))


def champion_pace(samples, record):
    """(pace, high, factor): the champion's speed over the yardstick's in `samples`
    (yardstick_ratio) against `record`, the same when it was measured itself
    ((log ratio, se): ledger.yardstick_record); that pace's one-sided 95 % upper bound; and
    the factor a KEEP's lower end is discounted by, min(1, high / YARDSTICK_PACE_TOLERANCE),
    with high at most YARDSTICK_WIDTH_FORGIVEN times the pace itself: only evidence of a
    slowdown beyond the tolerance discounts, and a wide bound (a busy machine) forgives no
    more than that. (None, None, 1.0) without a record or yardstick;
    factor 0 (no KEEP yet) with fewer than YARDSTICK_MIN_CALLS yardstick calls: a few noisy
    ones bound nothing (a red team's champion, 25 % slower, passed on 4 of them: KEEP +50 %)."""
    now, se_now = yardstick_ratio(samples, "champion")
    then, se_then = record or (None, None)
    if now is None or then is None:
        return None, None, 1.0
    calls = sum(s.worker == "yardstick" and s.repeat >= 0 for s in samples)
    high = math.exp(now - then + stats.t_one_sided(0.05, calls - 1) * math.hypot(se_now, se_then))
    pace = math.exp(now - then)
    forgiven = min(high, pace * YARDSTICK_WIDTH_FORGIVEN)
    factor = min(1.0, forgiven / YARDSTICK_PACE_TOLERANCE) if calls >= YARDSTICK_MIN_CALLS else 0.0
    return pace, high, factor


# What the yardstick compares: whole calls, request to last token. Every slowdown a champion
# can put anywhere in a call shows there (a pause before its first token is invisible to
# decode_tps: red team 3 padded the champion's first token on cue and burst the challenger's
# tokens, KEEP +34 % with whole calls no faster), and holding tokens back gains nothing there.
YARDSTICK_METRIC = "end_to_end"
# What of an honest champion's pace against its record is forgiven. An honest champion drifted
# to -4.3 % (bound -2.3 %) on a quiet machine, which made an honest +2.8 % KEEP INVALID; a chain
# of no-op commits, each champion slower than when it won, gains up to this much a step.
YARDSTICK_PACE_TOLERANCE = 0.97
# How much of the pace's bound beyond the pace itself is forgiven too. On a busy machine the
# bound is wide: a red team's champion, slowed ~9 % on a cue (pace 0.91, bound above 0.97), won
# KEEP +12.7 % and +20.2 % for no-ops. Idle, honest paces were 0.957-1.013: none is discounted.
YARDSTICK_WIDTH_FORGIVEN = 1.02
# Yardstick calls (one a round) before a KEEP can rest on the champion's pace; a run of one
# pipeline, whose ratio becomes a record, measures as many rounds (measure.RECORD_ROUNDS).
YARDSTICK_MIN_CALLS = 8
SPREAD_FLOOR = 0.005  # per-call log spread assumed at least (a few identical calls: not zero)


def min_detectable_effect(ratios, speedup, min_effect):
    """The smallest speedup these pairs could have shown as a KEEP: every ratio scaled until
    the interval's lower bound reaches the KEEP line 1 + min_effect (1.12: a KEEP needed
    +12 %). None while the interval is unbounded (too few pairs)."""
    factor = stats.shift_to_reach(ratios, 1 + min_effect)
    return speedup * factor if factor and speedup else None


def settled(comparison_figures, *, min_effect, fewer_lines=False, factor=1.0):
    """True once more pairs cannot change the decision's direction: the speedup's
    interval lies wholly above the KEEP line 1 + min_effect (and, for decode, so does the
    whole-call ratio's, or that one lies wholly below), or wholly below it. With
    `fewer_lines` (a "simpler" KEEP is possible): also once it is surely no slower than
    1 - min_effect (whole calls too, for decode), and wholly below only under that. The
    intervals' lower ends count times `factor` (champion_pace: a champion slower than when
    it won gives no win by that)."""
    low, high = comparison_figures["speedup_ci"]
    if low is None:
        return False
    low *= factor
    need, floor = 1 + min_effect, 1 - min_effect
    whole_low, whole_high = comparison_figures["end_to_end_ci"]
    whole_low = None if whole_low is None else whole_low * factor
    decode = comparison_figures["primary_metric"] == "decode_tps"
    if fewer_lines:
        if low >= floor and (not decode or (whole_low is not None and whole_low >= floor)):
            return True
        if high < floor:
            return True
    elif high < need:
        return True
    if low <= need:
        return False
    if not decode:
        return True
    return whole_low is not None and (whole_low > need or whole_high < need)


def pct(x):
    """A ratio as a signed percentage: 1.041 -> '+4.1 %'."""
    return f"{(x - 1) * 100:+.1f} %"


def decide(*, gate_reason, has_champion, dirty, search, min_effect, speedup=None, speedup_ci=None, pairs=None,
           primary_metric="decode_tps", end_to_end_ratio=None, end_to_end_ci=None, lines_vs_champion=None,
           lines_uncounted="", end_to_end_total=None):
    """The decision and its one-line reason for a run that measured cleanly.

    Args:
        gate_reason: "" when every quality gate passed, else the failed gates.
        has_champion: a champion exists on this branch and protocol.
        dirty: inference.py had uncommitted changes; search: a search trial.
        speedup, speedup_ci: the paired ratios' capped geometric mean and its 95 % confidence sequence
            (None: measured alone, HEAD is the champion; a side None: too few pairs, no decision).
        pairs: how many paired ratios the interval rests on.
        primary_metric: what `speedup` is the ratio of (decode_tps or prefill_tps).
        end_to_end_ratio, end_to_end_ci, end_to_end_total: whole calls, champion / challenger time, its
            interval (a decode KEEP needs it above 1 + min_effect too: held-back tokens burst are fast
            from first to last token only) and the summed times' ratio (every KEEP: _unless_longer_in_all).
        lines_vs_champion, lines_uncounted: code lines added (+) or removed (-) against the
            champion; why that count cannot be trusted ('' when it can): see _not_simpler.
    Returns:
        (Decision, reason)
    """
    speed = "" if speedup is None else f"{pct(speedup)} [" + (
        "too few pairs for an interval" if speedup_ci[0] is None else f"{pct(speedup_ci[0])}, {pct(speedup_ci[1])}") + "]"
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
    if speedup_ci[0] is None:
        return Decision.MEASURED, (f"too few pairs to decide: {pairs} (a decision needs {stats.MIN_PAIRS}); "
                                   f"this preset measures ({speed}), the full preset decides")
    need = 1 + min_effect
    low, high = speedup_ci
    whole_low = end_to_end_ci[0] if primary_metric == "decode_tps" else None
    if low > need and (primary_metric != "decode_tps" or (whole_low or 0) > need):
        return _unless_longer_in_all(f"faster: {speed} beats the noise (needs > {pct(need)})", end_to_end_total, need)
    why_not = _not_simpler(low, whole_low, primary_metric, min_effect, lines_vs_champion, lines_uncounted)
    if why_not == "":
        simpler = f"simpler: {lines_vs_champion} lines, surely no slower than {pct(1 - min_effect)} ({speed})"
        return _unless_longer_in_all(simpler, end_to_end_total, 1 - min_effect)
    simpler = f"; not simpler: {lines_vs_champion} lines, but {why_not}" if why_not else ""
    if low > need:
        whole = (f"{pct(end_to_end_ratio)} [{pct(end_to_end_ci[0])}, {pct(end_to_end_ci[1])}]"
                 if whole_low is not None else pct(end_to_end_ratio))
        return Decision.REVERT, (f"decode looks {speed} faster, but whole calls are not surely faster "
                                 f"({whole}): a decode win must shorten whole calls too{simpler}")
    if high < 1:
        return Decision.REVERT, f"slower: {speed}{simpler}"
    if high < need:
        return Decision.REVERT, f"no win of {pct(need)} or more: {speed}{simpler}"
    return Decision.REVERT, f"within noise: {speed} (needs > {pct(need)}){simpler}"


def _unless_longer_in_all(reason, total, line):
    """KEEP for `reason`, unless the whole calls' summed times (total: champion's over
    challenger's, see total_time_ratio) fall short of `line`: REVERT."""
    if total is None or total >= line:
        return Decision.KEEP, reason
    return Decision.REVERT, (f"the pairs, each capped, say so, but whole calls summed over every pair give only "
                             f"{pct(total)} (needs {pct(line)} or more): a few calls took far longer than the rest "
                             f"(was: {reason})")


def _not_simpler(low, whole_low, primary_metric, min_effect, lines_vs_champion, lines_uncounted):
    """Why fewer lines do not win a "simpler" KEEP; "" when they do, None when there are
    not fewer lines. Simplicity wins with fewer lines (trusted: no code hidden in data)
    that are surely no slower than 1 - min_effect: the interval's lower end at or above it
    (for decode, the whole calls' too) — a non-inferiority test, not a point median."""
    if (lines_vs_champion or 0) >= 0:
        return None
    if lines_uncounted:
        return lines_uncounted
    floor = 1 - min_effect
    if low < floor:
        return f"the interval reaches below {pct(floor)}"
    if primary_metric == "decode_tps" and (whole_low is None or whole_low < floor):
        return f"whole calls may be slower than {pct(floor)}"
    return ""
