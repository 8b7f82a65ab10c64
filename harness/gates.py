"""The quality gates: each one is a one-sided statistical test with a stated error rate.

A gate fails only when its figure is beyond the threshold WITH CONFIDENCE: the whole
family of gates shares `quality.gates.false_alarm_rate` (harness.yaml, 1 %), split
equally between them (Bonferroni), so an honest pipeline fails any gate in at most that
share of runs. The tests, per gate (n = positions, calls or tasks behind the figure):

  mean gates (perplexity, kl_mean, timed_kl_mean, repetition): the figure's one-sided
      lower bound, mean - z * standard error, is above the threshold (z for alpha per gate,
      about 3.1); in the standard error each position counts within +-POSITION_CAP_NATS
      (1 nat), or a few huge values would widen it at the pipeline's will;
  self_consistency, continuation: were the timed tokens drawn from the pipeline's own
      reported distribution / from the reference's? Each token's place in it (token_pit in
      quality.py) has mean 1/2 and a variance known from the distribution,
      (1 - sum p^3) / 12, when it was; the gate fails when the z-score of the sum,
      (sum(u) - n (1/2 + margin)) / sqrt(sum of those variances), is above z (sharper
      sampling, as temperature below 1 or top-p, only lowers the mean: it never fails);
  self_consistency_tail: the timed tokens sit further out in the distribution the pipeline
      reported for them than draws from it would (each place drawn uniformly within ties, so
      for such draws it is uniform, and sharper sampling only moves it down): at some u in
      TAIL_PLACES (0.5 ... 0.999), more at or beyond u than a share of 1 - u gives, among
      all tokens or the half where the reference is flatter or sharper (binomial, alpha
      split between the tests); a mix of argmax tokens and unlikely ones keeps the mean
      under 1/2 but not the tail;
  continuation_tail: the same in the reference's distribution, against continuation_tail_factor
      x (1 - u): a pipeline that emits tokens the reference finds absurd and reports them in
      the middle of its own rows keeps the continuation mean under 1/2 with likely tokens
      elsewhere;
  kl_p99, timed_kl_p99: more positions have a KL above the threshold than a true 99th
      percentile at the threshold would give (binomial tail below alpha);
  top1_agreement, timed_top1, sanity: fewer agreements / passes than a true share at the
      threshold would give (binomial tail below alpha).

bench/quality_false_alarms.py measures the false-alarm rate on honest changes and the
detection of known damage.
"""

import math

import numpy as np

from harness import stats


# The self-consistency tail: tokens this far out in the distribution the pipeline reported
# for them (quality.token_pit, drawn within ties). Drawn from it, 1 % of tokens land there
# (fewer when sampling sharper); a red team mixed argmax tokens with uniformly random ones, a
# third of them: the mean place stayed under 1/2 (the mean test passed), the text was word salad.
TAIL_PIT = 0.99
# Where the tail is tested, each with a binomial test. One whole-range bound (DKW) instead
# passed red team 9's every 8th token at 0.975-0.987 (excess 0.10 under a bound of 0.12 at
# n = 256); a place every factor of 2-2.5 leaves such shaping at most one step's share.
TAIL_PLACES = (0.5, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995, 0.999)


# In a mean test's standard error a position counts at most this many nats either way: the
# spread is otherwise the pipeline's to widen. Red team 10 hid a timed KL of 0.46 per token
# (9x the budget) behind two positions at 30,000 nats: the bound went below zero. The mean
# stays the positions' own: capped as well, it let red team 14 show kl_mean 41 as a pass
# (4 of 96 positions at ~1000 nats, counted as 1 each). So huge values raise the mean by far
# more than they can widen the interval.
POSITION_CAP_NATS = 1.0


def _gate(name, value, op, threshold, failed, bound=None, test=""):
    return {"name": name, "value": value, "op": op, "threshold": threshold, "passed": not failed,
            "bound": bound, "test": test}


