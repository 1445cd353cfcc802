"""Pure pandas on the runs table: coverage, the runs that count, seed aggregates with their
t-intervals, paired tests against the reference (with the difference's interval, the smallest
difference they could detect, and Holm's adjustment per table), Pareto fronts, best flags.
Only finished runs count: pruned and failed trials never enter a table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis._intervals import holm, min_detectable_difference, t_interval
from sweeper.analysis._model import (
    BEST_METRICS,
    BEST_ONLY,
    LOWER_IS_BETTER,
    METRICS,
    REFERENCE,
    ROBUST_OVERFIT_GAP,
    UNRANKED,
    best_name,
    checkpoint_of,
    is_autoattack,
)
from sweeper.contract import AUTOATTACK_METRICS, RUN_STATES, run_state


def coverage(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell: how many trials completed, were pruned, failed, are running or interrupted
    (`sweeper.contract.run_state`)."""
    state = pd.Series([run_state(status, outcome) for status, outcome
                       in zip(runs["status"], runs["outcome"], strict=True)],
                      index=runs.index, name="state")
    table = pd.crosstab(runs["cell"], state)
    for column in RUN_STATES:
        if column not in table:
            table[column] = 0
    return table[list(RUN_STATES)]


def select_runs(runs: pd.DataFrame, metric: str, mode: str = "max") -> pd.DataFrame:
    """The runs that count, with a `source` column: `confirm` or `best tune`.

    Per cell: its completed confirmation runs when there are any (aggregated over seeds);
    of a cell that confirmed several configs (`tuned_by` groups), those of the config with
    the best mean final `metric` (`best_confirmed`). Otherwise the single completed tuning
    run with the best final `metric` (n = 1). Pruned, failed and running trials never count.
    """
    done = runs[runs["outcome"].eq("completed")]
    picked = []
    for _cell, group in done.groupby("cell", sort=True):
        confirm = group[group["phase"].eq("confirm")]
        if len(confirm):
            picked.append(best_confirmed(confirm, metric, mode).assign(source="confirm"))
            continue
        tune = group[group["phase"].eq("tune")]
        if metric not in tune:
            continue
        tune = tune[np.isfinite(pd.to_numeric(tune[metric], errors="coerce"))]
        if not len(tune):
            continue
        # Ties go to the earlier trial id, so the pick does not depend on MLflow's order.
        tune = tune.sort_values([metric, "trial_id"], ascending=[mode == "min", True])
        picked.append(tune.iloc[[0]].assign(source="best tune"))
    if not picked:
        return runs.iloc[0:0].assign(source=pd.Series(dtype=object))
    return pd.concat(picked, ignore_index=True)


def cells_without_test_metrics(selected: pd.DataFrame, metrics: Sequence[str] = METRICS,
                               ) -> list[str]:
    """The cells reported by a best tuning run that carries none of `metrics`: with
    `confirm.tune_test: false`, tuning runs skip the test split, so such a cell has nothing
    to show until its confirmation runs finish."""
    tune = selected[selected["source"].eq("best tune")]
    return sorted(cell for cell, runs in tune.groupby("cell")
                  if not any(_has(runs, m) for m in metrics))


def n_confirmed_configs(confirm: pd.DataFrame) -> int:
    """How many configs a cell's confirmation runs re-run: their distinct `tuned_by` tags
    (runs of older sweeps carry none: one config)."""
    if "tuned_by" not in confirm:
        return 1
    return max(1, confirm["tuned_by"].nunique(dropna=False))


def best_confirmed(confirm: pd.DataFrame, metric: str, mode: str = "max") -> pd.DataFrame:
    """The runs of the one config the tables report, of a cell's confirmation runs: with
    several configs (a Pareto set), the one whose mean final `metric` over its seeds is best;
    ties go to the earliest tuning trial id, and a config without a value never wins."""
    if n_confirmed_configs(confirm) == 1:
        return confirm
    # A missing tag (NaN) keeps its runs together as one group rather than dropping them.
    by = confirm["tuned_by"].fillna("")
    values = pd.to_numeric(confirm[metric], errors="coerce") if metric in confirm else np.nan
    means = pd.Series(values, index=confirm.index).groupby(by).mean().dropna()
    if not len(means):
        return confirm[by.eq(by.min())]
    ranked = means.reset_index().set_axis(["tuned_by", "mean"], axis=1)
    ranked = ranked.sort_values(["mean", "tuned_by"], ascending=[mode == "min", True])
    return confirm[by.eq(ranked["tuned_by"].iloc[0])]


