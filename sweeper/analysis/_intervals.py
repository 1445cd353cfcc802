"""The interval maths of the tables, as small pure functions of numbers (numpy and scipy only):
the t-interval of a mean over seeds, the Wilson interval of one run's binomial accuracy, Holm's
step-down adjustment of a table's p-values, and the smallest difference n seeds could detect.

Why a t-interval and no bootstrap: with 3-5 seeds the percentile bootstrap undercovers badly
(its interval lies within the range of the resampled means, and with n = 3 only 10 distinct
resamples exist), while the t-interval is exact for normal seed-to-seed noise and the standard
a reviewer expects. Simulated on normal seeds (4000 draws, 1000 resamples each, numpy seed 0),
the nominal 95% intervals covered the true mean 95.0% (t) vs 73.6% (bootstrap) at n = 3, and
94.7% vs 83.4% at n = 5 (`python benchmarks/interval_coverage.py` prints them). Nothing here
depends on statsmodels; the tests compare with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (NaN dropped): mean ± t(n-1) * s / sqrt(n).

    (NaN, NaN) for fewer than 2 values: one seed says nothing about seed-to-seed spread.
    Identical values give the zero-width interval the formula gives (s = 0)."""
    from scipy import stats

    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    mean = float(x.mean())
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean - half, mean + half


def wilson_interval(successes: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n (Wilson 1927).

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point
    at 0 or n successes, which is where worst-class accuracies under attack often sit.
    `successes` may be fractional (a mean accuracy times n). (NaN, NaN) when n is not > 0."""
    from scipy import stats

    if not (np.isfinite(n) and n > 0 and np.isfinite(successes)):
        return math.nan, math.nan
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Rounding can push a bound a hair outside [0, 1] at p = 0 or 1.
    return max(0.0, centre - half), min(1.0, centre + half)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order.

    NaN p-values (no test was possible) are not comparisons: they stay NaN and do not count
    in m. With the finite p sorted ascending, p_(i) is adjusted to
    max_{j <= i} min(1, (m - j + 1) p_(j)); tied p-values get the same adjusted value."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if not m:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def t_test_power(effect: float, n: int, *, paired: bool = True, alpha: float = ALPHA) -> float:
    """Power of the two-sided t-test at standardised effect `effect` (difference / sd).

    paired: one-sample t on n paired differences (df n - 1, noncentrality d sqrt(n));
    otherwise two independent samples of n each with a common sd (df 2n - 2, d sqrt(n / 2))."""
    from scipy import stats

    df = n - 1 if paired else 2 * n - 2
    nc = effect * math.sqrt(n if paired else n / 2)
    crit = stats.t.isf(alpha / 2, df)
    # The lower tail as the upper tail of the mirrored noncentrality: scipy's nct.cdf far out
    # in the lower tail returns NaN where this returns its true, negligible value.
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def detectable_effect(n: int, *, paired: bool = True, alpha: float = ALPHA,
                      power: float = POWER) -> float:
    """The smallest standardised effect the two-sided t-test detects with `power` at n
    (NaN for n < 2: no test)."""
    from scipy import optimize

    if n < 2:
        return math.nan
    # Power rises with the effect; at n = 2 paired (df 1) 80% needs an effect near 10.
    high = 1.0
    while t_test_power(high, n, paired=paired, alpha=alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda d: t_test_power(d, n, paired=paired, alpha=alpha)
                                 - power, 1e-9, high, xtol=1e-10))


def min_detectable_difference(sd: float, n: int, *, paired: bool = True, alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """The smallest true difference (in the units of `sd`) that n seeds would detect with
    `power`: `detectable_effect` times the observed sd (of the paired differences, or of one
    group's values for two samples). NaN without a finite sd."""
    if not np.isfinite(sd) or n < 2:
        return math.nan
    return detectable_effect(n, paired=paired, alpha=alpha, power=power) * float(sd)
