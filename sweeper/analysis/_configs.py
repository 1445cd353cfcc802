"""The Pareto fronts of a sweep's configs, as plain tables: the tuning trials of each cell's
Optuna study and its confirmed configs (confirmation runs grouped by the tuning trial they
re-run, `tuned_by`), whether each keeps the sweep's constraints, and which are on their
cell's front (`sweeper.pareto.non_dominated`, the searcher's own front)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis._model import StudyAnalysis
from sweeper.contract import CONSTRAINTS_ATTR, RAY_TRIAL_ATTR, STUDY_CONSTRAINTS_ATTR
from sweeper.pareto import non_dominated
from sweeper.pareto import violation as pareto_violation

CONFIG_KEYS = ["cell", "scenario", "method", "source", "trial_id", "number", "n_seeds"]
SOURCES = ("tuning", "confirmed")


def bound_text(bound: Mapping[str, float]) -> str:
    """'>= 0.7', '<= 0.3' or 'in [0.3, 0.7]': a constraint's bound as a reader writes it."""
    low, high = bound.get("min"), bound.get("max")
    if low is not None and high is not None:
        return f"in [{low:g}, {high:g}]"
    return f">= {low:g}" if low is not None else f"<= {high:g}"


def violation(value: float, bound: Mapping[str, float]) -> float:
    """How far `value` lies outside `bound` (<= 0 inside), as the sweep's constraints count
    it; a missing value violates."""
    if value is None or not math.isfinite(value):
        return math.inf
    return float(pareto_violation(value, bound.get("min"), bound.get("max")))


def broken_text(violations: Sequence[float], constraints: Mapping[str, Mapping]) -> str:
    """'val_natural_acc needs >= 0.7; ...' for each constraint a config breaks ('' if none)."""
    return "; ".join(f"{metric} needs {bound_text(bound)}"
                     for (metric, bound), v in zip(constraints.items(), violations, strict=False)
                     if v > 0)


def tuning_configs(study: Any, runs: pd.DataFrame, metrics: Sequence[str],
                   constraints: Mapping[str, Mapping]) -> list[dict[str, Any]]:
    """A cell's COMPLETE tuning trials as configs: values from the study, feasibility from
    the violations the sweep told it (constraints and none recorded: infeasible, as the
    sampler saw it), constrained metrics' values from the trial's MLflow run."""
    import optuna

    by_trial = runs.drop_duplicates("trial_id").set_index("trial_id")
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        trial_id = t.user_attrs.get(RAY_TRIAL_ATTR, f"#{t.number}")
        found = t.user_attrs.get(CONSTRAINTS_ATTR) if constraints else []
        row = {"source": "tuning", "trial_id": trial_id, "number": t.number, "n_seeds": 1,
               **dict(zip(metrics, t.values, strict=True)), **t.params,
               "feasible": found is not None and all(v <= 0 for v in found),
               "broken": ("no constraint values recorded" if found is None
                          else broken_text(found, constraints))}
        for metric in constraints:
            if metric not in row and trial_id in by_trial.index and metric in by_trial:
                row[metric] = by_trial.at[trial_id, metric]
        rows.append(row)
    return rows


def confirmed_configs(cell_runs: pd.DataFrame, study: Any | None, metrics: Sequence[str],
                      constraints: Mapping[str, Mapping]) -> list[dict[str, Any]]:
    """A cell's confirmed configs: its completed confirmation runs grouped by `tuned_by`,
    each metric's mean over the seeds, the params of the tuning trial they re-run."""
    done = cell_runs[cell_runs["phase"].eq("confirm") & cell_runs["outcome"].eq("completed")
                     & cell_runs["tuned_by"].notna()]
    tuned = {} if study is None else {t.user_attrs.get(RAY_TRIAL_ATTR): t
                                      for t in study.get_trials(deepcopy=False)}
    wanted = list(dict.fromkeys([*metrics, *constraints]))
    rows = []
    for tuned_by, group in done.groupby("tuned_by", sort=True):
        means = {m: float(pd.to_numeric(group[m], errors="coerce").mean()) if m in group
                 else math.nan for m in wanted}
        violations = [violation(means[m], bound) for m, bound in constraints.items()]
        trial = tuned.get(tuned_by)
        rows.append({"source": "confirmed", "trial_id": tuned_by,
                     "number": None if trial is None else trial.number,
                     "n_seeds": len(group), **means,
                     **({} if trial is None else trial.params),
                     "feasible": all(v <= 0 for v in violations),
                     "broken": broken_text(violations, constraints)})
    return rows


