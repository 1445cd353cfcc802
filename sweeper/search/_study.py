"""One cell's Optuna study in the sweep's Optuna storage, driven by ask and tell.

Why not Ray's `OptunaSearch`: it records an ASHA-stopped trial as COMPLETE with its partial
values (so a stopped trial could enter a Pareto front), ignores intermediate results of
multi-objective studies, and keeps its study inside Ray's pickled searcher state, where none
of Optuna's own tools can read it. Here each cell's study lives in an RDB storage
(`sweeper.storage.study_storage`: SQLite in the sweep's directory, or a cluster database)
under the cell id; every Optuna trial carries the Ray trial id it belongs to
(`RAY_TRIAL_ATTR`), and a stopped trial is told PRUNED.

After a driver is killed, Ray's restored searcher may know fewer trials than the study holds
(those asked for after its last save). Such a trial is still RUNNING in the study and no Ray
trial runs it: the next trial the cell hands out adopts it (its number and its sampled
params) instead of asking for a new one, so the study keeps exactly one Optuna trial per Ray
tuning trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sweeper.contract import (
    CONSTRAINTS_ATTR,
    RAY_TRIAL_ATTR,
    STUDY_CONSTRAINTS_ATTR,
    VALUES_ATTR,
)
from sweeper.space_schema import SelectionSpec
from sweeper.spaces import Cell, SweepPlan

# A violation for a constraint whose metric a result lacks (Optuna wants finite numbers).
MISSING_VIOLATION = 1e6


def make_sampler(plan: SweepPlan, index: int, n_existing: int):
    """The cell's sampler. Its seed is fixed by the space's seed, the cell's position and how
    many trials the study already holds, so a resumed sweep does not replay the draws it
    made before the restart."""
    import optuna

    opts = plan.space.optuna
    seed = opts.seed + index + 100_003 * n_existing
    # Constraints reach the samplers through each trial's `set_constraint` (Optuna 5).
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=opts.population_size)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=opts.n_startup_trials)


def open_study(url: str, cell: Cell, plan: SweepPlan, index: int) -> CellStudy:
    """The cell's study in storage `url`, created on first use (with its objectives' names
    and the cell's scenario and method as study attributes), else loaded."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sel = plan.space.selection
    storage = optuna.storages.RDBStorage(url)
    try:
        n_existing = storage.get_n_trials(storage.get_study_id_from_name(cell.id))
        new = False
    except KeyError:  # Optuna's "no such study"
        n_existing, new = 0, True
    study = optuna.create_study(
        storage=storage, study_name=cell.id, load_if_exists=True,
        sampler=make_sampler(plan, index, n_existing),
        directions=["maximize" if mode == "max" else "minimize" for _, mode in sel.objectives])
    if new:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric for metric, _ in sel.objectives])
        study.set_user_attr("scenario", cell.scenario)
        study.set_user_attr("method", cell.method)
        study.set_user_attr(STUDY_CONSTRAINTS_ATTR, {m: b.model_dump(exclude_none=True)
                                                     for m, b in sel.constraints.items()})
    return CellStudy(study, storage, cell, sel)


class CellStudy:
    """Ask and tell for one cell's study, keyed by Ray trial id."""

    def __init__(self, study, storage, cell: Cell, selection: SelectionSpec):
        self.study = study
        self.storage = storage  # the study's RDBStorage: its trial-level methods are public
        self.cell = cell
        self.selection = selection
        self.study_id = self.storage.get_study_id_from_name(cell.id)

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def ask(self, ray_trial_id: str, claimed: set[int]) -> tuple[int, dict[str, Any]]:
        """(trial number, params) for a new Ray trial: a RUNNING study trial no Ray trial
        claims (asked for before a driver was killed), else a new one."""
        import optuna

        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in claimed:
                self.storage.set_trial_user_attr(self._trial_id(t.number), RAY_TRIAL_ATTR,
                                                 ray_trial_id)
                return t.number, dict(t.params)
        trial = self.study.ask(self.cell.optuna_space())
        trial.set_user_attr(RAY_TRIAL_ATTR, ray_trial_id)
        return trial.number, dict(trial.params)

    def report(self, number: int, step: int, result: Mapping[str, Any]) -> None:
        """An intermediate value (single objective only: Optuna keeps none for several)."""
        if self.selection.multi:
            return
        value = result.get(self.selection.objectives[0][0])
        if value is None or math.isnan(value) or self._finished(number):
            return
        self.storage.set_trial_intermediate_value(self._trial_id(number), step, float(value))

    def tell(self, number: int, outcome: str, result: Mapping[str, Any] | None) -> None:
        """The trial's end: `completed` with its objective values (FAIL when one is missing
        or NaN), `pruned` (stopped by ASHA) or `failed`. A trial already finished (a Ray
        trial that ended again after a resume) keeps its first verdict."""
        import optuna

        TrialState = optuna.trial.TrialState
        if self._finished(number):
            return
        result = result or {}
        values = {m: result.get(m) for m, _ in self.selection.objectives}
        known = {m: float(v) for m, v in values.items() if v is not None and not math.isnan(v)}
        trial_id = self._trial_id(number)
        if known:
            self.storage.set_trial_user_attr(trial_id, VALUES_ATTR, known)
        if self.selection.constraints:
            scalars = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
            violations = [min(v, MISSING_VIOLATION) for v in self.selection.violations(scalars)]
            self.storage.set_trial_user_attr(trial_id, CONSTRAINTS_ATTR, violations)
            trial = optuna.trial.Trial(self.study, trial_id)  # the handle `ask` returned
            for metric, violation in zip(self.selection.constraints, violations, strict=True):
                trial.set_constraint(metric, violation)
        if outcome == "completed" and len(known) == len(values):
            self.study.tell(number, [known[m] for m, _ in self.selection.objectives])
        elif outcome == "pruned":
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, state=TrialState.FAIL)

    def _finished(self, number: int) -> bool:
        return self.storage.get_trial(self._trial_id(number)).state.is_finished()

