"""Sweeps: one Ray Tune run per sweep, one Optuna study and one set of ASHA brackets per cell.

How a sweep runs (`launch`, and `resume` after any interruption):

1. The driver validates the space, loads each distinct dataset once and puts it in Ray's
   object store (numpy arrays, read zero-copy by every trial on a node), trains the ERM
   warm starts the cells need once per (scenario, seed) as Ray tasks and caches them in
   the sweep's storage (`warm_starts/`), then starts one `Tuner`.
2. `CellSearcher` (a Ray Tune `Searcher`) keeps one Optuna study per cell (`_study`: one
   to three objectives, TPE by default, in the sweep's Optuna storage under the cell id,
   so `optuna.load_study` and optuna-dashboard read it) and hands out tuning trials
   round-robin across cells, `trials_per_cell` each. A trial's
   config is its whole trial config plus the reserved key `_sweep` (cell, scenario,
   method, phase, seed, ...), which the trainable strips before validation.
3. `CellScheduler` (a Ray Tune `TrialScheduler`) sends each tuning trial's results to its
   own cell's `ASHAScheduler` (on the primary objective, `selection.prune_on`), so trials
   of different cells are never compared. A trial ASHA stops is told to Optuna as PRUNED,
   not COMPLETE, so it never enters a front.
4. Once every tuning trial of a cell has ended, the searcher hands out the cell's
   confirmation trials: the best completed config (selection metric, validation split),
   or with several objectives up to `confirm.top_k` configs of the Pareto set spread
   along the front (configs breaking `selection.constraints` excluded), each re-run with
   each confirmation seed at full budget, `phase=confirm`, never stopped early. The sweep
   ends when every cell is confirmed (cells with no completed trial are skipped, with a
   warning).
5. Trials report metrics and a checkpoint every epoch; `FailureConfig(max_failures)`
   retries a failing trial from its last checkpoint. The searcher's state (`SearchState`:
   which trials ran, how they ended, ASHA rungs) is saved with the experiment; the studies
   are in their storage already, so `Tuner.restore` on `resume` continues the same
   studies (a study trial asked for after the last save is adopted by the next trial).

Fault injection (tests, and rehearsing failure handling on a cluster): the driver reads
`CAAT_FAIL_AT_EPOCH` and hands it to trials; see `_faults`.

This module is the public front; the work is in its private siblings: `_searcher`
(CellSearcher), `_study` (a cell's Optuna study), `_scheduler` (CellScheduler), `_state`
(the saved state), `_inputs` (the `_sweep` key, shared datasets, warm starts),
`_trainable` (the Ray trainable), `_faults` (fault injection) and `_driver` (launch,
resume).
"""

from sweeper.search._driver import (
    SweepOptions,
    check_size,
    check_study_storage,
    launch,
    note_space_edits,
    resume,
)
from sweeper.search._faults import FAULT_ENV, FailRule, InjectedFailure, parse_fault_rules
from sweeper.search._inputs import (
    CONFIRM,
    SWEEP_KEY,
    TUNE,
    SharedSplits,
    data_key,
    load_datasets,
    prepare_warm_starts,
    sweep_configs,
    sweep_entry,
    warm_start_for,
)
from sweeper.search._scheduler import CellScheduler
from sweeper.search._searcher import CellSearcher
from sweeper.search._state import STATE_VERSION, SearchState, load_search_state, study_trials
from sweeper.search._study import RAY_TRIAL_ATTR, CellStudy, open_study
from sweeper.search._trainable import sweep_trial, trial_name

__all__ = [
    "CONFIRM", "FAULT_ENV", "RAY_TRIAL_ATTR", "STATE_VERSION", "SWEEP_KEY", "TUNE",
    "CellScheduler", "CellSearcher", "CellStudy", "FailRule", "InjectedFailure", "SearchState",
    "SharedSplits", "SweepOptions",
    "check_size", "check_study_storage", "data_key", "launch", "load_datasets", "load_search_state",
    "note_space_edits", "open_study", "parse_fault_rules", "prepare_warm_starts", "resume",
    "study_trials", "sweep_configs", "sweep_entry", "sweep_trial", "trial_name",
    "warm_start_for",
]
