"""Statistics behind the report and the verdict."""

import numpy as np

from harness import stats


def test_median_ci_brackets_the_median_and_is_repeatable():
    values = [10.0, 11.0, 9.5, 10.2, 10.8, 9.9]
    med, low, high = stats.median_ci(values)
    assert low <= med <= high and med == float(np.median(values))
    assert stats.median_ci(values) == (med, low, high)
    assert stats.median_ci([]) == (None, None, None)
    assert stats.median_ci([3.0]) == (3.0, 3.0, 3.0)


def test_order_statistic_interval_has_its_coverage_where_bootstrap_falls_short():
    rng = np.random.default_rng(1)
    trials, n = 1500, 12
    hits_order = hits_boot = 0
    for _ in range(trials):
        x = rng.standard_t(df=2, size=n)  # heavy tails, true median 0
        low, high = stats.median_interval_order(x)
        hits_order += low <= 0 <= high
        _, blow, bhigh = stats.median_ci(x, resamples=400)
        hits_boot += blow <= 0 <= bhigh
    assert hits_order / trials >= 0.94
    assert hits_order >= hits_boot


def test_conservative_interval_is_the_wider_one():
    x = [0.9, 1.2, 1.05, 0.98, 1.1, 1.3, 0.95, 1.0, 1.02, 1.15, 0.97, 1.08]
    med, low, high = stats.conservative_median_ci(x)
    _, blow, bhigh = stats.median_ci(x)
    olow, ohigh = stats.median_interval_order(x)
    assert (low, high) == (min(blow, olow), max(bhigh, ohigh))
    # too few values for an exact 95 % interval: the full range
    assert stats.conservative_median_ci([1.0, 2.0, 3.0])[1:] == (1.0, 3.0)
