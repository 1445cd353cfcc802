"""Per-class accuracies and their intervals, from the selected runs' classwise.json.

Two intervals, because they answer two questions:

- over seeds (`ci_low`, `ci_high`): the 95% t-interval of the mean over a cell's seeds, i.e.
  how much the result moves with the training seed;
- of one run (`wilson_low`, `wilson_high`): the Wilson 95% binomial interval of one run's
  accuracy on that class's test images (`count`), i.e. how precisely one evaluation measures
  it. A cell shows it at its mean accuracy with one run's count: the seeds of a sweep are
  evaluated on the same test images, so pooling their counts would treat one set of images as
  several independent ones and overstate the precision.

Counts come from the runs' `test_class_count` (images per class of the test split, the
denominators of `test_class_natural_acc` / `test_class_robust_acc`) and
`test_class_autoattack_count` (images per class AutoAttack attacked). Runs from before them
get no Wilson interval: a count is never invented.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from sweeper.analysis._intervals import t_interval, wilson_interval
from sweeper.analysis._model import BEST_PREFIX, LAST_PREFIX, checkpoint_of, last_name

# The per-class test accuracies classwise.csv and the class-wise plots show.
CLASSWISE_KINDS = ("natural", "robust", "autoattack")
CHECKPOINTS = {"last": LAST_PREFIX, "best": BEST_PREFIX}
COUNT_KEY, AUTOATTACK_COUNT_KEY = "test_class_count", "test_class_autoattack_count"
AUTOATTACK_INDICES_KEY = "test_autoattack_indices"

RUN_COLUMNS = ["run_id", "scenario", "method", "seed", "checkpoint", "kind", "class", "acc",
               "count", "wilson_low", "wilson_high", "worst"]
CELL_COLUMNS = ["scenario", "method", "checkpoint", "kind", "class", "mean", "n", "ci_low",
                "ci_high", "count", "wilson_low", "wilson_high"]

# Table metrics (without their test_ / test_best_ prefix) that are an accuracy on counted
# images -> (the class-wise kind they come from, whether they are its worst class).
_BINOMIAL = {"natural_acc": ("natural", False), "robust_acc": ("robust", False),
             "worst_class_natural_acc": ("natural", True),
             "worst_class_robust_acc": ("robust", True),
             "autoattack_acc": ("autoattack", False),
             "worst_class_autoattack_acc": ("autoattack", True)}


def class_counts(lists: Mapping[str, list], kind: str, checkpoint: str = "last",
                 ) -> np.ndarray | None:
    """Images per class behind a run's `kind` accuracies, or None when the run does not say.

    The best checkpoint is evaluated on the same images as the last epoch: its own count
    list when it has one, else the last epoch's."""
    stem = "class_autoattack_count" if kind == "autoattack" else "class_count"
    for key in (CHECKPOINTS[checkpoint] + stem, LAST_PREFIX + stem):
        if lists.get(key) is not None:
            return np.asarray(lists[key], float)
    return None


def run_classwise_table(selected: pd.DataFrame,
                        classwise: Mapping[str, Mapping[str, list]]) -> pd.DataFrame:
    """One row per selected run, checkpoint, kind and class: its accuracy, the class's test
    images, the Wilson 95% interval of that accuracy (NaN without a count) and whether the
    class is the run's worst (ties all marked)."""
    rows = []
    for run in selected.itertuples(index=False):
        lists = classwise.get(run.run_id)
        if not lists:
            continue
        for checkpoint, prefix in CHECKPOINTS.items():
            for kind in CLASSWISE_KINDS:
                acc = lists.get(f"{prefix}class_{kind}_acc")
                if acc is None:
                    continue
                acc = np.asarray(acc, float)
                counts = class_counts(lists, kind, checkpoint)
                if counts is None or counts.shape != acc.shape:
                    counts = np.full(acc.shape, np.nan)
                worst = np.nanmin(acc) if np.isfinite(acc).any() else np.nan
                for cls, (a, n) in enumerate(zip(acc, counts, strict=True)):
                    # An accuracy is correct / count: round away the float error of that
                    # division to get the integer number of correct images back.
                    low, high = wilson_interval(round(a * n), n) if np.isfinite(a * n) else (
                        math.nan, math.nan)
                    rows.append({"run_id": run.run_id, "scenario": run.scenario,
                                 "method": run.method, "seed": run.seed,
                                 "checkpoint": checkpoint, "kind": kind, "class": cls,
                                 "acc": a, "count": n, "wilson_low": low, "wilson_high": high,
                                 "worst": bool(a == worst)})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def classwise_table(selected: pd.DataFrame,
                    classwise: Mapping[str, Mapping[str, list]]) -> pd.DataFrame:
    """Per cell, checkpoint, kind and class: the mean over the cell's runs (runs without the
    artifact are left out), its t-interval over seeds, and the Wilson interval of one run's
    count at that mean (the smallest count of the cell's runs: the widest, when they differ).
    A cell whose runs disagree on the class count of a kind has no rows for it."""
    runs = run_classwise_table(selected, classwise)
    rows = []
    for (scenario, method, checkpoint, kind), group in runs.groupby(
            ["scenario", "method", "checkpoint", "kind"], sort=False):
        sizes = group.groupby("run_id")["class"].count()
        if sizes.nunique() != 1:
            continue
        for cls, per_class in group.groupby("class", sort=True):
            values = per_class["acc"].to_numpy(float)
            mean = float(np.mean(values))
            low, high = t_interval(values)
            count = float(per_class["count"].min())
            w_low, w_high = wilson_interval(mean * count, count)
            rows.append({"scenario": scenario, "method": method, "checkpoint": checkpoint,
                         "kind": kind, "class": cls, "mean": mean, "n": len(values),
                         "ci_low": low, "ci_high": high, "count": count,
                         "wilson_low": w_low, "wilson_high": w_high})
    return pd.DataFrame(rows, columns=CELL_COLUMNS)


