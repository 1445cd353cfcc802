"""One Optuna (TPE) study per cell behind one Ray Tune searcher; then confirmation."""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search import Searcher

from sweeper.search._inputs import CONFIRM, SWEEP_KEY, TUNE, sweep_entry
from sweeper.search._scheduler import CellScheduler
from sweeper.search._state import (
    SearchState,
    StudyJournal,
    linked_journals,
    read_study,
    restore_bytes,
    saved_bytes,
)
from sweeper.spaces import Cell, SweepPlan
from sweeper.tracking import trial_outcome


class CellSearcher(Searcher):
    """One Optuna (TPE) study per cell behind one Ray Tune searcher; then confirmation.

    Ray Tune sees no metric here on purpose: results of epochs without an evaluation lack
    the selection metric, and Ray would reject them; each cell's OptunaSearch gets the
    metric and only the results that carry it.
    """

    def __init__(self, plan: SweepPlan, scheduler: CellScheduler | None = None):
        super().__init__(metric=None, mode=None)
        self.plan = plan
        self.selection = plan.space.selection
        self.scheduler = scheduler
        self._journals: dict[str, StudyJournal] = {}  # cell id -> its study, as Optuna logs
        self._subs = {c.id: self._optuna(c, i) for i, c in enumerate(plan.cells)}
        self._trials: dict[str, dict[str, Any]] = {}  # trial id -> entry + params
        self._issued = {c.id: 0 for c in plan.cells}  # tuning trials handed out
        self._confirmed = {c.id: 0 for c in plan.cells}  # confirmation trials handed out
        self._ended: dict[str, tuple[str, float | None]] = {}  # trial id -> (outcome, value)
        self._numbers: dict[str, int] = {}  # tuning trial id -> its number in its study
        self._cursor = 0

    def _optuna(self, cell: Cell, index: int):
        if not cell.space:
            return None
        import optuna
        from optuna.storages import JournalStorage
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opts = self.plan.space.optuna
        sampler = optuna.samplers.TPESampler(seed=opts.seed + index,
                                             n_startup_trials=opts.n_startup_trials)
        # The study lives in a journal this searcher holds: its state reads the study from
        # there, not from OptunaSearch's attributes.
        self._journals[cell.id] = StudyJournal(cell.id)
        return OptunaSearch(cell.optuna_space(), metric=self.selection.metric,
                            mode=self.selection.mode, sampler=sampler, study_name=cell.id,
                            storage=JournalStorage(self._journals[cell.id]))

    # -- Ray Tune's Searcher interface

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # everything comes from the space file

    def suggest(self, trial_id: str) -> dict | str | None:
        cell = self._next_tuning_cell()
        if cell is not None:
            return self._suggest_tune(cell, trial_id)
        for cell in self.plan.cells:
            if self._tuning_done(cell) and self._confirmed[cell.id] < self._n_confirm(cell):
                return self._suggest_confirm(cell, trial_id)
        if all(self._tuning_done(c) for c in self.plan.cells):
            return self.FINISHED
        return None  # confirmation waits for running tuning trials

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        rec = self._trials.get(trial_id)
        sub = self._subs.get(rec["cell"]) if rec else None
        if sub is not None and rec["phase"] == TUNE and self.selection.metric in result:
            sub.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        rec = self._trials.get(trial_id)
        if rec is None or trial_id in self._ended:
            return
        outcome = trial_outcome(rec, result, error)
        value = (result or {}).get(self.selection.metric) if outcome == "completed" else None
        self._ended[trial_id] = (outcome, value)
        sub = self._subs.get(rec["cell"])
        if sub is not None and rec["phase"] == TUNE:
            # No result tells OptunaSearch the trial was pruned (or failed, with error).
            sub.on_trial_complete(trial_id, result=result if outcome == "completed" else None,
                                  error=error)

    # -- bookkeeping

    def _next_tuning_cell(self) -> Cell | None:
        cells = self.plan.cells
        for k in range(len(cells)):
            cell = cells[(self._cursor + k) % len(cells)]
            if self._issued[cell.id] < self.plan.n_tune(cell):
                self._cursor = (self._cursor + k + 1) % len(cells)
                return cell
        return None

    def _tuning_done(self, cell: Cell) -> bool:
        ids = [t for t, r in self._trials.items() if r["cell"] == cell.id and r["phase"] == TUNE]
        return (self._issued[cell.id] >= self.plan.n_tune(cell)
                and all(t in self._ended for t in ids))

    def _n_confirm(self, cell: Cell) -> int:
        if self.best(cell.id) is None:
            return 0
        return len(self.plan.space.confirm.seeds)

    def best(self, cell_id: str) -> tuple[str, float, dict[str, Any]] | None:
        """(trial id, value, sampled params) of the cell's best completed tuning trial."""
        sign = 1 if self.selection.mode == "max" else -1
        found = None
        for tid, rec in self._trials.items():  # handed-out order: ties go to the earliest
            outcome, value = self._ended.get(tid, (None, None))
            if rec["cell"] != cell_id or rec["phase"] != TUNE or outcome != "completed":
                continue
            if value is None or math.isnan(value):
                continue
            if found is None or sign * value > sign * found[1]:
                found = (tid, value, rec["params"])
        return found

    def _suggest_tune(self, cell: Cell, trial_id: str) -> dict:
        self._issued[cell.id] += 1
        sub = self._subs[cell.id]
        params = {}
        if sub is not None:
            # OptunaSearch asks its study once per new trial, and nothing else asks it:
            # the study numbers its trials in the order this searcher hands them out.
            self._numbers[trial_id] = self._issued[cell.id] - 1
            params = sub.suggest(trial_id)
        return self._config(trial_id, cell, TUNE, params, seed=None)

    def _suggest_confirm(self, cell: Cell, trial_id: str) -> dict:
        seed = self.plan.space.confirm.seeds[self._confirmed[cell.id]]
        self._confirmed[cell.id] += 1
        best_id, _, params = self.best(cell.id)
        return self._config(trial_id, cell, CONFIRM, params, seed=seed, tuned_by=best_id)

    def _config(self, trial_id: str, cell: Cell, phase: str, params: dict, seed: int | None,
                tuned_by: str | None = None) -> dict:
        cfg = self.plan.trial_config(cell, params, seed, tuning=phase == TUNE)
        entry = sweep_entry(cell, phase, cfg, tuned_by)
        self._trials[trial_id] = {**entry, "params": dict(params)}
        return {**cfg, SWEEP_KEY: entry}

    def complete(self) -> bool:
        """Every cell tuned and confirmed, and every trial handed out has ended."""
        return (all(self._tuning_done(c) and self._confirmed[c.id] >= self._n_confirm(c)
                    for c in self.plan.cells)
                and all(t in self._ended for t in self._trials))

    def confirm_skipped(self) -> list[str]:
        return [c.id for c in self.plan.cells if self._tuning_done(c) and self.best(c.id) is None]

    # -- save/restore: the bookkeeping, the studies and the ASHA rungs, with the experiment

    def state(self) -> SearchState:
        with linked_journals(self._journals):
            searchers = {k: saved_bytes(s) for k, s in self._subs.items() if s is not None}
        return SearchState(
            cells=[c.id for c in self.plan.cells], trials=self._trials, issued=self._issued,
            confirmed=self._confirmed, ended=self._ended, cursor=self._cursor,
            study_numbers=self._numbers,
            studies={k: j.logs for k, j in self._journals.items()}, searchers=searchers,
            schedulers=self.scheduler.save_cells() if self.scheduler else {})

    def save(self, checkpoint_path: str) -> None:
        self.state().to_disk(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.load_state(SearchState.from_disk(checkpoint_path,
                                              [c.id for c in self.plan.cells]))

    def load_state(self, state: SearchState) -> None:
        self._trials, self._issued = dict(state.trials), dict(state.issued)
        self._confirmed, self._ended = dict(state.confirmed), dict(state.ended)
        self._cursor, self._numbers = state.cursor, dict(state.study_numbers)
        for cell, logs in state.studies.items():
            if cell in self._journals:
                self._journals[cell].logs = list(logs)
        with linked_journals(self._journals):
            for cell, blob in state.searchers.items():
                if self._subs.get(cell) is not None:
                    restore_bytes(self._subs[cell], blob)
        if self.scheduler is not None and state.schedulers:
            self.scheduler.restore_cells(state.schedulers)

    def studies(self) -> dict[str, Any]:
        """Cell id -> a copy of its optuna.Study (cells with nothing to search have none)."""
        return {k: read_study(k, j.logs) for k, j in self._journals.items()}