def mark_fronts(configs: pd.DataFrame, objectives: Sequence[tuple[str, str]]) -> pd.Series:
    """True for the configs on their cell's front: non-dominated among the feasible configs
    of the same cell and source. Tuning and confirmed configs get separate fronts: a tuning
    value is one run at the tuning budget, a confirmed one a mean over seeds at the full
    budget, so one lucky tuning run must not push a confirmed config off its front."""
    pareto = pd.Series(False, index=configs.index, name="pareto")
    metrics = [m for m, _ in objectives]
    modes = [mode for _, mode in objectives]
    feasible = configs[configs["feasible"].astype(bool)]
    for _key, group in feasible.groupby(["cell", "source"], sort=False):
        mask = non_dominated(group[metrics].to_numpy(float), modes)
        pareto.loc[group.index[mask]] = True
    return pareto


def configs_table(studies: Mapping[str, Any], runs: pd.DataFrame, cells: pd.DataFrame,
                  objectives: Sequence[tuple[str, str]],
                  constraints: Mapping[str, Mapping[str, Mapping]]) -> pd.DataFrame:
    """Every config of every cell (tuning, then confirmed), with `feasible`, `broken` (the
    constraints it breaks) and `pareto`."""
    metrics = [m for m, _ in objectives]
    rows = []
    for cell, meta in cells.iterrows():
        cell_runs = runs[runs["cell"].eq(cell)]
        study = studies.get(cell)
        bounds = constraints.get(cell, {})
        found = [] if study is None else tuning_configs(study, cell_runs, metrics, bounds)
        found += confirmed_configs(cell_runs, study, metrics, bounds)
        rows += [{"cell": cell, "scenario": meta["scenario"], "method": meta["method"], **r}
                 for r in found]
    table = pd.DataFrame(rows, columns=[*CONFIG_KEYS, *metrics, "feasible", "broken"]
                         if not rows else None)
    table["number"] = table["number"].astype("Int64")
    table["source_order"] = table["source"].map(SOURCES.index)
    table = table.sort_values(["cell", "source_order", "number", "trial_id"], kind="stable")
    table = table.drop(columns="source_order").reset_index(drop=True)
    table["pareto"] = mark_fronts(table, objectives)
    return table


def cell_constraints(studies: Mapping[str, Any], cells: Sequence[str]
                     ) -> dict[str, dict[str, Mapping[str, float]]]:
    """cell -> its constraints {metric: {min, max}}. A cell without a study (nothing to
    search) takes the sweep's: one space file sets them for every cell."""
    own = {cell: dict(s.user_attrs.get(STUDY_CONSTRAINTS_ATTR) or {})
           for cell, s in studies.items()}
    shared = next((c for c in own.values() if c), {})
    return {cell: own.get(cell, shared) for cell in cells}


def reported_infeasible(configs: pd.DataFrame, selected: pd.DataFrame) -> list[str]:
    """A note per cell whose tables report a confirmed config that breaks a constraint on
    its confirmation means (the sweep confirmed it because its tuning run kept them)."""
    if "tuned_by" not in selected:
        return []
    shown = selected[selected["source"].eq("confirm")][["cell", "tuned_by"]].drop_duplicates()
    bad = configs[configs["source"].eq("confirmed") & ~configs["feasible"].astype(bool)]
    bad = bad.merge(shown, left_on=["cell", "trial_id"], right_on=["cell", "tuned_by"])
    return [f"{r.cell}: the config its tables report (tuned by {r.trial_id}) breaks a "
            f"constraint on its confirmation means: {r.broken}" for r in bad.itertuples()]


def param_columns(configs: pd.DataFrame, objectives: Sequence[tuple[str, str]],
                  constrained: Sequence[str]) -> list[str]:
    """The configs' param columns (every column that is no key, value or flag), sorted."""
    taken = {*CONFIG_KEYS, *(m for m, _ in objectives), *constrained, "feasible", "broken",
             "pareto"}
    return sorted(c for c in configs.columns if c not in taken)


def front_columns(analysis: StudyAnalysis) -> list[str]:
    """pareto_configs.csv's columns: the keys, the objectives, the constrained metrics that
    are not objectives, the params."""
    metrics = [m for m, _ in analysis.objectives]
    extra = [m for m in analysis.constraints if m not in metrics]
    return [*CONFIG_KEYS, *metrics, *extra, *analysis.params]


def infeasible_columns(analysis: StudyAnalysis) -> list[str]:
    """infeasible_configs.csv's columns: as pareto_configs.csv's, with `broken` after the keys."""
    cols = front_columns(analysis)
    return [*CONFIG_KEYS, "broken", *cols[len(CONFIG_KEYS):]]


def configs_frame(analysis: StudyAnalysis, which: str) -> pd.DataFrame:
    """The rows and columns of pareto_configs.csv (`which`='pareto') or infeasible_configs.csv
    ('infeasible')."""
    configs = analysis.configs
    if which == "pareto":
        rows, cols = configs[configs["pareto"].astype(bool)], front_columns(analysis)
    else:
        rows, cols = configs[~configs["feasible"].astype(bool)], infeasible_columns(analysis)
    for col in cols:
        if col not in rows:
            rows = rows.assign(**{col: np.nan})
    return rows[cols]
