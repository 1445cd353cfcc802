"""MLflow tracking of sweeps: one parent run per sweep, one idempotent child run per trial.

What the runs hold (experiment, tags, params, metrics, artifacts, statuses) is the contract
in `sweeper.contract`; this module writes it, from the driver: `Tracker` (reads and writes
one sweep's experiment) and `TrackingCallback` (Ray Tune's trials -> MLflow).

A tracking server that goes away does not stop the sweep: the callback's writes (run
creation, epochs, tags, outcomes, the end-of-session clean-up and the parent's end status)
are idempotent operations sent through a queue (`sweeper._write_queue`). While the server
does not answer they queue, and the Tune loop waits for at most one short request per
back-off (5-60 s); they are sent in order when it answers again, or at the end. What is
still unsent when the driver ends is kept in `<storage>/<sweep>/tracking_queue.json` (the
sweep exits 0 and says so); `caat-sweep sync NAME` sends it, and `caat-sweep resume` does
first. Until then those runs may show RUNNING or miss epochs. Replays duplicate nothing: a
run is found by its `trial_id` tag before one is created, and an epoch at or below the run's
last logged step is skipped.

Why not Ray's `MLflowLoggerCallback`: it has no parent run, no lookup by trial id after a
driver crash (a resumed sweep would duplicate runs), logs Ray's bookkeeping as metrics and
knows nothing of outcomes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from sweeper import _write_queue as wq
from sweeper import contract, hints
from sweeper import storage as st
from sweeper._write_queue import pending_path
from sweeper.contract import (
    AUTOATTACK_FLAGS_KEY,
    AUTOATTACK_FLAGS_TAG,
    AUTOATTACK_RECORDS,
    CLASSWISE_KEYS,
    PARENT_TAG,
    TRIAL_TAGS,
    TUNED_BY_TAG,
    UNRETRYABLE_KEY,
    experiment_name,
    open_client,
)
from sweeper.restore import choose_fallback
from trainables.errors import ConfigError, one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from ray.tune.experiment import Trial

# Keys Ray Tune adds to every result; they are not trial metrics.
RAY_KEYS = frozenset({
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore",
    "timesteps_total", "episodes_total", "timesteps_since_restore", "iterations_since_restore",
    "timestamp", "date", "pid", "hostname", "node_ip", "config", "done", "trial_id",
    "experiment_id", "experiment_tag", "should_checkpoint", "checkpoint_dir_name", "epoch",
})
# MLflow's limits per log_batch request.
MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 100, 1000


def metrics_of(result: Mapping[str, Any]) -> dict[str, float]:
    """The trial metrics in a Ray result: run_trial's scalars, without Ray's keys. Anything
    else (lists such as `test_autoattack_indices`, strings) is no MLflow metric: skipped."""
    out = {}
    for key, value in result.items():
        if key in RAY_KEYS or key.startswith("config/") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[key] = float(value)
    return out


def flags_text(value: Any) -> str | None:
    """AutoAttack's flags (a list of strings, or one string) as one tag value; None when
    there are none."""
    flags = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    text = "; ".join(str(f) for f in flags if str(f).strip())
    return one_line(text, TAG_CHARS) if text else None


# Error, restore and flag notes as tags: one line, short enough to read in the MLflow UI.
TAG_CHARS = 500


# ------------------------------------------------------------------------------ tracker


class Tracker:
    """Reads and writes one sweep's MLflow experiment (driver side only)."""

    def __init__(self, tracking_uri: str, sweep: str):
        self.tracking_uri = tracking_uri
        self.sweep = sweep
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    # -- connection

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    def check_reachable(self) -> None:
        """Fail with one line (exit 2) when the tracking server cannot be used."""
        contract.check_reachable(self.tracking_uri)

    def store_exists(self) -> bool:
        return contract.store_exists(self.tracking_uri)

    def experiment_id(self, create: bool = False) -> str | None:
        if not create and not self.store_exists():
            return None
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(experiment_name(self.sweep))
            if exp is not None:
                self._experiment_id = exp.experiment_id
            elif create:
                self._experiment_id = self.client.create_experiment(
                    experiment_name(self.sweep), tags={"sweep": self.sweep},
                    artifact_location=contract.artifact_location(self.tracking_uri,
                                                                 self.sweep))
        return self._experiment_id

    def has_runs(self) -> bool:
        exp = self.experiment_id()
        return bool(exp and self.client.search_runs([exp], max_results=1))

    # -- parent run

    def start_parent(self, metric: str, mode: str, space_text: str,
                     extra_tags: Mapping[str, str] | None = None) -> str:
        exp = self.experiment_id(create=True)
        found = self.client.search_runs([exp], contract.PARENT_FILTER, max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(exp, run_name=self.sweep, tags={
            "sweep": self.sweep, "role": "parent", "metric": metric, "mode": mode,
            **(extra_tags or {})})
        self.client.log_text(run.info.run_id, space_text, "space.yaml")
        return run.info.run_id

    def end_parent(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    # -- trial runs

    def find_trial_run(self, trial_id: str):
        exp = self.experiment_id(create=True)
        runs = self.client.search_runs([exp], f"tags.trial_id = '{trial_id}'", max_results=2)
        return runs[0] if runs else None

    def create_trial_run(self, parent_run_id: str, trial_id: str, tags: Mapping[str, Any],
                         params: Mapping[str, Any]) -> str:
        exp = self.experiment_id(create=True)
        all_tags = {PARENT_TAG: parent_run_id, "sweep": self.sweep, "role": "trial",
                    "trial_id": trial_id, **{k: str(v) for k, v in tags.items()}}
        run = self.client.create_run(exp, run_name=trial_id, tags=all_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = timestamp_ms or int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def last_step(self, run_id: str) -> int:
        history = self.client.get_metric_history(run_id, "train_loss")
        return max((m.step for m in history), default=0)

    def finish_trial(self, run_id: str, outcome: str, error: str | None = None,
                     classwise: Mapping[str, Any] | None = None) -> None:
        if classwise:
            self.client.log_dict(run_id, dict(classwise), "classwise.json")
        self.client.set_tag(run_id, "outcome", outcome)
        if error:
            self.client.set_tag(run_id, "error", one_line(error, TAG_CHARS))
        self.client.set_terminated(run_id, "FAILED" if outcome == "failed" else "FINISHED")

    def trial_runs(self, include_deleted: bool = False) -> list:
        exp = self.experiment_id()
        if exp is None:
            return []
        return contract.search_all_runs(self.client, exp, contract.TRIAL_FILTER,
                                        include_deleted=include_deleted)

    def reconcile(self, known: Mapping[str, str]) -> None:
        """End of a driver session: delete runs of trials Ray does not know (started after
        its last saved state, re-run under new ids), and close runs still RUNNING.

        ``known`` maps trial id -> Ray status of every trial of the experiment."""
        for run in self.trial_runs():
            trial_id = run.data.tags.get("trial_id")
            if trial_id not in known:
                self.client.delete_run(run.info.run_id)
            elif run.info.status == "RUNNING":
                # Unfinished (interrupted driver): a resume sets it RUNNING again.
                self.client.set_terminated(run.info.run_id, "KILLED")


# ----------------------------------------------------------------------- the callback


def trial_outcome(entry: Mapping[str, Any], last_result: Mapping[str, Any] | None,
                  error: bool) -> str:
    """`failed` (an error, or a result saying it could not pass on retry), `completed`
    (reached its last epoch) or `pruned` (stopped before by ASHA)."""
    if error or UNRETRYABLE_KEY in (last_result or {}):
        return "failed"
    epoch = (last_result or {}).get("epoch", 0)
    return "completed" if epoch >= entry["epochs"] else "pruned"


class TrackingCallback(Callback):
    """Mirrors Ray Tune's trials into MLflow, in the driver, through a `WriteQueue` (writes
    wait out a tracking server that does not answer). Picklable: Ray Tune stores its
    callbacks with the experiment, and a restored sweep gets this object back."""

    def __init__(self, tracking_uri: str, sweep: str, parent_run_id: str, sweep_key: str,
                 queue_path: str | None = None):
        self.tracking_uri = tracking_uri
        self.sweep = sweep
        self.parent_run_id = parent_run_id
        self.sweep_key = sweep_key
        self.queue_path = queue_path  # where unsent writes are kept (None: memory only)
        self._reset()

    def _reset(self) -> None:
        self._tracker: Tracker | None = None
        self._queue: wq.WriteQueue | None = None
        self._ensured: set[str] = set()  # trials whose run this session has asked for
        self._last_step: dict[str, int] = {}  # trial id -> last epoch queued this session
        self._classwise: dict[str, dict] = {}

    def __getstate__(self) -> dict:
        return {k: getattr(self, k) for k in ("tracking_uri", "sweep", "parent_run_id",
                                               "sweep_key", "queue_path")}

    def __setstate__(self, state: dict) -> None:
        # Sweeps saved before the queue have no queue_path; before the rename, "meta_key".
        state = {"queue_path": None, **state}
        if "meta_key" in state:
            state["sweep_key"] = state.pop("meta_key")
        for name, value in state.items():
            setattr(self, name, value)
        self._reset()

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.sweep)
        return self._tracker

    @property
    def queue(self) -> wq.WriteQueue:
        if self._queue is None:
            self._queue = wq.WriteQueue(self.tracker, self.queue_path)
        return self._queue

    # -- Ray Tune hooks

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        self._put(trial, wq.set_status(trial.trial_id, "RUNNING"))
        if trial.checkpoint is not None:  # a resume or a retry: restored from a checkpoint
            fallback = choose_fallback(trial.checkpoint.filesystem, trial.checkpoint.path,
                                       trial.config[self.sweep_key]["epochs"])
            if fallback is not None:
                # How the trial got past a missing or corrupt checkpoint (sweeper.restore).
                note = one_line(fallback.note, TAG_CHARS)
                self._put(trial, wq.set_tag(trial.trial_id, "restore", note))
                if fallback.corrupt:
                    self._put(trial, wq.set_tag(trial.trial_id, "error", note))

    def on_trial_result(self, iteration: int, trials: list, trial: Trial, result: dict,
                        **info) -> None:
        step = int(result.get("epoch", 0))
        if step <= self._last_step.get(trial.trial_id, 0):
            return  # an epoch re-run after a restore: queued already
        ts = int(result.get("timestamp", time.time()) * 1000)
        self._put(trial, wq.log_epoch(trial.trial_id, step, metrics_of(result), ts))
        self._last_step[trial.trial_id] = step
        self._tag_flags(trial, result)

    def on_checkpoint(self, iteration: int, trials: list, trial: Trial, checkpoint,
                      **info) -> None:
        lists = _read_lists(checkpoint)
        data = _classwise_of(lists)
        if data:
            self._classwise[trial.trial_id] = data
        self._tag_flags(trial, lists)

    def on_trial_recover(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        self._put(trial, wq.set_tag(trial.trial_id, "retries", str(trial.num_failures)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        outcome = trial_outcome(trial.config[self.sweep_key], trial.last_result, error=False)
        reason = (trial.last_result or {}).get(UNRETRYABLE_KEY)
        self._put(trial, wq.finish(trial.trial_id, outcome, reason, self._last_classwise(trial)))

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info) -> None:
        self._put(trial, wq.finish(trial.trial_id, "failed", error_reason(trial),
                                   self._last_classwise(trial)))

    def on_experiment_end(self, trials: list, **info) -> None:
        self.queue.put(wq.reconcile({t.trial_id: t.status for t in trials}))
        self.queue.close()  # what the server did not take goes to disk

    # -- helpers

    def _put(self, trial: Trial, op: wq.Op) -> None:
        """Queue `op` behind the trial's run: found by trial id (a restored driver) or
        created, once per driver session."""
        tid = trial.trial_id
        if tid not in self._ensured:
            entry = trial.config[self.sweep_key]
            self.queue.put(wq.ensure_run(tid, self.parent_run_id, _tags(entry),
                                         trial_params(trial.config, self.sweep_key)))
            self._ensured.add(tid)
        self.queue.put(op)

    def _last_classwise(self, trial: Trial) -> dict | None:
        return (self._classwise.get(trial.trial_id)
                or _classwise_of(_read_lists(trial.checkpoint)))

    def _tag_flags(self, trial: Trial, source: Mapping[str, Any] | None) -> None:
        # The trial's list-valued results reach the driver through its checkpoint (lists),
        # a string one through its result: either way AutoAttack's flags become one tag.
        text = flags_text((source or {}).get(AUTOATTACK_FLAGS_KEY))
        if text:
            self._put(trial, wq.set_tag(trial.trial_id, AUTOATTACK_FLAGS_TAG, text))


def end_sweep_run(tracker: Tracker, parent_run_id: str, status: str, queue_path: str) -> int:
    """The parent run's end status (FINISHED, KILLED), queued behind whatever the driver left
    unsent; sends what the server takes and keeps the rest on disk. Never raises for an
    unreachable server. Returns how many writes are left for `caat-sweep sync`."""
    queue = wq.WriteQueue.load(tracker, queue_path)
    queue.ops.append(wq.end_parent(parent_run_id, status))
    return queue.close()


def sync_pending(tracker: Tracker, queue_path: str) -> tuple[int, int]:
    """Send the writes a driver left unsent (`caat-sweep sync`, and `resume` before it
    starts): (sent, still pending). With MLflow's own retries: nothing waits on this."""
    queue = wq.WriteQueue.load(tracker, queue_path, quick=False)
    left = queue.close()
    return queue.sent, left


def send_pending(tracker: Tracker, manifest: st.Manifest) -> None:
    """`resume`, before anything else: the writes an earlier session could not send (the
    parent's KILLED among them). ConfigError (exit 2) when some still cannot be sent."""
    path = pending_path(manifest.sweep_dir)
    if not st.exists(path):
        return
    tracker.check_reachable()
    sent, left = sync_pending(tracker, path)
    if left:
        raise ConfigError(f"tracking: {left} MLflow writes of an earlier session could not be "
                          f"sent to {tracker.tracking_uri}; try "
                          f"`{hints.for_sweep('sync', manifest)}` when it answers")
    print(f"tracking: sent the {sent} MLflow writes an earlier session had left",
          file=sys.stderr)


def pending_writes(sweep_dir: str, sweep: str) -> int:
    """How many MLflow writes of a sweep wait in its storage for `caat-sweep sync`."""
    return wq.pending_count(sweep_dir, sweep)


def _tags(entry: Mapping[str, Any]) -> dict[str, Any]:
    tags = {k: entry[k] for k in TRIAL_TAGS}
    if entry.get(TUNED_BY_TAG):
        tags[TUNED_BY_TAG] = entry[TUNED_BY_TAG]
    return tags


def trial_params(config: Mapping[str, Any], sweep_key: str) -> dict[str, Any]:
    from sweeper.spaces import resolved_params

    return resolved_params({k: v for k, v in config.items() if k != sweep_key})


def _read_lists(checkpoint) -> dict | None:
    """The list-valued results of a trial's checkpoint (its classwise.json: every list the
    trial reported, `test_autoattack_indices` and `test_autoattack_flags` included)."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/classwise.json") as f:
            data = json.loads(f.readall())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _classwise_of(lists: Mapping[str, Any] | None) -> dict | None:
    """What of those goes to MLflow's classwise.json: the contract's CLASSWISE_KEYS first,
    then every class-wise list a method reports (CFA's class bounds, DAFA's or FAAL's class
    weights) with its `_by_epoch` history; not AutoAttack's records (its image positions
    and flags, which are no class-wise figures and reach the run as a tag)."""
    if not lists:
        return None
    known = {k: lists[k] for k in CLASSWISE_KEYS if k in lists}
    return {**known, **{k: v for k, v in lists.items() if k not in AUTOATTACK_RECORDS}} or None


def error_reason(trial: Trial) -> str:
    """One line saying why a trial failed: the exception at the bottom of its traceback."""
    path = trial.error_file
    text = ""
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    else:
        err = trial.get_pickled_error()
        text = str(err) if err is not None else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # The original exception is the last "Name: message" line of the chained traceback.
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head and (head.endswith(("Error", "Exception", "Failure")) or "." in head) \
                and " " not in head:
            return one_line(line, TAG_CHARS)
    return one_line(lines[-1], TAG_CHARS) if lines else "unknown error (no error file)"
