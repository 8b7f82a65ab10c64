"""Statistics on raw samples: medians with bootstrap intervals (one worker's figures), the
confidence sequence of the paired ratios (the verdict), one-sided tests (the gates)."""

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 4000
_SEED = 20261121  # fixed, so the same samples always give the same interval


def median_ci(values, *, level=0.95, resamples=BOOTSTRAP_RESAMPLES):
    """Return (median, low, high): the median and its percentile-bootstrap interval.

    With one sample the interval is that sample; with none, all three are None.
    """
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return None, None, None
    med = float(np.median(x))
    if x.size == 1:
        return med, med, med
    rng = np.random.default_rng(_SEED)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    boot = np.median(x[idx], axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return med, float(low), float(high)


# ---------------------------------------------------------------------------
# The verdict's confidence sequence: the paired ratios' capped geometric mean
# ---------------------------------------------------------------------------
RATIO_CAP = 1.5      # a pair's ratio counts as at most x1.5 and at least /1.5 (one disturbed call sways little)
MIN_PAIRS = 8        # no decision on fewer pairs, whatever the interval says
_TRUNCATION = 0.9    # bets stake at most this share of the capital (Waudby-Smith & Ramdas's c)
_GRID = np.linspace(0.0005, 0.9995, 1999)  # candidate means on the [0, 1] scale


def capped_log_sequence(log_values, *, level=0.95, cap=RATIO_CAP):
    """(low, high): bounds for the mean of the log values capped to +-log(cap) (for paired
    ratios: the log of their capped geometric mean) that hold at `level` at every number of
    values at once, so a run may look after every new value and stop whenever it likes (a
    confidence sequence). (None, None) without values.

    Betting: for a candidate mean m, a bettor stakes, before each value, a share of its
    capital on the value lying above m (and another on below), sized from the values before
    it (the "aGRAPA" bet); under mean m its capital is a nonnegative martingale, so by
    Ville's inequality it ever reaches 1/(1 - level) with probability at most 1 - level.
    The bounds are the means where it stays below that (Waudby-Smith & Ramdas 2024,
    "Estimating means of bounded random variables by betting", JRSS-B 86(1); the hedged
    capital process of their Theorem 3). Assumes independent values; no shape, no
    variance: the cap bounds them. Uses the magnitudes, so it needs about half the pairs
    of a sign-based median sequence for the same effect.
    """
    bound = math.log(cap)
    x = np.clip(np.asarray([v for v in log_values if v is not None], dtype=float), -bound, bound)
    if x.size == 0:
        return None, None
    y = (x + bound) / (2 * bound)  # on [0, 1]
    t = np.arange(1, y.size + 1)
    before = np.concatenate([[0.0], np.cumsum(y)[:-1]])
    mean_before = (0.5 + before) / t  # predictable: from the values before each one
    mean_after = (0.5 + np.cumsum(y)) / (t + 1)
    var_before = (0.01 + np.concatenate([[0.0], np.cumsum((y - mean_after) ** 2)[:-1]])) / t
    m = _GRID[:, None]
    gap = mean_before[None, :] - m
    stake = gap / (var_before[None, :] + gap * gap)
    up = np.clip(stake, 0, _TRUNCATION / m)
    down = np.clip(-stake, 0, _TRUNCATION / (1 - m))
    log_up = np.log1p(up * (y - m)).sum(axis=1)
    log_down = np.log1p(-down * (y - m)).sum(axis=1)
    log_capital = np.logaddexp(log_up, log_down) - math.log(2)
    inside = _GRID[log_capital < math.log(1 / (1 - level))]
    if inside.size == 0:  # the true mean lies between two candidates: widen to them
        inside = _GRID[[int(np.argmin(log_capital))]]
    step = _GRID[1] - _GRID[0]
    low, high = max(inside.min() - step, 0.0), min(inside.max() + step, 1.0)
    return float(low * 2 * bound - bound), float(high * 2 * bound - bound)


def ratio_with_sequence(ratios, *, level=0.95, cap=RATIO_CAP):
    """(estimate, low, high) for positive paired ratios: their geometric mean with each
    ratio capped to [1/cap, cap], and that figure's confidence sequence
    (capped_log_sequence). low and high are None while there are fewer than MIN_PAIRS
    ratios; (None, None, None) without any."""
    logs = [math.log(r) for r in ratios if r is not None and r > 0]
    if not logs:
        return None, None, None
    bound = math.log(cap)
    estimate = math.exp(float(np.mean(np.clip(logs, -bound, bound))))
    if len(logs) < MIN_PAIRS:
        return estimate, None, None
    low, high = capped_log_sequence(logs, level=level, cap=cap)
    return estimate, math.exp(low), math.exp(high)


def shift_to_reach(ratios, line, *, level=0.95, cap=RATIO_CAP):
    """The smallest factor every ratio could be multiplied by with the sequence's lower
    bound still at or above `line` (below 1 when these pairs already reach it, with room to
    spare); None with too few ratios or when no factor up to cap**2 does: how far these
    pairs were from deciding."""
    if ratio_with_sequence(ratios, level=level, cap=cap)[1] is None:
        return None
    reaches = lambda f: ratio_with_sequence([r * f for r in ratios], level=level, cap=cap)[1] >= line  # noqa: E731
    low, high = (1 / cap ** 2, 1.0) if reaches(1.0) else (1.0, cap ** 2)
    if not reaches(high):
        return None
    for _ in range(12):  # the factor to within 0.02 %
        mid = math.sqrt(low * high)
        low, high = (low, mid) if reaches(mid) else (mid, high)
    return high


def robust_spread(values):
    """A standard deviation that one outlier cannot inflate: the interquartile range / 1.349
    (equal to the standard deviation for normal data). None with fewer than 4 values."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size < 4:
        return None
    q1, q3 = np.quantile(x, [0.25, 0.75])
    return float((q3 - q1) / 1.349)


# ---------------------------------------------------------------------------
# One-sided tests for the quality gates: each fails only with confidence
# ---------------------------------------------------------------------------
def z_one_sided(alpha):
    """The standard normal quantile with `alpha` above it (alpha 0.001 -> 3.09)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1.0 - alpha)


