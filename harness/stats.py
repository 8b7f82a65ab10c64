"""Statistics on raw samples: medians with bootstrap and order-statistic confidence intervals."""

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


def median_interval_order(values, *, level=0.95):
    """Distribution-free interval for the median: order statistics from the binomial
    (sign-test inversion). Exact for any continuous distribution, so it does not
    under-cover with few or heavy-tailed samples the way the percentile bootstrap can.
    Returns (low, high), or (None, None) when there are too few values for `level`.
    """
    x = np.sort(np.asarray([v for v in values if v is not None], dtype=float))
    n = x.size
    alpha = 1.0 - level
    # largest k with P(Binomial(n, 1/2) <= k - 1) <= alpha / 2; interval [x_(k), x_(n+1-k)]
    k, tail = 0, 0.0
    while k < n:
        tail_next = tail + math.comb(n, k) / 2.0 ** n
        if tail_next > alpha / 2:
            break
        tail, k = tail_next, k + 1
    if k == 0:
        return None, None
    return float(x[k - 1]), float(x[n - k])


def conservative_median_ci(values, *, level=0.95):
    """(median, low, high): the wider of the bootstrap and the order-statistic intervals.

    A verdict is only as good as its interval; with a dozen noisy pairs the bootstrap
    alone is too narrow, and with too few pairs for an exact interval the data's full
    range is used.
    """
    med, boot_low, boot_high = median_ci(values, level=level)
    if med is None:
        return None, None, None
    order_low, order_high = median_interval_order(values, level=level)
    if order_low is None:
        x = [v for v in values if v is not None]
        order_low, order_high = min(x), max(x)
    return med, min(boot_low, order_low), max(boot_high, order_high)


def fewest_for_interval(level=0.95):
    """The fewest values whose order-statistic interval for the median holds `level`
    (6 for 95 %: with fewer, even the full range covers the median less often)."""
    n = 1
    while 2 * 0.5 ** n > 1.0 - level:
        n += 1
    return n


# ---------------------------------------------------------------------------
# One-sided tests for the quality gates: each fails only with confidence
# ---------------------------------------------------------------------------
def z_one_sided(alpha):
    """The standard normal quantile with `alpha` above it (alpha 0.001 -> 3.09)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1.0 - alpha)


def mean_lower_bound(values, alpha):
    """(mean, one-sided lower confidence bound at level 1 - alpha) of `values`, from the
    standard error. With one value the bound is that value; with none, (None, None)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    mean = float(np.mean(x))
    if x.size == 1 or not np.all(np.isfinite(x)):
        return mean, mean
    se = float(np.std(x, ddof=1) / math.sqrt(x.size))
    return mean, mean - z_one_sided(alpha) * se


def binomial_cdf(k, n, p):
    """P(Binomial(n, p) <= k)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1)))


def share_below(k, n, p, alpha):
    """True when k successes of n show, at level 1 - alpha, that the true share is below p."""
    return n > 0 and binomial_cdf(k, n, p) < alpha


def share_above(k, n, p, alpha):
    """True when k successes of n show, at level 1 - alpha, that the true share is above p."""
    return n > 0 and 1.0 - binomial_cdf(k - 1, n, p) < alpha
