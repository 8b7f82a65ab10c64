"""Statistics on raw samples: medians with bootstrap confidence intervals."""

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


def mean_se(values):
    """Return (mean, standard error of the mean) of `values`."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None, None
    se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se