def _mean_gate(name, shown, values, threshold, alpha, *, shift=0.0, show_threshold=None, cap=None):
    """Fail when the lower bound of mean(values) + shift is above `threshold`; with a cap,
    the standard error is of the values brought within [-cap, cap] (the mean is theirs)."""
    mean, low = stats.mean_lower_bound(values, alpha, spread_cap=cap)
    if mean is None or not np.isfinite(mean):
        return _gate(name, shown, "<=", show_threshold or threshold, True, None, "mean: no finite figure")
    failed = low + shift > threshold
    return _gate(name, shown, "<=", threshold if show_threshold is None else show_threshold, failed,
                 low + shift, "mean - z*se")


def _pit_gate(name, pits, variances, margin, alpha):
    """Fail when the tokens sit lower in their distributions than draws from them would, with
    confidence: a z-test on the summed PIT with its known null variance."""
    n = len(pits)
    mean = float(np.mean(pits)) if n else None
    if mean is None or not np.isfinite(mean):
        return _gate(name, mean, "<=", 0.5 + margin, True, None, "PIT: no finite figure")
    spread = math.sqrt(max(float(np.sum(variances)), 1e-12))
    z = (float(np.sum(pits)) - n * (0.5 + margin)) / spread
    low = mean - stats.z_one_sided(alpha) * spread / n  # the mean's one-sided lower bound
    return _gate(name, mean, "<=", 0.5 + margin, z > stats.z_one_sided(alpha), low,
                 f"PIT z = {z:.2f}: known variance")


def _quantile_gate(name, shown, values, threshold, alpha, quantile=0.99):
    """Fail when more values exceed `threshold` than a true `quantile` at it would allow."""
    x = np.asarray(values, dtype=float)
    above = int(np.sum(~(x <= threshold)))  # NaN counts as above
    failed = stats.share_above(above, x.size, 1 - quantile, alpha)
    return _gate(name, shown, "<=", threshold, failed, above, f"{above}/{x.size} above: binomial")


