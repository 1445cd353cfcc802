"""CAAT's direction diagnostics as tables: how CAAT splits its training samples between
adversarial and anti-adversarial perturbations, epoch by epoch. MLflow metric histories and
classwise.json -> tidy tables (their plots: `_direction_plots`). The hooks outside: the
`directions` fields of SweepRuns and Summary, and one call each in summarize, write_plots and
analyze."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sweeper.contract import CLASSWISE_DIAGNOSTICS, open_client, resolve_tracking_uri

if TYPE_CHECKING:
    from sweeper.analysis._model import SweepRuns

DIRECTION_METHOD = "caat"
# Per-epoch scalars (step = epoch, 1-based) the plots read. The trainer logs more
# (meta_pref_noisy_auc, meta_grad_norm, meta_active_frac) that no plot shows yet.
DIRECTION_METRICS = ("frac_anti", "frac_anti_noisy", "frac_anti_clean", "anti_noisy_auc",
                     "meta_pref_noisy_auc")
DIRECTION_COLUMNS = ["run_id", "scenario", "method", "seed", "metric", "epoch", "value"]
# classwise.json: per-class lists by observed label (last epoch) and `<key>_by_epoch` histories.
CLASS_DIRECTION_KEYS = CLASSWISE_DIAGNOSTICS
# `last`: the run's last epoch; `epoch` is NaN for a last-epoch list without its history.
CLASS_DIRECTION_COLUMNS = ["run_id", "scenario", "method", "seed", "metric", "epoch", "class",
                           "value", "last"]


def empty_directions() -> pd.DataFrame:
    return pd.DataFrame(columns=DIRECTION_COLUMNS)


def empty_class_directions() -> pd.DataFrame:
    return pd.DataFrame(columns=CLASS_DIRECTION_COLUMNS)


def load_directions(uri: str, selected: pd.DataFrame,
                    metrics: Sequence[str] = DIRECTION_METRICS) -> pd.DataFrame:
    """Per-epoch histories of `metrics` for the selected CAAT runs, one row per value
    (columns DIRECTION_COLUMNS). The only MLflow calls of this section."""
    client = open_client(resolve_tracking_uri(uri))
    rows = []
    runs = selected[selected["method"].eq(DIRECTION_METHOD)]
    for run_id, scenario, method, seed in zip(runs["run_id"], runs["scenario"], runs["method"],
                                              runs["seed"], strict=True):
        for metric in metrics:
            rows += [{"run_id": run_id, "scenario": scenario, "method": method, "seed": seed,
                      "metric": metric, "epoch": m.step, "value": m.value}
                     for m in client.get_metric_history(run_id, metric)]
    return direction_frame(rows)


def direction_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> the tidy history table, ordered by run, metric and epoch."""
    frame = pd.DataFrame(list(rows), columns=DIRECTION_COLUMNS)
    frame["epoch"] = frame["epoch"].astype(int)
    frame["value"] = frame["value"].astype(float)
    return frame.sort_values(["run_id", "metric", "epoch"], ignore_index=True)


def class_direction_table(selected: pd.DataFrame,
                          classwise: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The selected CAAT runs' per-class training diagnostics, one row per run x metric x
    epoch x class (columns CLASS_DIRECTION_COLUMNS; JSON null or NaN -> NaN)."""
    rows = []
    runs = selected[selected["method"].eq(DIRECTION_METHOD)]
    for run_id, scenario, method, seed in zip(runs["run_id"], runs["scenario"], runs["method"],
                                              runs["seed"], strict=True):
        lists = classwise.get(run_id, {})
        ident = {"run_id": run_id, "scenario": scenario, "method": method, "seed": seed}
        for key in CLASS_DIRECTION_KEYS:
            history = lists.get(f"{key}_by_epoch")
            if history:
                epochs = [(float(e), values, e == len(history))
                          for e, values in enumerate(history, start=1)]
            elif lists.get(key):
                epochs = [(math.nan, lists[key], True)]
            else:
                continue
            for epoch, values, last in epochs:
                rows += [{**ident, "metric": key, "epoch": epoch, "class": c, "value": v,
                          "last": last}
                         for c, v in enumerate(np.asarray(values, dtype=float))]
    frame = pd.DataFrame(rows, columns=CLASS_DIRECTION_COLUMNS)
    frame["value"] = frame["value"].astype(float)
    return frame


def direction_tables(sweep: SweepRuns, selected: pd.DataFrame) -> tuple[pd.DataFrame,
                                                                         pd.DataFrame]:
    """The histories of the selected runs (whatever `sweep.directions` holds besides) and
    their per-class diagnostics from `sweep.classwise`."""
    history = sweep.directions if sweep.directions is not None else empty_directions()
    history = history[history["run_id"].isin(selected["run_id"])].reset_index(drop=True)
    return history, class_direction_table(selected, sweep.classwise)


def direction_means(history: pd.DataFrame) -> pd.DataFrame:
    """Mean over a cell's runs per epoch (NaN values left out; n = the runs that count)."""
    values = history.dropna(subset=["value"])
    grouped = values.groupby(["scenario", "method", "metric", "epoch"], sort=True)["value"]
    return grouped.agg(mean="mean", n="count").reset_index()


def class_means_by_epoch(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """epoch x class: the mean over runs of a per-class diagnostic (NaN classes left out)."""
    rows = table[table["metric"].eq(metric) & table["epoch"].notna()]
    return rows.pivot_table(index="epoch", columns="class", values="value", aggfunc="mean",
                            dropna=False)


def class_means_at_last(table: pd.DataFrame, metric: str) -> pd.Series:
    """class -> the mean over runs of a per-class diagnostic at each run's last epoch."""
    rows = table[table["metric"].eq(metric) & table["last"].astype(bool)]
    return rows.groupby("class", sort=True)["value"].mean()
