"""Is the champion in this run the champion it was? Two checks on its speed that can turn a
KEEP INVALID: against its record, both relative to the yardstick (a champion that slows down
once it is the champion, whatever tells it so), and against its raw speed in its own earlier
runs (a floor, for champions without a yardstick record). And a note on a BASELINE far
below the record its branch's KEEPs will be held to."""

import math

from harness import ledger, verdict
from harness.ledger import Decision
from harness.verdict import pct

# A KEEP whose champion ran this much slower than in its own runs is not trusted: a champion
# that slows itself when it senses a newer challenger (a covert channel between the two
# workers) would hand out KEEPs; load alone swings the speed here by 15-25 %.
CHAMPION_PACE_FLOOR = 0.7


def check_champion_pace(ctx, result, standing):
    """A KEEP won against a champion that ran below CHAMPION_PACE_FLOOR of its own earlier
    speed (ledger.own_speed) becomes INVALID: re-run on a quiet machine. Only where the
    champion's pace against its yardstick record was not taken (check_champion_yardstick): that
    one is immune to the machine's load, which alone moved an honest champion's raw speed 37 %
    between two runs in CI."""
    metric = ctx.settings.verdict.primary_metric
    now = result.get("champion_speed")
    own = ledger.own_speed(standing.rows, protocol=ctx.protocol, commit=result["champion"], metric=metric)
    result["champion_pace"] = now / own if now and own else None
    if result.get("champion_yardstick_pace") is not None:
        return
    if result["decision"] == Decision.KEEP and result["champion_pace"] and result["champion_pace"] < CHAMPION_PACE_FLOOR:
        result.update(decision=Decision.INVALID, reason=(
            f"the champion ran at {now:.1f} {metric}, {(1 - result['champion_pace']) * 100:.0f} % below its own {own:.1f} "
            f"in earlier runs: a busy machine, or a champion slowed while measured; re-run on a quiet machine "
            f"(was: KEEP, {result['reason']})"))


def check_champion_yardstick(ctx, result, out, record):
    """A KEEP that the champion's slowdown since it became the champion could explain becomes
    INVALID. Its whole-call speed over the yardstick's now against `record`, the same when it
    (or code it descends from) was measured (verdict.champion_pace; ledger.yardstick_record):
    the machine's load moves both alike, so a champion slower now is slower itself, whatever
    told it that it is the champion. The lower ends of the speedup's interval and (for
    decode) of the whole-call ratio's, times the pace's 95 % upper bound, must still clear
    the line the KEEP was given on: 1 + min_effect for a win, 1 - min_effect for a simpler
    KEEP (the A/B goes on until they do, or its budget is spent: SequentialRule). A win that
    stands records at least the whole-call speed it implies (the champion's record times
    the discounted whole-call lower end): a challenger that holds back where the speedup's
    cap hides it (a champion over 1.5x slower) cannot bank a low record. Without a record
    (rows of an older harness) nothing is checked here; check_champion_pace's floor still is."""
    pace, high, factor = verdict.champion_pace(out["samples"], record)
    if pace is None:
        return
    result["champion_yardstick_pace"] = pace
    low, whole_low = (result.get("speedup_ci") or [None])[0], (result.get("end_to_end_ci") or [None])[0]
    if result["decision"] != Decision.KEEP or low is None:
        return
    decode = ctx.settings.verdict.primary_metric == "decode_tps"
    need, floor = 1 + ctx.settings.verdict.min_effect, 1 - ctx.settings.verdict.min_effect
    line = need if low > need and (not decode or (whole_low or 0) > need) else floor  # a win, or simpler
    shown = min(low, whole_low or 0) if decode else low
    if shown * factor > line:
        if line == need and whole_low:
            result["yardstick_ratio"] = max(result.get("yardstick_ratio") or 0, math.exp(record[0]) * whole_low * factor)
        return
    if factor == 0:
        result.update(decision=Decision.INVALID, reason=(
            f"too few yardstick calls to tell the champion's pace against its record (fewer than "
            f"{verdict.YARDSTICK_MIN_CALLS}: allow more rounds, a larger max_repeats or budget_s) "
            f"(was: KEEP, {result['reason']})"))
        return
    result.update(decision=Decision.INVALID, reason=(
        f"the champion ran {pct(pace)} against its record, whole calls relative to the yardstick "
        f"(at most {pct(high)}; forgiven: {(1 - verdict.YARDSTICK_PACE_TOLERANCE) * 100:.0f} % and up to "
        f"{(verdict.YARDSTICK_WIDTH_FORGIVEN - 1) * 100:.0f} % of the bound's width): discounted by the rest, the win's "
        f"lower end {pct(shown * factor)} does not clear "
        f"{pct(line)}. A champion that slows down once it is the champion, or a machine that got busy; re-run on "
        f"a quiet machine (was: KEEP, {result['reason']})"))


# A BASELINE this far below the record of the code it descends from is told so: the KEEPs
# of its branch are held to that record (ledger.yardstick_record).
BASELINE_NOTE_BELOW = 0.9


def note_baseline_below_record(ctx, result, standing):
    """Add to a BASELINE's reason when it ran far below the record of the commits it
    descends from (or, new code on an orphan branch, of the protocol): its branch's KEEPs
    must make up the difference before they count."""
    if result["decision"] != Decision.BASELINE or not result.get("yardstick_ratio"):
        return
    row = {k: result.get(k) for k in ("commit", "code_hash", "yardstick_ratio", "yardstick_se")}
    row.update(protocol=ctx.protocol)
    record = ledger.yardstick_record(standing.rows + [row], row, standing.ancestry)[0]  # HEAD's: this commit's
    if record is not None and result["yardstick_ratio"] < BASELINE_NOTE_BELOW * math.exp(record):
        result["reason"] += (f"; it runs {pct(result['yardstick_ratio'] / math.exp(record))} against the record of "
                             f"the code it descends from (whole calls, relative to the yardstick): this branch's "
                             f"KEEPs are held to that record")
