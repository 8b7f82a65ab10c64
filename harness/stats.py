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


def median_confidence_sequence(values, *, level=0.95, prior=1.0):
    """(low, high): bounds for the median of the distribution `values` are drawn from that
    hold at `level` at every number of values at once, so a run may look after every new
    value and stop whenever it likes (a confidence sequence; Howard & Ramdas 2022,
    "Sequential estimation of quantiles with applications to A/B-testing and best-arm
    identification", Bernoulli 28(3)).

    For a candidate median m, each value falls below m with probability 1/2; the
    likelihood ratio of a Beta(prior, prior) mixture of other probabilities against 1/2
    is a nonnegative martingale, so by Ville's inequality it ever exceeds 1/(1 - level)
    with probability at most 1 - level. The bounds are the order statistics where it
    stays below that. Assumes independent values from a continuous distribution; no
    shape, no variance. A side is None while too few values bound it (8 or more are
    needed for a finite 95 % interval).
    """
    x = np.sort(np.asarray([v for v in values if v is not None], dtype=float))
    n = x.size
    threshold = math.log(1.0 / (1.0 - level))

    def log_evidence(below):  # log of the mixture martingale with `below` of n under m
        return (n * math.log(2.0) + _log_beta(prior + below, prior + n - below) - _log_beta(prior, prior))

    outside = 0  # values that may lie on the far side of a bound: the martingale stays below the threshold
    while outside < n / 2 and log_evidence(outside) >= threshold:
        outside += 1
    if outside == 0:
        return None, None
    return float(x[outside - 1]), float(x[n - outside])


def fewest_for_sequence(level=0.95):
    """The fewest values for which median_confidence_sequence gives finite bounds (8 at 95 %)."""
    n = 1
    while median_confidence_sequence(range(n), level=level)[0] is None:
        n += 1
    return n


def _log_beta(a, b):
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def median_with_sequence(values, *, level=0.95):
    """(median, low, high): the median of `values` and its confidence sequence's bounds
    (see median_confidence_sequence); (None, None, None) without values."""
    x = [v for v in values if v is not None]
    if not x:
        return None, None, None
    return (float(np.median(x)), *median_confidence_sequence(x, level=level))


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
