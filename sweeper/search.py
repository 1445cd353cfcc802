"""Sweeps: one Ray Tune run per sweep, one Optuna study and one set of ASHA brackets per cell.

How a sweep runs (`launch`, and `resume` after any interruption):

1. The driver validates the space, loads each distinct dataset once and puts it in Ray's
   object store (numpy arrays, read zero-copy by every trial on a node), trains the ERM
   warm starts the cells need once per (scenario, seed) as Ray tasks and caches them in
   the sweep's storage (`warm_starts/`), then starts one `Tuner`.
2. `CellSearcher` (a Ray Tune `Searcher`) keeps one `OptunaSearch` (TPE) per cell and
   hands out tuning trials round-robin across cells, `trials_per_cell` each. A trial's
   config is its whole trial config plus the reserved key `_sweep` (cell, scenario,
   method, phase, seed, ...), which the trainable strips before validation.
3. `CellScheduler` (a Ray Tune `TrialScheduler`) sends each tuning trial's results to its
   own cell's `ASHAScheduler`, so trials of different cells are never compared. A trial
   ASHA stops is told to Optuna as PRUNED, not COMPLETE.
4. Once every tuning trial of a cell has ended, the searcher hands out the cell's
   confirmation trials: the best completed config (selection metric, validation split)
   re-run with each confirmation seed at full budget, `phase=confirm`, never stopped
   early. The sweep ends when every cell is confirmed (cells with no completed trial are
   skipped, with a warning).
5. Trials report metrics and a checkpoint every epoch; `FailureConfig(max_failures)`
   retries a failing trial from its last checkpoint. The searcher's state (the Optuna
   studies, ASHA rungs, which trials ran) is saved with the experiment, so
   `Tuner.restore` on `resume` continues the same studies.

Fault injection (tests, and rehearsing failure handling on a cluster): the driver reads
`CAAT_FAIL_AT_EPOCH` and hands it to trials. Rules separated by `;`, each
`EPOCH[:CELL_SUBSTRING[:always]]`: a matching trial raises `InjectedFailure` before
reporting that epoch, in its first attempt only (its retry resumes from the previous
epoch's checkpoint and gets past it; use EPOCH >= 2 for that), or in every attempt with
`always`. Example: `CAAT_FAIL_AT_EPOCH="2:/erm;2:/trades:always"`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import Searcher

from sweeper import storage as st
from sweeper import tracking
from sweeper.lock import SweepLock
from sweeper.restore import quiet_deleted_checkpoints, resilient
from sweeper.signals import StopSignals
from sweeper.spaces import Cell, SweepPlan, parse_space
from sweeper.tracking import Tracker, TrackingCallback, resolve_tracking_uri, trial_outcome
from trainables.config import validate
from trainables.errors import ConfigError

logger = logging.getLogger(__name__)

SWEEP_KEY = "_sweep"  # reserved key in a Ray trial config: the trial's place in the sweep
FAULT_ENV = "CAAT_FAIL_AT_EPOCH"
TUNE, CONFIRM = "tune", "confirm"


# ------------------------------------------------------------------------ the searcher


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
        self._subs = {c.id: self._optuna(c, i) for i, c in enumerate(plan.cells)}
        self._trials: dict[str, dict[str, Any]] = {}  # trial id -> entry + params
        self._issued = {c.id: 0 for c in plan.cells}  # tuning trials handed out
        self._confirmed = {c.id: 0 for c in plan.cells}  # confirmation trials handed out
        self._ended: dict[str, tuple[str, float | None]] = {}  # trial id -> (outcome, value)
        self._cursor = 0

    def _optuna(self, cell: Cell, index: int):
        if not cell.space:
            return None
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opts = self.plan.space.optuna
        sampler = optuna.samplers.TPESampler(seed=opts.seed + index,
                                             n_startup_trials=opts.n_startup_trials)
        return OptunaSearch(cell.optuna_space(), metric=self.selection.metric,
                            mode=self.selection.mode, sampler=sampler, study_name=cell.id)

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
        params = sub.suggest(trial_id) if sub is not None else {}
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

    # -- save/restore: the studies, the bookkeeping and the ASHA rungs, with the experiment

    def _state(self) -> dict[str, Any]:
        return {"trials": self._trials, "issued": self._issued, "confirmed": self._confirmed,
                "ended": self._ended, "cursor": self._cursor,
                "subs": {k: (s.__dict__ if s is not None else None)
                         for k, s in self._subs.items()},
                "scheduler": self.scheduler.get_state() if self.scheduler else None}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self._state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.load_state(pickle.load(f))

    def load_state(self, state: dict[str, Any]) -> None:
        self._trials, self._issued = state["trials"], state["issued"]
        self._confirmed, self._ended = state["confirmed"], state["ended"]
        self._cursor = state["cursor"]
        for cell_id, sub_state in state["subs"].items():
            if sub_state is not None and self._subs.get(cell_id) is not None:
                self._subs[cell_id].__dict__.update(sub_state)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.set_state(state["scheduler"])

    def studies(self) -> dict[str, Any]:
        """Cell id -> its optuna.Study (cells with nothing to search have none)."""
        return {k: s._ot_study for k, s in self._subs.items() if s is not None}


def sweep_entry(cell: Cell, phase: str, cfg: Mapping[str, Any],
               tuned_by: str | None = None) -> dict[str, Any]:
    """What a trial's `_sweep` key holds: its place in the sweep and its shared inputs."""
    tc = validate(cfg)
    return {"cell": cell.id, "scenario": cell.scenario, "method": cell.method, "phase": phase,
            "seed": tc.runtime.seed, "epochs": tc.optim.epochs, "data": data_key(tc),
            "warm_start": warm_start_for(cell, tc.runtime.seed), "tuned_by": tuned_by}


