"""One Optuna study per cell behind one Ray Tune searcher; then confirmation."""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search import Searcher

from sweeper.pareto import non_dominated, spread
from sweeper.search._inputs import CONFIRM, SWEEP_KEY, TUNE, sweep_entry
from sweeper.search._scheduler import CellScheduler
from sweeper.search._state import SearchState
from sweeper.search._study import CellStudy, open_study
from sweeper.spaces import Cell, SweepPlan
from sweeper.tracking import trial_outcome


class CellSearcher(Searcher):
    """One Optuna study per cell (single- or multi-objective, in the sweep's Optuna storage)
    behind one Ray Tune searcher; then confirmation of each cell's best config, or of up to
    `confirm.top_k` configs spread along its Pareto front.

    Ray Tune sees no metric here on purpose: results of epochs without an evaluation lack
    the selection metrics, and Ray would reject them; each cell's study gets only the
    results that carry them.
    """

    def __init__(self, plan: SweepPlan, studies_url: str | None = None,
                 scheduler: CellScheduler | None = None):
        super().__init__(metric=None, mode=None)
        self.plan = plan
        self.selection = plan.space.selection
        self.studies_url = studies_url  # None: bookkeeping only (reading a saved state)
        self.scheduler = scheduler
        self._cells = {c.id: (i, c) for i, c in enumerate(plan.cells)}  # id -> (index, cell)
        self._studies: dict[str, CellStudy] = {}  # opened on first use, never pickled
        self._trials: dict[str, dict[str, Any]] = {}  # trial id -> entry + params
        self._issued = {c.id: 0 for c in plan.cells}  # tuning trials handed out
        self._confirmed = {c.id: 0 for c in plan.cells}  # confirmation trials handed out
        # trial id -> (outcome, {metric: value} of its objectives and constrained metrics)
        self._ended: dict[str, tuple[str, dict[str, float]]] = {}
        self._numbers: dict[str, int] = {}  # tuning trial id -> its number in its study
        self._cursor = 0
        # A cell's confirmed configs, once its tuning is done (they cannot change after).
        self._picks: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        # Verdicts reach the studies one save late (see `save`): those recorded since the
        # last save, and those the last save wrote (told at the next one).
        self._unsaved: set[str] = set()
        self._saved: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles the searcher with the experiment; open database handles stay behind.
        return {**self.__dict__, "_studies": {}}

    def _study(self, cell: Cell) -> CellStudy | None:
        if not cell.space:
            return None
        if cell.id not in self._studies:
            if self.studies_url is None:
                raise RuntimeError("CellSearcher without a study storage cannot search")
            index = self._cells[cell.id][0]
            self._studies[cell.id] = open_study(self.studies_url, cell, self.plan, index)
        return self._studies[cell.id]

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
        if rec is None or rec["phase"] != TUNE or trial_id not in self._numbers:
            return
        study = self._study(self._cell(rec["cell"]))
        if study is not None and "epoch" in result:
            study.report(self._numbers[trial_id], int(result["epoch"]), result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        rec = self._trials.get(trial_id)
        if rec is None or trial_id in self._ended:
            return
        if result:
            # Ray hands a result its scheduler answered STOP to on_trial_complete only:
            # it is still the trial's last intermediate value (a PRUNED single-objective
            # trial is ranked by it).
            self.on_trial_result(trial_id, result)
        outcome = trial_outcome(rec, result, error)
        watched = [m for m, _ in self.selection.objectives] + list(self.selection.constraints)
        values = {m: float(result[m]) for m in watched
                  if result and isinstance(result.get(m), int | float)}
        self._ended[trial_id] = (outcome, values)
        self._unsaved.add(trial_id)

    def _tell(self, trial_ids) -> None:
        """Tell the studies how these ended tuning trials ended (a trial told before keeps
        its first verdict)."""
        for tid, rec in self._trials.items():  # in handed-out order
            if (tid not in trial_ids or rec["phase"] != TUNE or tid not in self._numbers
                    or tid not in self._ended):
                continue
            study = self._study(self._cell(rec["cell"]))
            if study is not None:
                outcome, values = self._ended[tid]
                study.tell(self._numbers[tid], outcome, values)

    # -- bookkeeping

    def _cell(self, cell_id: str) -> Cell:
        return self._cells[cell_id][1]

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
        return len(self.confirm_configs(cell.id)) * len(self.plan.space.confirm.seeds)

    def candidates(self, cell_id: str) -> list[tuple[str, list[float], dict[str, Any]]]:
        """(trial id, objective values, params) of the cell's completed tuning trials with
        every objective known and every constraint met, in handed-out order."""
        objectives = [m for m, _ in self.selection.objectives]
        out = []
        for tid, rec in self._trials.items():
            outcome, values = self._ended.get(tid, (None, {}))
            if rec["cell"] != cell_id or rec["phase"] != TUNE or outcome != "completed":
                continue
            vector = [values.get(m, math.nan) for m in objectives]
            if any(math.isnan(v) for v in vector):
                continue
            if any(v > 0 for v in self.selection.violations(values)):
                continue
            out.append((tid, vector, rec["params"]))
        return out

    def best(self, cell_id: str) -> tuple[str, float, dict[str, Any]] | None:
        """(trial id, value, params) of the cell's best feasible completed tuning trial by
        the primary objective; ties go to the earliest."""
        metric, mode = self.selection.primary
        j = [m for m, _ in self.selection.objectives].index(metric)
        sign = 1 if mode == "max" else -1
        found = None
        for tid, vector, params in self.candidates(cell_id):
            if found is None or sign * vector[j] > sign * found[1]:
                found = (tid, vector[j], params)
        return found

    def confirm_configs(self, cell_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(tuning trial id, params) of the configs the cell confirms: its best (one
        objective), or up to `confirm.top_k` of its Pareto set spread along the front.
        Ray asks for trials often; once the cell's tuning is done the answer is kept."""
        if cell_id in self._picks:
            return self._picks[cell_id]
        picks = self._choose(cell_id)
        if self._tuning_done(self._cell(cell_id)):
            self._picks[cell_id] = picks
        return picks

    def _choose(self, cell_id: str) -> list[tuple[str, dict[str, Any]]]:
        if not self.selection.multi:
            best = self.best(cell_id)
            return [] if best is None else [(best[0], best[2])]
        found = self.candidates(cell_id)
        if not found:
            return []
        modes = [mode for _, mode in self.selection.objectives]
        front = [f for f, keep in zip(found, non_dominated([f[1] for f in found], modes),
                                      strict=True) if keep]
        picks = spread([f[1] for f in front], modes, self.plan.space.top_k)
        return [(front[i][0], front[i][2]) for i in picks]

    def _suggest_tune(self, cell: Cell, trial_id: str) -> dict:
        self._issued[cell.id] += 1
        study = self._study(cell)
        params: dict[str, Any] = {}
        if study is not None:
            claimed = {n for t, n in self._numbers.items() if self._trials[t]["cell"] == cell.id}
            self._numbers[trial_id], params = study.ask(trial_id, claimed)
        return self._config(trial_id, cell, TUNE, params, seed=None)

    def _suggest_confirm(self, cell: Cell, trial_id: str) -> dict:
        seeds = self.plan.space.confirm.seeds
        k = self._confirmed[cell.id]
        self._confirmed[cell.id] += 1
        tuned_by, params = self.confirm_configs(cell.id)[k // len(seeds)]
        return self._config(trial_id, cell, CONFIRM, params, seed=seeds[k % len(seeds)],
                            tuned_by=tuned_by)

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
        return [c.id for c in self.plan.cells
                if self._tuning_done(c) and not self.confirm_configs(c.id)]

    # -- save/restore: the bookkeeping and the ASHA rungs, with the experiment (the studies
    # live in their own storage)

    def state(self) -> SearchState:
        return SearchState(
            cells=[c.id for c in self.plan.cells], trials=self._trials, issued=self._issued,
            confirmed=self._confirmed, ended=self._ended, cursor=self._cursor,
            study_numbers=self._numbers,
            schedulers=self.scheduler.save_cells() if self.scheduler else {})

    def save(self, checkpoint_path: str) -> None:
        # A study trial must never end before Ray's saved experiment knows its Ray trial:
        # a driver killed in between would leave a finished study trial no restored trial
        # owns (Optuna cannot delete or reopen it). So a verdict is told at the save after
        # the one that wrote it: Ray renames each save into place before asking for the
        # next, so by then it is on disk. A trial asked for after the last save is still
        # RUNNING when the driver dies, and the next trial of its cell adopts it.
        self._tell(self._saved)
        self._saved, self._unsaved = self._unsaved, set()
        self.state().to_disk(checkpoint_path)

    def flush(self) -> None:
        """Tell the studies every verdict (the sweep has ended, or a saved state was loaded:
        everything in it is on disk)."""
        self._tell(self._ended)
        self._saved, self._unsaved = set(), set()

    def restore(self, checkpoint_path: str) -> None:
        self.load_state(SearchState.from_disk(checkpoint_path,
                                              [c.id for c in self.plan.cells]))

    def load_state(self, state: SearchState) -> None:
        self._trials, self._issued = dict(state.trials), dict(state.issued)
        self._confirmed, self._ended = dict(state.confirmed), dict(state.ended)
        self._cursor, self._numbers = state.cursor, dict(state.study_numbers)
        self._studies = {}  # reopened (with a fresh sampler seed) on next use
        self._picks = {}
        if self.scheduler is not None and state.schedulers:
            self.scheduler.restore_cells(state.schedulers)
        if self.studies_url is not None:
            self.flush()