def _images(runs: pd.DataFrame, worst: bool) -> float:
    """One run's images behind a cell's accuracy (the smallest over the runs that count
    them): all its classes, or its worst class (the smallest count among tied worst ones)."""
    uncounted = runs.loc[runs["count"].isna(), "run_id"].unique()
    runs = runs[~runs["run_id"].isin(uncounted)]
    if not len(runs):
        return math.nan
    per_run = (runs[runs["worst"]].groupby("run_id")["count"].min() if worst
               else runs.groupby("run_id")["count"].sum())
    return float(per_run.min()) if len(per_run) else math.nan


def cell_wilson(agg: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """`agg` (one row per cell and metric, with `mean`) with `wilson_low`, `wilson_high` and
    `wilson_n`: the Wilson 95% interval of one run's accuracy at the cell's mean, on
    `wilson_n` images (the test split's counted images, the worst class's, or AutoAttack's),
    for the accuracies on counted images; NaN elsewhere and for runs without counts.

    This is the measurement precision of a single seed, beside the t-interval over seeds:
    the seeds share their test images, so their counts are not pooled."""
    out = agg.assign(wilson_low=math.nan, wilson_high=math.nan, wilson_n=math.nan)
    if not len(runs):
        return out
    by_cell = dict(tuple(runs.groupby(["scenario", "method", "checkpoint", "kind"])))
    for i, row in out.iterrows():
        base = last_name(row["metric"]).removeprefix(LAST_PREFIX)
        if base not in _BINOMIAL or pd.isna(row["mean"]):
            continue
        kind, worst = _BINOMIAL[base]
        key = (row["scenario"], row["method"], checkpoint_of(row["metric"]), kind)
        n = _images(by_cell.get(key, runs.iloc[0:0]), worst)
        low, high = wilson_interval(row["mean"] * n, n)
        out.loc[i, ["wilson_low", "wilson_high", "wilson_n"]] = [low, high, n]
    return out


def split_images(lists: Mapping[str, list]) -> float:
    """The size of a run's test split: the sum of its per-class counts (NaN when unknown)."""
    counts = lists.get(COUNT_KEY)
    return float(np.sum(counts)) if counts is not None else math.nan


def autoattack_images(lists: Mapping[str, list]) -> float:
    """How many test images AutoAttack attacked in a run: the sum of its per-class counts,
    else the length of its list of image indices (NaN when the run says neither)."""
    if lists.get(AUTOATTACK_COUNT_KEY) is not None:
        return float(np.sum(lists[AUTOATTACK_COUNT_KEY]))
    if lists.get(AUTOATTACK_INDICES_KEY) is not None:
        return float(len(lists[AUTOATTACK_INDICES_KEY]))
    return math.nan


def count_notes(selected: pd.DataFrame, classwise: Mapping[str, Mapping[str, list]],
                ) -> list[str]:
    """A note when some selected runs carry no per-class image counts: no Wilson interval."""
    ids = [r for r in selected["run_id"] if classwise.get(r)]
    missing = [r for r in ids if classwise[r].get(COUNT_KEY) is None]
    if not missing:
        return []
    return [f"{len(missing)} of {len(ids)} selected runs with class-wise results carry no "
            f"per-class image counts ({COUNT_KEY}; runs from before them): no binomial "
            "(Wilson) interval for them, only the t-interval over seeds"]
