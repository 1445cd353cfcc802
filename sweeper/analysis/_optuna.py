"""What the cells' Optuna studies add to the analysis: hyperparameter importances per objective
and (through `_configs`) the Pareto fronts of configs, from the tuning trials and from the
confirmed configs.

The studies live in the RDB storage the parent run names (`OPTUNA_STORAGE_TAG`), one per
cell, named by the cell id. Reading them never writes: a SQLite file that is not there is
reported, not created, and no table is created in an existing database. Anything Optuna
cannot read or compute becomes a note; the rest of the analysis goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import pandas as pd

from sweeper.analysis._configs import (
    cell_constraints,
    configs_table,
    param_columns,
    reported_infeasible,
)
from sweeper.analysis._model import StudyAnalysis, SweepRuns
from sweeper.contract import sqlite_path
from trainables.errors import one_line

IMPORTANCE_COLUMNS = ["cell", "scenario", "method", "objective", "param", "importance"]


class StudiesUnavailable(RuntimeError):
    """The storage cannot be opened or read (moved, another machine, an old schema)."""


def open_studies(url: str, cells: Sequence[str]) -> dict[str, Any]:
    """cell id -> its study, for the cells that have one in storage `url`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        # Opening it would create an empty database there and report no studies at all.
        raise StudiesUnavailable(f"no such file {path}")
    try:
        storage = optuna.storages.RDBStorage(url, skip_table_creation=True)
        names = set(optuna.get_all_study_names(storage))
        return {cell: optuna.load_study(study_name=cell, storage=storage)
                for cell in cells if cell in names}
    except Exception as err:  # any driver or schema error: the analysis goes on without
        raise StudiesUnavailable(one_line(err, 200)) from None


def study_mismatch(study: Any, objectives: Sequence[tuple[str, str]]) -> str | None:
    """Why a study's objectives are not the sweep's (then its values mean something else)."""
    import optuna

    want = [optuna.study.StudyDirection.MAXIMIZE if mode == "max"
            else optuna.study.StudyDirection.MINIMIZE for _, mode in objectives]
    names = study.metric_names
    if list(study.directions) != want or (names is not None
                                          and list(names) != [m for m, _ in objectives]):
        return (f"its objectives ({names or len(study.directions)}) are not the sweep's "
                f"({', '.join(m for m, _ in objectives)})")
    return None


# ------------------------------------------------------------------------------ importance


def _loss(index: int, sign: float, trial: Any) -> float:
    return sign * trial.values[index]


def cell_importances(study: Any, objectives: Sequence[tuple[str, str]]
                     ) -> list[tuple[str, dict[str, float]]]:
    """(objective, {param: importance summing to 1}) per objective, by Optuna's default
    evaluator (PED-ANOVA: no extra dependency, fast on small studies, and it scores
    conditional params too). ValueError saying why when there is too little to go on."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        raise ValueError(f"{len(complete)} completed tuning trial(s), importance needs 2")
    if not {p for t in complete for p in t.params}:
        raise ValueError("no hyperparameter was searched")
    out = []
    for i, (metric, mode) in enumerate(objectives):
        # PED-ANOVA reads a target as a loss (lower is better): a maximised objective is
        # negated, else the importances would explain what makes a config worse.
        target = partial(_loss, i, -1.0 if mode == "max" else 1.0)
        with warnings.catch_warnings():
            # It warns on every custom target that it minimises it: handled just above.
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(study, target=target)
        out.append((metric, dict(found)))
    return out


def importance_table(studies: Mapping[str, Any], cells: pd.DataFrame,
                     objectives: Sequence[tuple[str, str]]) -> tuple[pd.DataFrame, list[str]]:
    """One row per cell x objective x param (importances of a cell and objective sum to 1),
    and one note per cell that has none, saying why."""
    rows, notes = [], []
    for cell, study in studies.items():
        scenario, method = cells.loc[cell, ["scenario", "method"]]
        try:
            found = cell_importances(study, objectives)
        except Exception as err:  # also whatever Optuna raises when it cannot compute
            notes.append(f"{cell}: no hyperparameter importance ({one_line(err, 200)})")
            continue
        for metric, importances in found:
            values = list(importances.values())
            if len(values) > 1 and max(values) - min(values) < 1e-12:
                notes.append(f"{cell}: every param equally important for {metric}: too few "
                             "completed trials for PED-ANOVA to tell them apart")
            rows += [{"cell": cell, "scenario": scenario, "method": method, "objective": metric,
                      "param": param, "importance": value}
                     for param, value in importances.items()]
    return pd.DataFrame(rows, columns=IMPORTANCE_COLUMNS), notes


def analyse_studies(sweep: SweepRuns, selected: pd.DataFrame | None = None
                    ) -> tuple[StudyAnalysis | None, list[str]]:
    """Importances and config fronts of the sweep's studies, and notes; None (with a note
    saying why) when its storage cannot be read. `selected`: the runs the tables report."""
    runs = sweep.runs
    objectives = sweep.objectives or [(sweep.metric, sweep.mode)]
    cells = (runs.dropna(subset=["cell"]).drop_duplicates("cell").set_index("cell")
             [["scenario", "method"]].sort_index())
    url = sweep.optuna_storage or ""
    try:
        studies = open_studies(url, list(cells.index))
    except StudiesUnavailable as err:
        return None, [f"Optuna storage {url}: cannot read it ({err}): no importances, config "
                      "fronts or interactive views"]
    notes = []
    for cell in list(studies):
        why = study_mismatch(studies[cell], objectives)
        if why:
            notes.append(f"{cell}: Optuna study left out: {why}")
            del studies[cell]
    without = [c for c in cells.index if c not in studies]
    if without:
        notes.append(f"no Optuna study (nothing searched, or not started) for: "
                     f"{', '.join(without)}")
    importance, more = importance_table(studies, cells, objectives)
    bounds = cell_constraints(studies, list(cells.index))
    configs = configs_table(studies, runs, cells, objectives, bounds)
    if selected is not None:
        more += reported_infeasible(configs, selected)
    constrained = sorted({m for b in bounds.values() for m in b})
    analysis = StudyAnalysis(objectives=list(objectives), importance=importance,
                             configs=configs, constraints=constrained, studies=studies,
                             params=param_columns(configs, objectives, constrained))
    return analysis, notes + more