def _tail_gate(name, shown, pits, alpha, *, flatness, factor=1.0):
    """Fail when the tokens sit further out in their distributions than draws from them (or
    sharper ones) would, with confidence: their places, drawn within ties, are uniform for
    such draws, so the share at or beyond each u in TAIL_PLACES is 1 - u (less when sharper).
    One binomial test per place against `factor` x (1 - u), on all tokens and on each half
    of them by `flatness` (the reference's entropy at each), alpha split between them all
    (Bonferroni); a place where that allows every token is not tested.

    The halves, because draws are uniform at every position, flat or not: a red team took
    argmax tokens where the reference was peaked and tokens at 0.89-0.945 where it was flat
    (30 % of them, word salad), within every allowance of the whole."""
    x = np.nan_to_num(np.asarray(pits, dtype=float), nan=1.0)  # NaN counts as beyond
    n = x.size
    order = np.argsort(np.nan_to_num(np.asarray(flatness, dtype=float), nan=np.inf), kind="stable")
    groups = [("", x), (" of the sharper half", x[order[:n // 2]]), (" of the flatter half", x[order[n // 2:]])]
    each = alpha / (len(TAIL_PLACES) * len(groups))
    tests = [(u, int(np.sum(g >= u)), g.size, label) for label, g in groups for u in TAIL_PLACES]
    failed = [t for t in tests if factor * (1 - t[0]) < 1 and stats.share_above(t[1], t[2], factor * (1 - t[0]), each)]
    u, k, m, label = failed[0] if failed else next(t for t in tests if t[0] == TAIL_PIT)
    return _gate(name, shown, "<=", round(factor * (1 - TAIL_PIT), 6), bool(failed), k,
                 f"{k}/{m}{label} beyond {u}: binomial at {len(TAIL_PLACES)} places x {len(groups)}")


def _share_gate(name, flags, threshold, alpha):
    """Fail when the share of true `flags` is below `threshold` with confidence."""
    k, n = int(np.sum(flags)), len(flags)
    share = k / n if n else None
    failed = n == 0 or stats.share_below(k, n, threshold, alpha)
    return _gate(name, share, ">=", threshold, failed, k, f"{k}/{n}: binomial")


def gates(settings, measured, reference):
    """Every gate with its figure, threshold, test and verdict.

    Args:
        measured: what quality measured for the pipeline (quality.measure_* outputs merged).
        reference: the cached reference (its sanity).
    """
    g = settings.quality.gates
    corpus, timed = measured["corpus"], measured["timed"]
    names = ["perplexity", "kl_mean", "kl_p99", "top1_agreement", "timed_kl_mean", "timed_kl_p99",
             "timed_top1", "self_consistency", "self_consistency_tail", "continuation", "continuation_tail", "sanity",
             "repetition"]
    alpha = g.false_alarm_rate / len(names)
    sanity_min = max(reference["sanity"] - g.sanity_tolerance, g.sanity_floor)
    log_ratio = math.log1p(g.perplexity_increase_pct / 100)
    out = [
        _mean_gate("perplexity", measured["perplexity"], corpus["nll_diff"], log_ratio, alpha, cap=POSITION_CAP_NATS,
                   show_threshold=measured["reference_perplexity"] * (1 + g.perplexity_increase_pct / 100)),
        _mean_gate("kl_mean", measured["kl_mean"], corpus["kl"], g.kl_mean_max, alpha, cap=POSITION_CAP_NATS),
        _quantile_gate("kl_p99", measured["kl_p99"], corpus["kl"], g.kl_p99_max, alpha),
        _share_gate("top1_agreement", corpus["top1"], g.top1_agreement_min, alpha),
        _mean_gate("timed_kl_mean", measured["timed_kl_mean"], timed["kl"], g.kl_mean_max, alpha,
                   cap=POSITION_CAP_NATS),
        _quantile_gate("timed_kl_p99", measured["timed_kl_p99"], timed["kl"], g.kl_p99_max, alpha),
        _share_gate("timed_top1", timed["top1"], g.top1_agreement_min, alpha),
        _pit_gate("self_consistency", timed["own_pit"], timed["own_pit_var"], g.self_consistency_margin, alpha),
        _tail_gate("self_consistency_tail", measured["self_consistency_tail"], timed["own_pit_drawn"], alpha,
                   flatness=timed["ref_entropy"]),
        _pit_gate("continuation", timed["ref_pit"], timed["ref_pit_var"], g.continuation_margin, alpha),
        _tail_gate("continuation_tail", measured["continuation_tail"], timed["ref_pit_drawn"], alpha,
                   flatness=timed["ref_entropy"], factor=g.continuation_tail_factor),
        _share_gate("sanity", [a["passed"] for a in measured["tasks"]], sanity_min, alpha),
        _mean_gate("repetition", measured["repetition"], measured["repetition_per_call"],
                   g.repetition_max, alpha),
    ]
    assert [x["name"] for x in out] == names
    return out


def failed_gate_reason(gate_list):
    """One line naming the failed gates, their figures and thresholds, or '' when all pass."""
    parts = []
    for g in gate_list:
        if not g["passed"]:
            value = g["value"]
            shown = "nan" if value is None or not np.isfinite(value) else f"{value:.4g}"
            worse = ">" if g["op"] == "<=" else "<"
            parts.append(f"{g['name']} {shown} {worse} {g['threshold']:.4g} ({g['test']})")
    return ("quality gate failed: " + "; ".join(parts)) if parts else ""


def quality_score(kl_mean):
    """exp(-mean KL): 1.0 means the pipeline predicts exactly like the float32 reference;
    0.95 means it keeps ~95 % of the reference's per-token likelihood."""
    if kl_mean is None or not np.isfinite(kl_mean):
        return 0.0
    return float(math.exp(-max(kl_mean, 0.0)))
