"""Statistics behind the report and the verdict."""

import math

import numpy as np
import pytest

from harness import stats


def test_median_ci_brackets_the_median_and_is_repeatable():
    values = [10.0, 11.0, 9.5, 10.2, 10.8, 9.9]
    med, low, high = stats.median_ci(values)
    assert low <= med <= high and med == float(np.median(values))
    assert stats.median_ci(values) == (med, low, high)
    assert stats.median_ci([]) == (None, None, None)
    assert stats.median_ci([3.0]) == (3.0, 3.0, 3.0)


def test_confidence_sequence_holds_at_every_look():
    """Looked at after every 4 new values from 8 to 150, the 95 % sequence misses the true
    capped mean at ANY look in at most 5 % of runs (a fixed-n interval looked at this often
    would miss far more often), skewed and heavy-tailed values included."""
    rng = np.random.default_rng(1)
    cap = math.log(stats.RATIO_CAP)
    for draw in (lambda n: 0.1 * rng.standard_t(df=2, size=n),             # heavy tails
                 lambda n: rng.exponential(0.1, size=n) - 0.05):           # skewed
        truth = float(np.mean(np.clip(draw(400_000), -cap, cap)))
        runs, ever_missed = 200, 0
        for _ in range(runs):
            x = draw(150)
            for n in range(8, 151, 4):
                low, high = stats.capped_log_sequence(x[:n])
                if low > truth or high < truth:
                    ever_missed += 1
                    break
        assert ever_missed / runs <= 0.05


def test_confidence_sequence_needs_eight_pairs_and_narrows():
    assert stats.ratio_with_sequence([1.1] * 7)[1:] == (None, None)
    assert stats.ratio_with_sequence([]) == (None, None, None)
    rng = np.random.default_rng(2)
    ratios = np.exp(math.log(1.1) + 0.05 * rng.standard_normal(200))
    widths = [np.subtract(*stats.ratio_with_sequence(ratios[:n])[:0:-1]) for n in (20, 50, 200)]
    assert widths[0] > widths[1] > widths[2] > 0
    estimate, low, high = stats.ratio_with_sequence(ratios)
    assert low < 1.1 < high and low < estimate < high
    assert estimate == pytest.approx(math.exp(np.mean(np.log(ratios))))
    # a ratio beyond the cap counts as the cap: one disturbed call sways the figure little
    assert stats.ratio_with_sequence([1.0] * 9 + [100.0])[0] == pytest.approx(stats.RATIO_CAP ** 0.1)


def test_a_clear_speedup_is_bounded_away_from_one_and_the_shift_to_keep_is_found():
    rng = np.random.default_rng(4)
    ratios = np.exp(math.log(1.2) + 0.05 * rng.standard_normal(40))
    assert stats.ratio_with_sequence(ratios)[1] > 1.1
    assert stats.shift_to_reach(ratios, 1.01) < 1.0  # room to spare
    noise = np.exp(0.05 * rng.standard_normal(40))
    factor = stats.shift_to_reach(noise, 1.01)
    assert factor > 1.01
    assert stats.ratio_with_sequence(noise * factor)[1] >= 1.01 > stats.ratio_with_sequence(noise * factor / 1.01)[1]
    assert stats.shift_to_reach(noise[:5], 1.01) is None  # too few pairs


def test_robust_spread_ignores_one_outlier():
    rng = np.random.default_rng(3)
    x = list(0.1 * rng.standard_normal(400))
    assert abs(stats.robust_spread(x) - 0.1) < 0.015
    assert abs(stats.robust_spread(x + [50.0]) - stats.robust_spread(x)) < 0.005
    assert stats.robust_spread([1.0, 2.0, 3.0]) is None


def test_binomial_tests_hold_exact_sums_and_take_thousands_of_tokens():
    """The gates' binomial tails match the exact sum where math.comb fits a float, and still
    answer past n of about 1030 (a full preset checks thousands of timed tokens; the plain sum
    raised OverflowError there)."""
    for n, p in [(10, 0.3), (256, 0.01), (900, 0.9)]:
        for k in (0, 1, n // 3, n - 1):
            exact = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
            assert stats.binomial_mass(0, k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-15)
    assert stats.share_below(2900, 3000, 0.99, 1e-4)      # 96.7 % agreement against 99 %
    assert not stats.share_below(2975, 3000, 0.99, 1e-4)  # 99.2 %
    assert stats.share_above(80, 4000, 0.01, 1e-4) and not stats.share_above(45, 4000, 0.01, 1e-4)
    assert stats.binomial_mass(0, 20_000, 20_000, 0.5) == pytest.approx(1.0)
