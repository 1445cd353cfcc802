"""The interval maths of the analysis (sweeper.analysis._intervals) against independent
implementations: scipy's and statsmodels' t-intervals, statsmodels' Wilson interval, Holm
adjustment and t-test power, plus a few values worked out by hand."""

import math

import numpy as np
import pytest

from sweeper.analysis._intervals import (
    detectable_effect,
    holm,
    min_detectable_difference,
    t_interval,
    t_test_power,
    wilson_interval,
)


@pytest.mark.parametrize("values", [[0.80, 0.82, 0.84], [0.40, 0.41], [0.1, 0.5, 0.2, 0.9, 0.3],
                                    [0.62, 0.58, 0.66, 0.61, 0.63, 0.64, 0.60]])


def test_t_interval_matches_scipy_and_statsmodels(values):
    from scipy import stats
    from statsmodels.stats.weightstats import DescrStatsW

    x = np.asarray(values)
    want = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert t_interval(values) == pytest.approx(want, abs=1e-12)
    assert t_interval(values) == pytest.approx(DescrStatsW(x).tconfint_mean(0.05), abs=1e-12)


def test_t_interval_by_hand_one_seed_and_nan():
    # n = 3, mean 0.82, s = 0.02: half-width t(0.975, 2) * 0.02 / sqrt(3), t = 4.302653.
    low, high = t_interval([0.80, 0.82, 0.84])
    assert (high - low) / 2 == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3), rel=1e-9)
    assert all(math.isnan(v) for v in t_interval([0.5]))
    assert all(math.isnan(v) for v in t_interval([]))
    # NaN values are no seeds: the interval of the two that are there.
    assert t_interval([0.40, math.nan, 0.41]) == pytest.approx(t_interval([0.40, 0.41]))
    assert t_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (3, 10), (1, 1000), (999, 1000),
                                  (512, 1000), (0, 1), (1, 1), (87.5, 100)])


def test_wilson_interval_matches_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint

    want = proportion_confint(k, n, alpha=0.05, method="wilson")
    assert wilson_interval(k, n) == pytest.approx(want, abs=1e-12)


def test_wilson_interval_by_hand_and_without_images():
    # 0 of 10: low 0, high z^2 / (n + z^2) with z = 1.959964.
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    for n in (0, math.nan, -3):
        assert all(math.isnan(v) for v in wilson_interval(0, n))


P_VECTORS = [
    [0.01, 0.04, 0.03, 0.005],
    [0.02, 0.02, 0.02, 0.5],  # ties
    [0.04, 0.01, 0.04, 0.01, 0.9, 0.9],  # ties at several levels
    [0.001],
    [0.3, 0.6, 0.9, 0.95],  # capped at 1
    list(np.random.default_rng(0).uniform(0, 0.2, 12)),
]


@pytest.mark.parametrize("p", P_VECTORS)
def test_holm_matches_statsmodels(p):
    from statsmodels.stats.multitest import multipletests

    want = multipletests(p, alpha=0.05, method="holm")[1]
    np.testing.assert_allclose(holm(p), want, rtol=0, atol=1e-12)


def test_holm_leaves_nan_out_of_the_count():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, math.nan, 0.04, 0.03, math.nan]
    got = holm(p)
    assert math.isnan(got[1]) and math.isnan(got[4])
    # The finite three are three comparisons, not five.
    want = multipletests([0.01, 0.04, 0.03], method="holm")[1]
    np.testing.assert_allclose(got[[0, 2, 3]], want, atol=1e-12)
    assert list(got[[0, 2, 3]]) == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(holm([math.nan, math.nan])).all() and holm([]).shape == (0,)


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_power_and_detectable_effect_match_statsmodels(n):
    from statsmodels.stats.power import TTestIndPower, TTestPower

    # Effects where the power stays below ~0.999: statsmodels returns NaN nearer to 1 (its
    # noncentral t lower tail), where ours stays finite.
    for d in (0.5, 1.0, 1.5):
        assert t_test_power(d, n) == pytest.approx(
            TTestPower().power(d, n, 0.05, alternative="two-sided"), abs=1e-10)
        assert t_test_power(d, n, paired=False) == pytest.approx(
            TTestIndPower().power(d, n, 0.05, ratio=1, alternative="two-sided"), abs=1e-10)
    paired = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert detectable_effect(n) == pytest.approx(paired, rel=1e-6)
    two = TTestIndPower().solve_power(nobs1=n, alpha=0.05, power=0.8, ratio=1,
                                      alternative="two-sided")
    assert detectable_effect(n, paired=False) == pytest.approx(two, rel=1e-6)


def test_min_detectable_difference_scales_the_effect_by_the_sd():
    d3 = detectable_effect(3)
    assert min_detectable_difference(0.01, 3) == pytest.approx(0.01 * d3)
    # More seeds detect smaller differences; two seeds barely any (df 1).
    assert detectable_effect(10) < detectable_effect(5) < d3 < detectable_effect(2)
    assert t_test_power(detectable_effect(2), 2) == pytest.approx(0.8, abs=1e-9)
    assert math.isnan(min_detectable_difference(0.01, 1))
    assert math.isnan(min_detectable_difference(math.nan, 5))