_T_95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
         10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697}


def t_one_sided(alpha, df):
    """Student's t quantile with `alpha` above it, for alpha 0.05 (a table: numpy has none;
    between its rows the next smaller df's, which is larger: conservative); the normal's
    for other alphas or df over 30."""
    if alpha != 0.05 or df > 30:
        return z_one_sided(alpha)
    return _T_95[max(d for d in _T_95 if d <= df)]


def mean_lower_bound(values, alpha, *, spread_cap=None):
    """(mean, one-sided lower confidence bound at level 1 - alpha) of `values`, from the
    standard error: of the values brought within +-spread_cap when it is given (a few huge
    values would otherwise widen it at will), while the mean is the values' own. With one
    value the bound is that value; with none, (None, None)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    mean = float(np.mean(x))
    if x.size == 1 or not np.all(np.isfinite(x)):
        return mean, mean
    spread = x if spread_cap is None else np.clip(x, -spread_cap, spread_cap)
    se = float(np.std(spread, ddof=1) / math.sqrt(x.size))
    return mean, mean - z_one_sided(alpha) * se


def binomial_mass(low, high, n, p):
    """P(low <= Binomial(n, p) <= high), summed in log space (math.comb overflows a float
    past n of about 1030, and a full preset checks thousands of timed tokens)."""
    low, high = max(low, 0), min(high, n)
    if low > high:
        return 0.0
    if p <= 0.0 or p >= 1.0:
        return float(low <= (n if p >= 1.0 else 0) <= high)
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return min(1.0, math.fsum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                                       + i * log_p + (n - i) * log_q) for i in range(low, high + 1)))


def share_below(k, n, p, alpha):
    """True when k successes of n show, at level 1 - alpha, that the true share is below p."""
    return n > 0 and binomial_mass(0, k, n, p) < alpha


def share_above(k, n, p, alpha):
    """True when k successes of n show, at level 1 - alpha, that the true share is above p."""
    return n > 0 and binomial_mass(k, n, n, p) < alpha
