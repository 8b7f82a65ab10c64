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


def test_confidence_sequence_holds_at_every_look():
    """Looked at after every new value from 8 to 150, the 95 % sequence misses the true
    median at ANY look in at most 5 % of runs (a fixed-n interval looked at this often
    would miss far more often), heavy tails included."""
    rng = np.random.default_rng(1)
    runs, ever_missed = 600, 0
    for _ in range(runs):
        x = rng.standard_t(df=2, size=150)  # true median 0
        for n in range(8, 151):
            low, high = stats.median_confidence_sequence(x[:n])
            if low > 0 or high < 0:
                ever_missed += 1
                break
    assert ever_missed / runs <= 0.05


def test_confidence_sequence_needs_eight_values_and_narrows():
    assert stats.median_confidence_sequence([1.1] * 7) == (None, None)
    assert stats.fewest_for_sequence() == 8
    assert stats.median_confidence_sequence([1.1] * 8) == (1.1, 1.1)
    rng = np.random.default_rng(2)
    x = 1.1 + 0.05 * rng.standard_normal(200)
    widths = [np.subtract(*stats.median_confidence_sequence(x[:n])[::-1]) for n in (20, 50, 200)]
    assert widths[0] > widths[1] > widths[2] > 0
    low, high = stats.median_confidence_sequence(x)
    assert low < 1.1 < high
    med, low2, high2 = stats.median_with_sequence(list(x))
    assert (low2, high2) == (low, high) and med == float(np.median(x))


def test_robust_spread_ignores_one_outlier():
    rng = np.random.default_rng(3)
    x = list(0.1 * rng.standard_normal(400))
    assert abs(stats.robust_spread(x) - 0.1) < 0.015
    assert abs(stats.robust_spread(x + [50.0]) - stats.robust_spread(x)) < 0.005
    assert stats.robust_spread([1.0, 2.0, 3.0]) is None
