"""ASHA per cell: trials of different cells are never compared."""

from __future__ import annotations

import contextlib

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from sweeper.search._inputs import SWEEP_KEY, TUNE
from sweeper.search._state import restore_bytes, saved_bytes
from sweeper.spaces import SweepPlan


class CellScheduler(FIFOScheduler):
    """One ASHAScheduler per cell; tuning trials go to their own cell's, the rest run on."""

    def __init__(self, plan: SweepPlan):
        super().__init__()
        asha = plan.space.asha
        # Several objectives: ASHA stops trials on one of them (selection.prune_on).
        metric, mode = plan.space.selection.primary
        self._asha = {
            c.id: ASHAScheduler(time_attr="epoch", metric=metric, mode=mode,
                                max_t=c.epochs, grace_period=min(asha.grace_period, c.epochs),
                                reduction_factor=asha.reduction_factor, brackets=asha.brackets)
            for c in plan.cells} if asha.enabled else {}

    def _for(self, trial):
        entry = trial.config.get(SWEEP_KEY, {})
        return self._asha.get(entry.get("cell")) if entry.get("phase") == TUNE else None

    def on_trial_add(self, tune_controller, trial) -> None:
        if (s := self._for(trial)) is not None:
            s.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        s = self._for(trial)
        return s.on_trial_result(tune_controller, trial, result) if s else self.CONTINUE

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if (s := self._for(trial)) is not None:
            # KeyError: not registered with this ASHA (added before a restore).
            with contextlib.suppress(KeyError):
                s.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if (s := self._for(trial)) is not None:
            with contextlib.suppress(KeyError):
                s.on_trial_remove(tune_controller, trial)

    def save_cells(self) -> dict[str, bytes]:
        """Cell id -> what its ASHAScheduler's public `save` wrote (rungs, trials)."""
        return {cell: saved_bytes(s) for cell, s in self._asha.items()}

    def restore_cells(self, saved: dict[str, bytes]) -> None:
        for cell, blob in saved.items():
            if cell in self._asha:
                restore_bytes(self._asha[cell], blob)

    def debug_string(self) -> str:
        return f"ASHA per cell ({len(self._asha)} cells)"
