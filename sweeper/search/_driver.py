"""Launch and resume: check everything, start Ray and one Tuner, record how the run ended."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from sweeper import hints, tracking
from sweeper import storage as st
from sweeper.contract import (
    OBJECTIVES_TAG,
    OPTUNA_STORAGE_TAG,
    UNRETRYABLE_KEY,
    format_objectives,
    resolve_tracking_uri,
)
from sweeper.lock import SweepLock
from sweeper.restore import quiet_deleted_checkpoints, resilient
from sweeper.search._faults import FAULT_ENV, FailRule, parse_fault_rules
from sweeper.search._inputs import SWEEP_KEY, SharedSplits, load_datasets, prepare_warm_starts
from sweeper.search._resources import (
    EXIT_STALLED,
    StallWatch,
    check_resources,
    stalled,
    warn,
)
from sweeper.search._resources import reset as reset_stall
from sweeper.search._scheduler import CellScheduler
from sweeper.search._searcher import CellSearcher
from sweeper.search._state import load_search_state
from sweeper.search._trainable import sweep_trial, trial_name
from sweeper.signals import StopSignals
from sweeper.spaces import SweepPlan, parse_space
from sweeper.tracking import Tracker, TrackingCallback
from trainables.errors import ConfigError, one_line

# The sweep ran to its end, but some of its trials failed (their `error` tags say why), or a
# cell got no confirmation runs.
EXIT_TRIALS_FAILED = 1


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
        raise ConfigError(f"{where} ({one_line(err, 200)})") from None


def launch(space_path: str, *, name: str | None = None, storage: str | None = None,
           tracking_uri: str | None = None, address: str | None = None,
           options: SweepOptions | None = None, force: bool = False,
           optuna_storage: str | None = None) -> int:
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
    studies_url = st.study_storage(st.join(storage, plan.name), optuna_storage)
    with SweepLock(storage, plan.name), StopSignals() as stop:
        return _launch(plan, storage, tracking_uri, address, faults, options, stop,
                       studies_url)


def check_cluster(plan: SweepPlan, address: str | None) -> None:
    """A trial the running Ray can never fit: refused on a local cluster (it cannot grow),
    a warning behind --address (an autoscaler may add the nodes)."""
    import ray

    warn(check_resources(plan.space.resources.per_trial(), ray.cluster_resources(),
                         local=not address))


def check_size(plan: SweepPlan) -> None:
    """Refuse a space whose trials could not finish in any sane time (a typo, usually)."""
    n, limit = plan.n_trials(), plan.space.max_trials
    if n > limit:
        raise ConfigError(
            f"trials_per_cell: {plan.space.trials_per_cell} makes {n} trials in "
            f"{len(plan.cells)} cells, more than max_trials ({limit}); lower it, raise "
            "max_trials in the space, or pass --force")


def _launch(plan: SweepPlan, storage: str, tracking_uri: str, address: str | None,
            faults: list[FailRule], options: SweepOptions, stop: StopSignals,
            studies_url: str) -> int:
    if st.sweep_exists(storage, plan.name):
        raise ConfigError(f"--name: a sweep {plan.name!r} exists in {storage}; continue it "
                          f"with `{hints.command('resume', plan.name, storage=storage)}` or "
                          "choose another --name")
    datasets = load_datasets(plan)  # missing data fails here
    # Ray first: a trial no node can fit is refused before MLflow or Optuna see the sweep.
    _init_ray(address, options)
    check_cluster(plan, address)
    tracker = Tracker(tracking_uri, plan.name)
    tracker.check_reachable()
    if tracker.has_runs():
        raise ConfigError(f"--name: MLflow experiment 'caat-sweep/{plan.name}' at "
                          f"{tracking_uri} already has runs; choose another --name")
    check_study_storage(studies_url, plan)
    st.check_shared(storage)
    parent = _start_parent(tracker, plan, studies_url)
    manifest = st.Manifest(name=plan.name, storage=storage, tracking_uri=tracking_uri,
                           space_text=plan.text, space_source=plan.source, address=address,
                           experiment_id=tracker.experiment_id(), parent_run_id=parent,
                           optuna_storage=studies_url,
                           extra={"space_path": str(Path(plan.source).resolve())})
    manifest.save()
    return _run(plan, manifest, tracker, datasets, faults, options, stop, restore=False)


def _start_parent(tracker: Tracker, plan: SweepPlan, studies_url: str) -> str:
    sel = plan.space.selection
    metric, mode = sel.primary
    return tracker.start_parent(metric, mode, plan.text, {
        OBJECTIVES_TAG: format_objectives(sel.objectives), OPTUNA_STORAGE_TAG: studies_url})


def check_study_storage(url: str, plan: SweepPlan) -> None:
    """The Optuna storage answers and holds no study of this sweep's cells yet (a database
    shared with another sweep of the same cells would mix their trials)."""
    import optuna

    if url.startswith("sqlite:///"):
        # SQLite creates the file, not its directory (a new sweep's, the first time).
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(url)
        names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as err:  # SQLAlchemy's errors are many and long
        raise ConfigError(f"--optuna-storage: cannot open {url} ({one_line(err, 200)})") from None
    if clash := sorted(names & {c.id for c in plan.cells if c.space}):
        raise ConfigError(f"--optuna-storage: {url} already holds studies of this sweep's "
                          f"cells ({', '.join(clash[:3])}); give each sweep its own database")


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
        print(f"sweep {manifest.name} is complete; `{hints.for_sweep('status', manifest)}` "
              "shows it", file=sys.stderr)
        return 0
    plan = parse_space(_yaml(manifest.space_text), text=manifest.space_text,
                       source=manifest.space_source, name=manifest.name)
    note_space_edits(manifest)
    # A state this version cannot continue (older format, other cells) fails here, one line.
    load_search_state(manifest.sweep_dir, [c.id for c in plan.cells])
    faults = parse_fault_rules(os.environ.get(FAULT_ENV))
    datasets = load_datasets(plan)
    _init_ray(address or manifest.address, options)
    check_cluster(plan, address or manifest.address)
    tracker = Tracker(manifest.tracking_uri, plan.name)
    tracker.check_reachable()
    st.check_shared(manifest.storage)
    manifest.parent_run_id = _start_parent(tracker, plan, manifest.studies_url)
    manifest.state = "running"
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

    reset_stall()
    warm = prepare_warm_starts(plan, datasets, manifest.sweep_dir)
    res = plan.space.resources
    trainable = tune.with_resources(resilient(wrap_function(
        tune.with_parameters(sweep_trial, datasets=datasets, warm_starts=warm, faults=faults)),
        epochs_of=lambda config: config[SWEEP_KEY]["epochs"]),
        res.per_trial())
    quiet_deleted_checkpoints()
    hints.quiet_ray_resume_hint()
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
    except BaseException as err:
        _end_parent(manifest, tracker, "KILLED")
        manifest.state = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        manifest.save()
        raise
    return _finish(plan, manifest, tracker, grid, stop)


def _new_tuner(plan: SweepPlan, manifest: st.Manifest, trainable, options: SweepOptions):
    from ray import tune

    scheduler = CellScheduler(plan)
    searcher = CellSearcher(plan, manifest.studies_url, scheduler)
    objectives = {m: m for m, _ in plan.space.selection.objectives}
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", **objectives, "train_loss": "loss"},
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
            name=plan.name, storage_path=manifest.storage,
            callbacks=[callback, StallWatch(plan.space.resources.pending_timeout_s,
                                            plan.space.resources.per_trial())],
            failure_config=tune.FailureConfig(max_failures=plan.space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=plan.space.keep_checkpoints),
            progress_reporter=reporter, verbose=options.verbose))


def _finish(plan: SweepPlan, manifest: st.Manifest, tracker: Tracker, grid,
            stop: StopSignals) -> int:
    """Record how the run ended: complete (manifest `done`, parent FINISHED) or stopped
    early by Ctrl-C or SIGTERM (parent KILLED; `resume` continues)."""
    # Loading the final state tells the studies the verdicts the last save held back.
    searcher = CellSearcher(plan, manifest.studies_url)
    state = load_search_state(manifest.sweep_dir, [c.id for c in plan.cells])
    if state is not None:
        searcher.load_state(state)
    failed = sum(r.error is not None or UNRETRYABLE_KEY in (r.metrics or {}) for r in grid)
    if not searcher.complete():
        _end_parent(manifest, tracker, "KILLED")
        manifest.state = "interrupted"
        manifest.save()
        if reason := stalled():
            print(f"sweep {plan.name} stopped: {reason}; "
                  f"`{hints.for_sweep('resume', manifest)}` continues it", file=sys.stderr)
            return EXIT_STALLED
        print(f"sweep {plan.name} interrupted ({len(grid)} trials so far); "
              f"`{hints.for_sweep('resume', manifest)}` continues it", file=sys.stderr)
        return stop.exit_code
    manifest.state = "done"
    manifest.save()
    _end_parent(manifest, tracker, "FINISHED")
    skipped = searcher.confirm_skipped()
    for cell in skipped:
        print(f"warning: cell {cell}: no tuning trial completed"
              + (" within selection.constraints" if plan.space.selection.constraints else "")
              + ", so no confirmation runs", file=sys.stderr)
    print(f"sweep {plan.name}: {len(grid)} trials, {failed} failed"
          + (f", {len(skipped)} cells without confirmation runs" if skipped else "") + "; "
          f"`{hints.for_sweep('status', manifest)}` for the table, "
          f"`{hints.for_sweep('analyze', manifest)}` for the summary, MLflow at "
          f"{manifest.tracking_uri}", file=sys.stderr)
    return EXIT_TRIALS_FAILED if failed or skipped else 0


def _end_parent(manifest: st.Manifest, tracker: Tracker, status: str) -> None:
    """The parent run's end status, queued behind any writes the tracking server missed."""
    left = tracking.end_sweep_run(tracker, manifest.parent_run_id, status,
                                  tracking.pending_path(manifest.sweep_dir))
    if left:
        print(f"tracking: {left} MLflow writes await `{hints.for_sweep('sync', manifest)}` (the "
              f"tracking server at {manifest.tracking_uri} did not answer)", file=sys.stderr)