def load_search_state(sweep_dir: str) -> dict[str, Any] | None:
    """The latest saved state of a sweep's searcher (None before the first save)."""
    import pyarrow.fs as pafs

    fs, path = st.filesystem(sweep_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    prefix = Searcher.CKPT_FILE_TMPL.split("{}")[0]
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                   if i.base_name.startswith(prefix))
    if not files:
        return None
    with fs.open_input_stream(files[-1]) as f:
        return pickle.loads(f.readall())


def load_studies(sweep_dir: str) -> dict[str, Any]:
    """Cell id -> its optuna.Study, from the sweep's latest saved searcher state."""
    state = load_search_state(sweep_dir) or {"subs": {}}
    return {k: s["_ot_study"] for k, s in state["subs"].items() if s is not None}


def study_trials(sweep_dir: str) -> dict[str, dict[str, Any]]:
    """Cell id -> {Ray trial id: its Optuna FrozenTrial}: which study trial each run is."""
    state = load_search_state(sweep_dir) or {"subs": {}}
    out = {}
    for cell, sub in state["subs"].items():
        if sub is None:
            continue
        frozen = {t.number: t for t in sub["_ot_study"].trials}
        out[cell] = {tid: frozen[t.number] for tid, t in sub["_ot_trials"].items()}
    return out


# ------------------------------------------------------------------------ the scheduler


