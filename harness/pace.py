"""Is the champion in this run the champion it was? Two checks on its speed that can turn a
KEEP INVALID: against its own pace alone, timed in this run before the challenger's worker
started (a champion that slows down beside a newer challenger), and against its pace in its
own earlier runs (ledger)."""

from harness import ledger, verdict
from harness.ledger import Decision
from harness.verdict import pct

# A KEEP whose champion ran this much slower than in its own runs is not trusted: a champion
# that slows itself when it senses a newer challenger (a covert channel between the two
# workers) would hand out KEEPs; load alone swings the speed here by 15-25 %.
CHAMPION_PACE_FLOOR = 0.7
# An honest champion runs a little slower beside the challenger than alone (each A/B call
# follows the other worker's, with cold caches: 1-2 % on the tiny model here, with bounds as
# tight as -0.4 % on a quiet machine, where such a discount turned an honest +5 % KEEP INVALID).
# check_champion_alone forgives that much and discounts only the rest.
ALONE_PACE_TOLERANCE = 0.97


def check_champion_pace(ctx, result, standing):
    """A KEEP won against a champion that ran below CHAMPION_PACE_FLOOR of its own earlier
    speed (ledger.own_speed) becomes INVALID: re-run on a quiet machine."""
    metric = ctx.settings.verdict.primary_metric
    now = result.get("champion_speed")
    own = ledger.own_speed(standing.rows, protocol=ctx.protocol, commit=result["champion"], metric=metric)
    result["champion_pace"] = now / own if now and own else None
    if result["decision"] == Decision.KEEP and result["champion_pace"] and result["champion_pace"] < CHAMPION_PACE_FLOOR:
        result.update(decision=Decision.INVALID, reason=(
            f"the champion ran at {now:.1f} {metric}, {(1 - result['champion_pace']) * 100:.0f} % below its own {own:.1f} "
            f"in earlier runs: a busy machine, or a champion slowed while measured; re-run on a quiet machine "
            f"(was: KEEP, {result['reason']})"))


def check_champion_alone(ctx, result, out):
    """A KEEP that the champion's own slowdown beside the challenger could explain becomes
    INVALID. The champion was timed alone before the challenger's worker existed: every covert
    channel between the two sandboxes needs both, and a champion that slows down once it
    senses a newer challenger (or once it is paused, or after so many calls) was fast then.
    Its pace beside the challenger relative to alone (verdict.alone_pace, the verdict's own
    statistic) discounts the speedup: the interval's lower end times the pace's 95 % upper
    bound, beyond ALONE_PACE_TOLERANCE, must still clear 1 + min_effect. An honest champion's
    bound is near 1, and then nothing is discounted."""
    metric = ctx.settings.verdict.primary_metric
    pace, high = verdict.alone_pace(out["alone"], out["samples"], metric)
    result["champion_alone_pace"] = pace
    low, need = (result.get("speedup_ci") or [None])[0], 1 + ctx.settings.verdict.min_effect
    factor = min(1.0, high / ALONE_PACE_TOLERANCE) if high is not None else 1.0
    if result["decision"] != Decision.KEEP or factor >= 1 or low is None or low * factor > need:
        return
    result.update(decision=Decision.INVALID, reason=(
        f"the champion ran {pct(pace)} beside the challenger against its own pace alone (at most "
        f"{pct(high)}; {pct(ALONE_PACE_TOLERANCE)} forgiven), timed before the challenger started: discounted "
        f"by the rest, the win's lower end {pct(low * factor)} does not clear {pct(need)}. A champion that slows "
        f"down beside a newer challenger, or a machine that got busy; re-run on a quiet machine "
        f"(was: KEEP, {result['reason']})"))
