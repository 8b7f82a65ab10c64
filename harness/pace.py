"""Is the champion in this run the champion it was? Three checks on its speed that can turn a
KEEP INVALID: against its own pace alone, timed in this run before the challenger's worker
started (a champion that slows down beside a newer challenger); against the run that made it
the champion, both relative to the yardstick (a champion that slows down once it is the
champion); and
against its raw speed in its own earlier runs (a floor, for rows without a yardstick)."""

import math

from harness import ledger, stats, verdict
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
# The same for the champion's pace over the yardstick's against the run that made it the
# champion (check_champion_yardstick): honest champions' between-run drift, measured: see README.
YARDSTICK_PACE_TOLERANCE = 0.97


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
    _discount(ctx, result, high, ALONE_PACE_TOLERANCE, lambda: (
        f"the champion ran {pct(pace)} beside the challenger against its own pace alone (at most {pct(high)}; "
        f"{pct(ALONE_PACE_TOLERANCE)} forgiven), timed before the challenger started"),
        "A champion that slows down beside a newer challenger, or a machine that got busy")


def check_champion_yardstick(ctx, result, out, standing):
    """A KEEP that the champion's slowdown since it became the champion could explain becomes
    INVALID. Its speed over the yardstick's now (verdict.yardstick_ratio) against the same
    ratio in the run that made it the champion (ledger.yardstick_record of its champion row),
    the very calls it won or set its baseline with: the machine's load moves both alike, so a
    champion slower now is slower itself, whatever told it that it is the champion (its place
    in the run's schedule, a coin it tossed). The
    pace's 95 % upper bound, beyond YARDSTICK_PACE_TOLERANCE, discounts the speedup as in
    check_champion_alone. Without a record (rows of an older harness) nothing is checked
    here; check_champion_pace's floor still is."""
    metric = ctx.settings.verdict.primary_metric
    now, se_now = verdict.yardstick_ratio(out["samples"], "champion", metric)
    then, se_then = ledger.yardstick_record(standing.champion or {})
    if now is None or then is None:
        return
    calls = sum(s.worker == "yardstick" and s.repeat >= 0 for s in out["samples"])
    pace = math.exp(now - then)
    high = math.exp(now - then + stats.t_one_sided(0.05, calls - 1) * math.hypot(se_now, se_then))
    result["champion_yardstick_pace"] = pace
    _discount(ctx, result, high, YARDSTICK_PACE_TOLERANCE, lambda: (
        f"the champion ran {pct(pace)} against the run that made it the champion, each relative to the yardstick "
        f"(at most {pct(high)}; {pct(YARDSTICK_PACE_TOLERANCE)} forgiven)"),
        "A champion that slows down once it is the champion")


def _discount(ctx, result, high, tolerance, what, why):
    """INVALID for a KEEP whose interval's lower end, times min(1, high / tolerance), does
    not clear 1 + min_effect: the champion's slowdown (high: its pace's upper bound) could
    explain the win. what(): the reason's first part, why: its likely cause."""
    low, need = (result.get("speedup_ci") or [None])[0], 1 + ctx.settings.verdict.min_effect
    factor = min(1.0, high / tolerance) if high is not None else 1.0
    if result["decision"] != Decision.KEEP or factor >= 1 or low is None or low * factor > need:
        return
    result.update(decision=Decision.INVALID, reason=(
        f"{what()}: discounted by the rest, the win's lower end {pct(low * factor)} does not clear {pct(need)}. "
        f"{why}, or a machine that got busy; re-run on a quiet machine (was: KEEP, {result['reason']})"))