class CellScheduler(FIFOScheduler):
    """One ASHAScheduler per cell; tuning trials go to their own cell's, the rest run on."""

    def __init__(self, plan: SweepPlan):
        super().__init__()
        asha, sel = plan.space.asha, plan.space.selection
        self._asha = {
            c.id: ASHAScheduler(time_attr="epoch", metric=sel.metric, mode=sel.mode,
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

    def get_state(self) -> dict:
        return {k: dict(s.__dict__) for k, s in self._asha.items()}

    def set_state(self, state: dict) -> None:
        for k, saved in state.items():
            if k in self._asha:
                self._asha[k].__dict__.update(saved)

    def debug_string(self) -> str:
        return f"ASHA per cell ({len(self._asha)} cells)"


# ------------------------------------------------------------------- shared trial inputs


def data_key(cfg) -> str:
    """Identifies a loaded dataset: its config section and the seed (generated data)."""
    blob = json.dumps({"dataset": cfg.dataset.model_dump(mode="json"),
                       "seed": cfg.runtime.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warm_start_for(cell: Cell, seed: int) -> str | None:
    """The ERM warm start a cell's trials with this seed share, or None when not used.

    It is trained from the cell's unsampled config: the knobs a space samples (e.g.
    optim.lr) tune the method's training, not the shared starting point, so every trial
    of a scenario and seed starts from the same weights."""
    from trainables.trial import warm_start_key

    cfg = validate(cell.config)
    if cfg.init.erm_epochs == 0 or cfg.init.checkpoint:
        return None
    cfg.runtime.seed = seed
    return warm_start_key(cfg)


@dataclass
class SharedSplits:
    """DatasetSplits with numpy arrays: Ray's object store hands these out zero-copy."""

    fields: dict[str, Any]

    @classmethod
    def from_splits(cls, splits) -> SharedSplits:
        out = {}
        for f in dataclasses.fields(splits):
            value = getattr(splits, f.name)
            out[f.name] = value.numpy() if hasattr(value, "numpy") else value
        return cls(out)

    def to_splits(self):
        import torch

        from trainables.data import DatasetSplits

        with warnings.catch_warnings():
            # Read-only shared memory: trials never write into their dataset.
            warnings.simplefilter("ignore", UserWarning)
            kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                  for k, v in self.fields.items()}
        return DatasetSplits(**kw)


def sweep_configs(plan: SweepPlan) -> list[dict]:
    """One trial config per (cell, seed) the sweep can run, without sampled values."""
    seeds = [None, *plan.space.confirm.seeds]
    return [plan.trial_config(c, {}, s) for c in plan.cells for s in seeds]


def load_datasets(plan: SweepPlan) -> dict[str, SharedSplits]:
    """Each distinct dataset of the sweep, loaded once (missing data fails here, exit 2)."""
    from trainables import data

    out: dict[str, SharedSplits] = {}
    loaded: list[tuple[dict, Any, SharedSplits]] = []
    for raw in sweep_configs(plan):
        cfg = validate(raw)
        key = data_key(cfg)
        if key in out:
            continue
        splits = data.load(cfg.dataset, seed=cfg.runtime.seed)
        section = cfg.dataset.model_dump()
        # Real datasets ignore the seed: share one copy when the content is the same.
        same = next((s for sec, sp, s in loaded if sec == section and _same(sp, splits)), None)
        if same is None:
            same = SharedSplits.from_splits(splits)
            loaded.append((section, splits, same))
        out[key] = same
    return out


def _same(a, b) -> bool:
    import torch

    return all(torch.equal(getattr(a, n), getattr(b, n))
               for n in ("train_x", "train_y", "test_x", "test_y"))


def _train_warm_start(cfg_raw: dict, shared: SharedSplits) -> dict:
    """A Ray task: ERM warm start of one (scenario, seed)."""
    import torch

    from trainables.trial import build_problem, resolve_device, train_warm_start

    cfg = validate(cfg_raw)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    problem = build_problem(cfg, device, shared.to_splits())
    return train_warm_start(cfg, problem, device)


def prepare_warm_starts(plan: SweepPlan, datasets: Mapping[str, SharedSplits],
                        sweep_dir: str) -> dict[str, dict]:
    """The warm starts the sweep needs: from the cache in storage, else trained as Ray
    tasks (in parallel, with the trials' resources) and cached."""
    import ray

    needed: dict[str, dict] = {}
    for cell in plan.cells:
        for seed in [validate(cell.config).runtime.seed, *plan.space.confirm.seeds]:
            key = warm_start_for(cell, seed)
            if key is not None and key not in needed:
                needed[key] = plan.trial_config(cell, {}, seed)
    out, pending = {}, {}
    res = plan.space.resources
    task = ray.remote(_train_warm_start).options(num_cpus=res.cpu, num_gpus=res.gpu)
    for key, raw in needed.items():
        path = st.join(sweep_dir, st.WARM_STARTS, f"erm-{key}.pt")
        if st.exists(path):
            out[key] = st.load_tensors(path)
        else:
            pending[key] = task.remote(raw, datasets[data_key(validate(raw))])
    if pending:
        print(f"training {len(pending)} ERM warm start(s)", file=sys.stderr)
    for key, ref in pending.items():
        out[key] = ray.get(ref)
        st.save_tensors(st.join(sweep_dir, st.WARM_STARTS, f"erm-{key}.pt"), out[key])
    return out


# ------------------------------------------------------------------------ the trainable


class InjectedFailure(RuntimeError):
    """Raised by fault injection (CAAT_FAIL_AT_EPOCH); never by real training."""


@dataclass(frozen=True)
class FailRule:
    epoch: int
    match: str = ""
    always: bool = False


def parse_fault_rules(text: str | None) -> list[FailRule]:
    rules = []
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        fields = part.strip().split(":")
        try:
            epoch = int(fields[0])
        except ValueError:
            raise ConfigError(f"{FAULT_ENV}: {part!r}: expected EPOCH[:CELL_SUBSTRING[:always]]"
                              ) from None
        always = len(fields) > 2 and fields[2] == "always"
        rules.append(FailRule(epoch, fields[1] if len(fields) > 1 else "", always))
    return rules


class _FaultyReporter:
    """Wraps RayReporter: raises before reporting a matching epoch (fault injection)."""

    def __init__(self, inner, rules: list[FailRule], cell: str):
        self.inner = inner
        self.rules = [r for r in rules if r.match in cell]
        self.restored = False

    def latest_checkpoint(self):
        ckpt = self.inner.latest_checkpoint()
        self.restored = ckpt is not None
        return ckpt

    def report(self, metrics: dict, checkpoint_dir) -> None:
        for rule in self.rules:
            if metrics.get("epoch") == rule.epoch and (rule.always or not self.restored):
                when = "every attempt" if rule.always else "once"
                raise InjectedFailure(f"injected failure at epoch {rule.epoch} "
                                      f"({FAULT_ENV}, {when})")
        self.inner.report(metrics, checkpoint_dir)


def sweep_trial(config: dict, *, datasets: Mapping[str, SharedSplits],
                warm_starts: Mapping[str, dict], faults: list[FailRule]) -> None:
    """The Ray Tune trainable: one trial of the sweep through `run_trial`."""
    from trainables.trial import RayReporter, run_trial, warm_start_key

    # One line per checkpoint per epoch from every trial buries the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    entry = config[SWEEP_KEY]
    cfg = validate({k: v for k, v in config.items() if k != SWEEP_KEY})
    ws = None
    if entry.get("warm_start"):
        # This trial's own key maps to the warm start its scenario and seed share.
        ws = {warm_start_key(cfg): warm_starts[entry["warm_start"]]}
    reporter = RayReporter()
    if faults:
        reporter = _FaultyReporter(reporter, faults, entry["cell"])
    run_trial(cfg, reporter, splits=datasets[entry["data"]].to_splits(), warm_starts=ws)


def trial_name(trial) -> str:
    return trial.trial_id


# ------------------------------------------------------------------------ running


@dataclass
class SweepOptions:
    """How to run a sweep (as opposed to what it searches: the space)."""

    verbose: int = 1  # Ray's progress table (0: quiet)
    num_cpus: int | None = None  # local Ray only; None: all cores
    progress_every_s: float = 30.0


def _init_ray(address: str | None, options: SweepOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=options.verbose > 0)
        else:
            ray.init(num_cpus=options.num_cpus, include_dashboard=False,
                     log_to_driver=options.verbose > 0)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"--address: cannot connect to {address}" if address else "ray: cannot start"
        raise ConfigError(f"{where} ({' '.join(str(err).split())[:200]})") from None


def launch(space_path: str, *, name: str | None = None, storage: str | None = None,
           tracking_uri: str | None = None, address: str | None = None,
           options: SweepOptions | None = None, force: bool = False) -> int:
    """`caat-sweep launch`: check everything, then run a new sweep to its end.

    Every check that can fail on bad input comes before the first write to storage or
    MLflow, so a rejected launch leaves nothing behind. `force` lets a space through that
    has more trials than its `max_trials`."""
    from sweeper.spaces import load_space

    options = options or SweepOptions()
    plan = load_space(space_path, name=name)
    if not force:
        check_size(plan)
    storage = st.resolve_storage(storage)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    faults = parse_fault_rules(os.environ.get(FAULT_ENV))
    st.check_writable(storage)
    with SweepLock(storage, plan.name), StopSignals() as stop:
        return _launch(plan, storage, tracking_uri, address, faults, options, stop)


def check_size(plan: SweepPlan) -> None:
    """Refuse a space whose trials could not finish in any sane time (a typo, usually)."""
    n, limit = plan.n_trials(), plan.space.max_trials
    if n > limit:
        raise ConfigError(
            f"trials_per_cell: {plan.space.trials_per_cell} makes {n} trials in "
            f"{len(plan.cells)} cells, more than max_trials ({limit}); lower it, raise "
            "max_trials in the space, or pass --force")


def _launch(plan: SweepPlan, storage: str, tracking_uri: str, address: str | None,
            faults: list[FailRule], options: SweepOptions, stop: StopSignals) -> int:
    if st.sweep_exists(storage, plan.name):
        raise ConfigError(f"--name: a sweep {plan.name!r} exists in {storage}; continue it "
                          f"with `caat-sweep resume {plan.name}` or choose another --name")
    datasets = load_datasets(plan)  # missing data fails here
    tracker = Tracker(tracking_uri, plan.name)
    tracker.check_reachable()
    if tracker.has_runs():
        raise ConfigError(f"--name: MLflow experiment 'caat-sweep/{plan.name}' at "
                          f"{tracking_uri} already has runs; choose another --name")
    _init_ray(address, options)
    st.check_shared(storage)
    parent = tracker.start_parent(plan.space.selection.metric, plan.space.selection.mode,
                                  plan.text)
    manifest = st.Manifest(name=plan.name, storage=storage, tracking_uri=tracking_uri,
                           space_text=plan.text, space_source=plan.source, address=address,
                           experiment_id=tracker.experiment_id(), parent_run_id=parent,
                           extra={"space_path": str(Path(plan.source).resolve())})
    manifest.save()
    return _run(plan, manifest, tracker, datasets, faults, options, stop, restore=False)


def resume(name: str, *, storage: str | None = None, address: str | None = None,
           options: SweepOptions | None = None) -> int:
    """`caat-sweep resume`: continue a sweep from its storage (studies, trials, MLflow)."""
    options = options or SweepOptions()
    storage = st.resolve_storage(storage)
    st.load_manifest(storage, name)  # an unknown sweep fails here, one line
    st.check_writable(storage)
    with SweepLock(storage, name), StopSignals() as stop:
        # Read under the lock: a driver that held it may have just finished the sweep.
        manifest = st.load_manifest(storage, name)
        tracking.send_pending(Tracker(manifest.tracking_uri, manifest.name), manifest)
        return _resume(manifest, address, options, stop)


def _resume(manifest: st.Manifest, address: str | None, options: SweepOptions,
            stop: StopSignals) -> int:
    if manifest.state == "done":
        print(f"sweep {manifest.name} is complete; `caat-sweep status {manifest.name}` "
              "shows it", file=sys.stderr)
        return 0
    plan = parse_space(_yaml(manifest.space_text), text=manifest.space_text,
                       source=manifest.space_source, name=manifest.name)
    note_space_edits(manifest)
    faults = parse_fault_rules(os.environ.get(FAULT_ENV))
    datasets = load_datasets(plan)
    tracker = Tracker(manifest.tracking_uri, plan.name)
    tracker.check_reachable()
    _init_ray(address or manifest.address, options)
    st.check_shared(manifest.storage)
    manifest.parent_run_id = tracker.start_parent(
        plan.space.selection.metric, plan.space.selection.mode, plan.text)
    manifest.save()
    return _run(plan, manifest, tracker, datasets, faults, options, stop, restore=True)


def note_space_edits(manifest: st.Manifest) -> None:
    """Say so when the space file launched has been edited since: resume runs the stored
    copy (its studies and trials belong to that space), never the file on disk."""
    source = Path(manifest.extra.get("space_path", manifest.space_source))
    try:
        on_disk = source.read_text()
    except OSError:
        return  # moved or deleted: nothing to compare
    if on_disk != manifest.space_text:
        print(f"note: {source} has changed since sweep {manifest.name} was launched; resume "
              "continues the space as launched (kept in sweep.json); launch a new sweep "
              "under another --name to run the edited one", file=sys.stderr)


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text) or {}


def _run(plan: SweepPlan, manifest: st.Manifest, tracker: Tracker,
         datasets: dict[str, SharedSplits], faults: list[FailRule], options: SweepOptions,
         stop: StopSignals, restore: bool) -> int:
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    warm = prepare_warm_starts(plan, datasets, manifest.sweep_dir)
    res = plan.space.resources
    trainable = tune.with_resources(resilient(wrap_function(
        tune.with_parameters(sweep_trial, datasets=datasets, warm_starts=warm, faults=faults)),
        epochs_of=lambda config: config[SWEEP_KEY]["epochs"]),
        {"cpu": res.cpu, "gpu": res.gpu})
    quiet_deleted_checkpoints()
    # Ray's legacy output engine is the one that shows a CLIReporter's live table.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Short epochs make Ray snapshot the experiment often (wanted: less to redo after a
    # crash); its warning about that would repeat all through the table.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if restore and tune.Tuner.can_restore(manifest.sweep_dir):
        tuner = tune.Tuner.restore(manifest.sweep_dir, trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        tuner = _new_tuner(plan, manifest, trainable, options)
    stop.install()  # ray.init replaced it
    try:
        grid = tuner.fit()
    except BaseException:
        _end_parent(manifest, tracker, "KILLED")
        raise
    return _finish(plan, manifest, tracker, grid, stop)


def _new_tuner(plan: SweepPlan, manifest: st.Manifest, trainable, options: SweepOptions):
    from ray import tune

    scheduler = CellScheduler(plan)
    searcher = CellSearcher(plan, scheduler)
    sel = plan.space.selection
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", sel.metric: sel.metric, "train_loss": "loss"},
        parameter_columns={f"{SWEEP_KEY}/cell": "cell", f"{SWEEP_KEY}/method": "method",
                           f"{SWEEP_KEY}/phase": "phase", f"{SWEEP_KEY}/seed": "seed"},
        max_report_frequency=int(options.progress_every_s), sort_by_metric=False,
        max_column_length=48)
    callback = TrackingCallback(manifest.tracking_uri, plan.name, manifest.parent_run_id, SWEEP_KEY,
                                queue_path=tracking.pending_path(manifest.sweep_dir))
    return tune.Tuner(
        trainable, param_space={},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=-1,
                                    max_concurrent_trials=plan.space.max_concurrent,
                                    # A worker process per trial costs seconds of imports.
                                    reuse_actors=True,
                                    trial_name_creator=trial_name,
                                    trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=manifest.storage, callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=plan.space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=plan.space.keep_checkpoints),
            progress_reporter=reporter, verbose=options.verbose))


