"""Is the champion in this run the champion it was? Two checks on its speed that can turn a
KEEP INVALID: against the run that made it the champion, both relative to the yardstick (a
champion that slows down once it is the champion, whatever tells it so), and against its
raw speed in its own earlier runs (a floor, for champions without a yardstick record)."""

import math

from harness import ledger, stats, verdict
from harness.ledger import Decision
from harness.verdict import pct

# A KEEP whose champion ran this much slower than in its own runs is not trusted: a champion
# that slows itself when it senses a newer challenger (a covert channel between the two
# workers) would hand out KEEPs; load alone swings the speed here by 15-25 %.
CHAMPION_PACE_FLOOR = 0.7
# An honest champion's pace over the yardstick moves a little between runs (its calls
# follow other workers' with cold caches in one run and its own in another): that much is
# forgiven by check_champion_yardstick, which discounts only the rest (measured: see README).
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


def check_champion_yardstick(ctx, result, out, standing):
    """A KEEP that the champion's slowdown since it became the champion could explain becomes
    INVALID. Its speed over the yardstick's now (verdict.yardstick_ratio) against the same
    ratio in the run that made it the champion (ledger.yardstick_record of its champion row),
    the very calls it won or set its baseline with: the machine's load moves both alike, so a
    champion slower now is slower itself, whatever told it that it is the champion (its place
    in the run's schedule, a coin it tossed). The
    pace's 95 % upper bound, beyond YARDSTICK_PACE_TOLERANCE, discounts the speedup: the
    interval's lower end times it must still clear 1 + min_effect. Without a record (rows of an older harness) nothing is checked
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