def reported_metrics(selected: pd.DataFrame) -> tuple[str, ...]:
    """The tables' metrics: METRICS, then each AutoAttack metric some selected run carries."""
    return (*METRICS, *(m for m in AUTOATTACK_METRICS if _has(selected, m)))


def best_metrics(selected: pd.DataFrame) -> tuple[str, ...]:
    """The best-checkpoint block's metrics, each only when some selected run carries it: the
    `test_best_*` twins, the robust-overfitting gap, the best epoch."""
    return tuple(m for m in (*BEST_METRICS, *BEST_ONLY) if _has(selected, m))


def with_overfit_gap(selected: pd.DataFrame) -> pd.DataFrame:
    """`selected` with ROBUST_OVERFIT_GAP per run (best-checkpoint minus last-epoch robust
    accuracy; NaN for a run without either), when some run has a best checkpoint."""
    best = best_name("test_robust_acc")
    if not _has(selected, best):
        return selected
    return selected.assign(**{ROBUST_OVERFIT_GAP: numeric(selected, best)
                              - numeric(selected, "test_robust_acc")})


def aggregate(selected: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean, sample std (NaN for n = 1), n and the 95% t-interval of the mean (`ci_low`,
    `ci_high`; NaN for n = 1) over a cell's selected runs, per metric."""
    rows = []
    for (scenario, method), group in selected.groupby(["scenario", "method"], sort=False):
        for metric in metrics:
            values = numeric(group, metric).dropna().to_numpy(float)
            n = len(values)
            low, high = t_interval(values)
            rows.append({
                "scenario": scenario, "method": method, "metric": metric,
                "mean": float(values.mean()) if n else math.nan,
                "std": float(values.std(ddof=1)) if n >= 2 else math.nan,
                "n": n, "ci_low": low, "ci_high": high, "source": group["source"].iloc[0],
            })
    return pd.DataFrame(rows, columns=["scenario", "method", "metric", "mean", "std", "n",
                                       "ci_low", "ci_high", "source"])


# What a paired comparison reports (besides its note); NaN where it cannot be computed.
_TEST_FIELDS = ("mean_diff", "diff_ci_low", "diff_ci_high", "t", "p", "min_detectable_diff")


def paired_test(values: pd.Series, reference: pd.Series) -> dict[str, Any]:
    """Paired t-test of values - reference over the seeds both have (index = seed), with the
    95% t-interval of the mean difference (`diff_ci_low`, `diff_ci_high`) and the smallest
    true difference this test would detect with 80% power at its n and the observed sd of
    the differences (`min_detectable_diff`, two-sided, alpha 0.05)."""
    from scipy import stats

    pairs = pd.concat([values.rename("a"), reference.rename("b")], axis=1).dropna()
    n = len(pairs)
    out: dict[str, Any] = {"n_pairs": n, **dict.fromkeys(_TEST_FIELDS, math.nan), "note": ""}
    if n:
        out["mean_diff"] = float((pairs["a"] - pairs["b"]).mean())
    if n < 2:
        out["note"] = f"paired test needs >= 2 seeds run by both methods, have {n}"
        return out
    diff = (pairs["a"] - pairs["b"]).to_numpy(float)
    # Identical differences on every seed leave t undefined (0/0, or x/0 = inf with a
    # precision warning from scipy); report that instead of an infinite t. The interval and
    # the detectable difference would be zero-wide, which no reader should take for
    # certainty: they are left out too.
    if diff.std(ddof=1) <= 1e-12 * max(1.0, abs(diff.mean())):
        out["note"] = "differences identical on every seed: t undefined"
        return out
    out["diff_ci_low"], out["diff_ci_high"] = t_interval(diff)
    out["min_detectable_diff"] = min_detectable_difference(float(diff.std(ddof=1)), n)
    res = stats.ttest_rel(pairs["a"].to_numpy(float), pairs["b"].to_numpy(float))
    out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


def paired_tests(selected: pd.DataFrame, reference: str = REFERENCE,
                 metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Each method minus the reference in the same scenario, paired by seed, per metric,
    with Holm's adjustment per table (`holm_tables`). The best checkpoint's own metrics
    (robust-overfitting gap, best epoch) are not compared."""
    rows = []
    metrics = [m for m in metrics if m not in BEST_ONLY]
    for scenario, group in selected.groupby("scenario", sort=False):
        ref = group[group["method"].eq(reference)]
        for method, runs in group.groupby("method", sort=False):
            if method == reference:
                continue
            for metric in metrics:
                empty = {"n_pairs": 0, **dict.fromkeys(_TEST_FIELDS, math.nan)}
                if not len(ref):
                    res = {**empty, "note": f"no {reference} runs in this scenario"}
                elif "best tune" in set(runs["source"]) | set(ref["source"]):
                    # A best tuning run's seed is whatever the search drew: pairing it with
                    # another cell's best run by seed would be an invented comparison.
                    res = {**empty, "note": "no confirmation runs (one best tuning run per "
                                            "cell): paired test not applicable"}
                elif is_autoattack(metric) and not (_has(runs, metric) and _has(ref, metric)):
                    # Say why plainly, not as "0 pairs": these runs did not run AutoAttack.
                    res = {**empty, "note": "no AutoAttack metrics in its runs or the "
                                            f"{reference} runs: AutoAttack not compared"}
                else:
                    res = paired_test(_by_seed(runs, metric), _by_seed(ref, metric))
                rows.append({"scenario": scenario, "method": method, "metric": metric,
                             "checkpoint": checkpoint_of(metric), **res})
    columns = ["scenario", "method", "metric", "checkpoint", *_TEST_FIELDS, "n_pairs", "note"]
    return holm_tables(pd.DataFrame(rows, columns=columns))


def holm_tables(tests: pd.DataFrame) -> pd.DataFrame:
    """`tests` with `p_holm` and `holm_n`: Holm's adjustment over the comparisons of one
    table, i.e. of one scenario and one checkpoint (last epoch, or best by validation): every
    method against the reference in every metric of that table that has a p-value.

    The family is the table a reader scans for significant cells, so that is the set whose
    familywise error Holm controls; `holm_n` is its size (NaN p-values are no comparison)."""
    tests = tests.assign(p_holm=math.nan, holm_n=0)
    for _key, group in tests.groupby(["scenario", "checkpoint"], sort=False):
        tests.loc[group.index, "p_holm"] = holm(group["p"].to_numpy(float))
        tests.loc[group.index, "holm_n"] = int(group["p"].notna().sum())
    return tests


def _has(runs: pd.DataFrame, metric: str) -> bool:
    """Whether some run carries a value of `metric`."""
    return bool(numeric(runs, metric).notna().any())


def numeric(runs: pd.DataFrame, metric: str) -> pd.Series:
    """`runs[metric]` as floats, NaN where a run has no value; all NaN when no run has the
    column (mid-sweep, no selected run may carry a `test_*` metric yet)."""
    if metric not in runs:
        return pd.Series(np.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[metric], errors="coerce").astype(float)


def _by_seed(runs: pd.DataFrame, metric: str) -> pd.Series:
    values = numeric(runs, metric)
    series = pd.Series(values.to_numpy(float), index=runs["seed"].to_numpy())
    # Two runs with the same seed in one cell would make the pairing ambiguous; keep the last.
    return series[~series.index.duplicated(keep="last")]


def pareto_front(points: pd.DataFrame, x: str = "natural", y: str = "robust") -> pd.Series:
    """True for points no other point dominates (>= on both and > on one), within one set."""
    xs, ys = points[x].to_numpy(float), points[y].to_numpy(float)
    on_front = []
    for i in range(len(points)):
        dominated = np.any((xs >= xs[i]) & (ys >= ys[i]) & ((xs > xs[i]) | (ys > ys[i])))
        on_front.append(bool(np.isfinite(xs[i]) and np.isfinite(ys[i]) and not dominated))
    return pd.Series(on_front, index=points.index, name="pareto")


def pareto_by_scenario(agg: pd.DataFrame) -> pd.DataFrame:
    """(scenario, method) -> natural, robust means and whether it is on the scenario's front."""
    wide = agg.pivot_table(index=["scenario", "method"], columns="metric", values="mean",
                           dropna=False).reset_index()
    wide = wide.rename(columns={"test_natural_acc": "natural", "test_robust_acc": "robust"})
    for column in ("natural", "robust"):
        if column not in wide:
            wide[column] = math.nan
    wide["pareto"] = False
    for _scenario, group in wide.groupby("scenario", sort=False):
        wide.loc[group.index, "pareto"] = pareto_front(group)
    return wide[["scenario", "method", "natural", "robust", "pareto"]]


def best_flags(agg: pd.DataFrame) -> pd.Series:
    """True where a mean is the best of its scenario and metric (all ties marked)."""
    flags = pd.Series(False, index=agg.index, name="best")
    for (_scenario, metric), group in agg.groupby(["scenario", "metric"], sort=False):
        means = group["mean"].dropna()
        if metric in UNRANKED:
            continue
        if not len(means):
            continue
        target = means.min() if metric in LOWER_IS_BETTER else means.max()
        flags.loc[means.index[means == target]] = True
    return flags