def _finish(plan: SweepPlan, manifest: st.Manifest, tracker: Tracker, grid,
            stop: StopSignals) -> int:
    """Record how the run ended: complete (manifest `done`, parent FINISHED) or stopped
    early by Ctrl-C or SIGTERM (parent KILLED; `resume` continues)."""
    searcher = CellSearcher(plan)
    state = load_search_state(manifest.sweep_dir)
    if state is not None:
        searcher.load_state(state)
    failed = sum(r.error is not None for r in grid)
    if not searcher.complete():
        _end_parent(manifest, tracker, "KILLED")
        print(f"sweep {plan.name} interrupted ({len(grid)} trials so far); "
              f"`caat-sweep resume {plan.name}` continues it", file=sys.stderr)
        return stop.exit_code
    manifest.state = "done"
    manifest.save()
    _end_parent(manifest, tracker, "FINISHED")
    for cell in searcher.confirm_skipped():
        print(f"warning: cell {cell}: no tuning trial completed, so no confirmation runs",
              file=sys.stderr)
    print(f"sweep {plan.name}: {len(grid)} trials, {failed} failed; `caat-sweep status "
          f"{plan.name}` for the table, MLflow at {manifest.tracking_uri}", file=sys.stderr)
    return 0


def _end_parent(manifest: st.Manifest, tracker: Tracker, status: str) -> None:
    """The parent run's end status, queued behind any writes the tracking server missed."""
    left = tracking.end_sweep_run(tracker, manifest.parent_run_id, status,
                                  tracking.pending_path(manifest.sweep_dir))
    if left:
        print(f"tracking: {left} MLflow writes await `caat-sweep sync {manifest.name}` (the "
              f"tracking server at {manifest.tracking_uri} did not answer)", file=sys.stderr)
