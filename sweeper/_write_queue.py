"""The driver's MLflow writes as a queue of idempotent operations (`sweeper.tracking` is the
public side): a tracking server that goes away mid-sweep costs the sweep nothing.

Every write is an `Op` naming its trial by trial id, never by run id (while the server is
down the run may not exist yet), and replaying an op that already took effect changes
nothing: a trial's run is found by its `trial_id` tag before one is created, an epoch at or
below the run's last logged step is skipped, tags, statuses and artifacts overwrite. So a
write whose answer was lost (it may have landed) is simply sent again.

`WriteQueue` sends ops in order. The first that fails for want of a server marks it down for
a back-off (5 s, doubling up to 60 s); until then new ops only queue, so the Tune loop waits
for at most one short request (5 s timeout, no client retries) per back-off instead of
MLflow's default minutes of retries. Once the server answers again, the backlog goes out in
slices of 1 s per Tune event, so catching up does not stall the loop either. What is still
queued is kept in the sweep's storage (`tracking_queue.json`): on each failed attempt, every
10 s while ops queue, and when the driver ends. `caat-sweep sync NAME` and `caat-sweep
resume NAME` send it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sweeper import storage as st
from trainables.errors import ConfigError, one_line

if TYPE_CHECKING:
    from sweeper.tracking import Tracker

logger = logging.getLogger("sweeper.tracking")

QUEUE_FILE = "tracking_queue.json"
FORMAT, VERSION = "caat-sweep tracking queue", 1
REQUEST_TIMEOUT_S = 5
BACKOFF_FIRST_S, BACKOFF_MAX_S = 5.0, 60.0
SAVE_EVERY_S = 10.0
# A backlog goes out in slices of this many seconds per Tune event, not in one long stall.
SLICE_S = 1.0


def pending_path(sweep_dir: str) -> str:
    return st.join(sweep_dir, QUEUE_FILE)


# ---------------------------------------------------------------------------- operations


@dataclass
class Op:
    """One MLflow write. `trial` is the Ray trial id (None for sweep-level writes); `args`
    hold only JSON values, so a queue goes to disk and back unchanged."""

    kind: str
    trial: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind} {self.trial}" if self.trial else self.kind


def ensure_run(trial: str, parent: str, tags: Mapping[str, Any],
               params: Mapping[str, Any]) -> Op:
    return Op("ensure_run", trial, {"parent": parent,
                                    "tags": {k: str(v) for k, v in tags.items()},
                                    "params": {k: str(v) for k, v in params.items()}})


def log_epoch(trial: str, step: int, metrics: Mapping[str, float], timestamp_ms: int) -> Op:
    # The timestamp is fixed now, not when sent: a replayed batch is then identical.
    return Op("metrics", trial, {"step": step, "ts": timestamp_ms, "metrics": dict(metrics)})


def set_status(trial: str, status: str) -> Op:
    return Op("status", trial, {"status": status})


def set_tag(trial: str, key: str, value: str) -> Op:
    return Op("tag", trial, {"key": key, "value": value})


def finish(trial: str, outcome: str, error: str | None, classwise: Mapping | None) -> Op:
    return Op("finish", trial, {"outcome": outcome, "error": error,
                                "classwise": dict(classwise) if classwise else None})


def reconcile(known: Mapping[str, str]) -> Op:
    return Op("reconcile", None, {"known": dict(known)})


def end_parent(run_id: str, status: str) -> Op:
    return Op("end_parent", None, {"run_id": run_id, "status": status})


class MissingRun(LookupError):
    """An op for a trial whose run is not in MLflow (its creation was refused)."""


def is_permanent(err: BaseException) -> bool:
    """A write the store refused (bad request, missing run): sending it again cannot help.
    Everything else (refused connection, timeout, 5xx, 401/403, 429) waits for the server."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MissingRun):
        return True
    return isinstance(err, MlflowException) and err.get_http_status_code() in (400, 404)


@contextlib.contextmanager
def quick_requests(tracking_uri: str) -> Iterator[None]:
    """MLflow's HTTP client, for these writes only: one attempt, a short timeout. MLflow
    reads these variables on every request; its defaults retry a dead server for minutes."""
    if not tracking_uri.startswith(("http://", "https://")):
        yield
        return
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S)}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------- on disk


@dataclass
class PendingWrites:
    """What a driver could not log: `tracking_queue.json` in the sweep's storage."""

    sweep: str
    tracking_uri: str
    ops: list[Op]

    def to_disk(self, path: str) -> None:
        data = {"format": FORMAT, "version": VERSION, "sweep": self.sweep,
                "tracking_uri": self.tracking_uri,
                "ops": [{"kind": o.kind, "trial": o.trial, "args": o.args} for o in self.ops]}
        st.write_bytes(path, json.dumps(data).encode())

    @classmethod
    def from_disk(cls, path: str, sweep: str) -> PendingWrites:
        """The queue at `path`; refuses a file of another format, version or sweep."""
        try:
            data = json.loads(st.read_bytes(path))
        except ValueError as err:
            raise ConfigError(f"{path}: not a tracking queue ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{path}: not a tracking queue")
        if data.get("version") != VERSION:
            raise ConfigError(f"{path}: tracking queue version {data.get('version')!r}; this "
                              f"caat-sweep reads version {VERSION}")
        if data.get("sweep") != sweep:
            raise ConfigError(f"{path}: tracking queue of sweep {data.get('sweep')!r}, "
                              f"not {sweep!r}")
        ops = [Op(o["kind"], o.get("trial"), o.get("args") or {}) for o in data["ops"]]
        return cls(data["sweep"], data.get("tracking_uri", ""), ops)


def pending_count(sweep_dir: str, sweep: str) -> int:
    path = pending_path(sweep_dir)
    return len(PendingWrites.from_disk(path, sweep).ops) if st.exists(path) else 0


# -------------------------------------------------------------------------- the queue


class WriteQueue:
    """Sends ops to MLflow in order; queues them while the server is down (see the module
    docstring). Driver side only, one per driver session."""

    def __init__(self, tracker: Tracker, path: str | None = None, *, quick: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        self.tracker = tracker
        self.path = path
        self.quick = quick  # short requests (a driver); MLflow's own retries (sync)
        self.ops: deque[Op] = deque()
        self._clock = clock
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._steps: dict[str, int] = {}  # run id -> last step known to be logged
        self._down_until: float | None = None  # None: the server answered last time
        self._backoff = 0.0
        self._saved_at = -math.inf
        self._on_disk = False
        self.sent = 0
        self.dropped = 0

    @classmethod
    def load(cls, tracker: Tracker, path: str, **kw) -> WriteQueue:
        """A queue holding what an earlier driver left in `path`."""
        queue = cls(tracker, path, **kw)
        if st.exists(path):
            queue.ops.extend(PendingWrites.from_disk(path, tracker.sweep).ops)
            queue._on_disk = True
        return queue

    @property
    def down(self) -> bool:
        return self._down_until is not None

    def put(self, op: Op) -> None:
        """Queue `op` and send the queue, unless the server is in its back-off."""
        self.ops.append(op)
        if self.down and self._clock() < self._down_until:
            self._save(throttled=True)
        else:
            self.flush(budget_s=SLICE_S)

    def flush(self, budget_s: float | None = None) -> bool:
        """Send queued ops in order, for at most `budget_s` seconds (None: all of them).
        False when the server did not answer (it is marked down and the rest stays
        queued); refused ops are dropped with a warning."""
        deadline = math.inf if budget_s is None else self._clock() + budget_s
        with (quick_requests(self.tracker.tracking_uri) if self.quick
              else contextlib.nullcontext()):
            while self.ops:
                if self._clock() >= deadline:
                    self._save(throttled=True)
                    return True  # the rest goes with the next events
                op = self.ops[0]
                try:
                    self._apply(op)
                    self.sent += 1
                except Exception as err:
                    if not is_permanent(err):
                        self._mark_down(err)
                        return False
                    self.dropped += 1
                    logger.warning("tracking: MLflow refused %s, dropped (%s)", op.describe(),
                                   one_line(err))
                self.ops.popleft()
                self._mark_up()
        if self._on_disk:
            self._save()  # all sent: the file goes
        return True

    def close(self) -> int:
        """End of a driver session: one more try whatever the back-off, then what is left
        goes to disk. Returns how many ops are left."""
        self.flush()
        self._save()
        return len(self.ops)

    # -- server state

    def _mark_down(self, err: BaseException) -> None:
        if not self.down:
            logger.warning("tracking: MLflow at %s did not answer (%s); queuing its writes "
                           "and trying again every %.0f-%.0f s", self.tracker.tracking_uri,
                           _cause(err), BACKOFF_FIRST_S, BACKOFF_MAX_S)
        self._backoff = min(max(2 * self._backoff, BACKOFF_FIRST_S), BACKOFF_MAX_S)
        self._down_until = self._clock() + self._backoff
        # A write that timed out may still have landed: ask the server before logging again.
        self._steps.clear()
        self._save()

    def _mark_up(self) -> None:
        if self.down:
            logger.warning("tracking: MLflow at %s answers again; sending the %d queued "
                           "writes", self.tracker.tracking_uri, len(self.ops))
            self._down_until, self._backoff = None, 0.0

    def _save(self, throttled: bool = False) -> None:
        """Keep the queue in storage (or remove the file once it is empty)."""
        now = self._clock()
        if self.path is None or (throttled and now - self._saved_at < SAVE_EVERY_S):
            return
        try:
            if self.ops:
                PendingWrites(self.tracker.sweep, self.tracker.tracking_uri,
                              list(self.ops)).to_disk(self.path)
                self._on_disk = True
            elif self._on_disk:
                st.remove(self.path)
                self._on_disk = False
        except (OSError, ConfigError) as err:
            logger.warning("tracking: cannot write %s (%s)", self.path, one_line(err))
        self._saved_at = now

    # -- applying one op

    def _apply(self, op: Op) -> None:
        apply = {"ensure_run": self._ensure_run, "metrics": self._metrics,
                 "status": self._status, "tag": self._tag, "finish": self._finish,
                 "reconcile": self._reconcile, "end_parent": self._end_parent}.get(op.kind)
        if apply is None:
            raise MissingRun(f"unknown operation {op.kind!r}")
        apply(op)

    def _run_id(self, trial: str) -> str:
        if trial not in self._runs:
            found = self.tracker.find_trial_run(trial)
            if found is None:
                raise MissingRun(f"no run of trial {trial}")
            self._runs[trial] = found.info.run_id
        return self._runs[trial]

    def _ensure_run(self, op: Op) -> None:
        if op.trial in self._runs:
            return
        found = self.tracker.find_trial_run(op.trial)
        if found is None:
            run_id = self.tracker.create_trial_run(op.args["parent"], op.trial,
                                                   op.args["tags"], op.args["params"])
            self._steps[run_id] = 0
        else:
            run_id = found.info.run_id
            if not found.data.params:  # created, then the writer stopped before the params
                self.tracker.log_params(run_id, op.args["params"])
        self._runs[op.trial] = run_id

    def _metrics(self, op: Op) -> None:
        run_id = self._run_id(op.trial)
        if run_id not in self._steps:
            self._steps[run_id] = self.tracker.last_step(run_id)
        step = op.args["step"]
        if step <= self._steps[run_id]:
            return  # logged already (an epoch re-run after a restore, or a replay)
        self.tracker.log_metrics(run_id, op.args["metrics"], step, op.args["ts"])
        self._steps[run_id] = step

    def _status(self, op: Op) -> None:
        self.tracker.client.update_run(self._run_id(op.trial), status=op.args["status"])

    def _tag(self, op: Op) -> None:
        self.tracker.client.set_tag(self._run_id(op.trial), op.args["key"], op.args["value"])

    def _finish(self, op: Op) -> None:
        self.tracker.finish_trial(self._run_id(op.trial), op.args["outcome"],
                                  error=op.args.get("error"), classwise=op.args.get("classwise"))

    def _reconcile(self, op: Op) -> None:
        known = op.args["known"]
        self.tracker.reconcile(known)
        self._runs = {t: r for t, r in self._runs.items() if t in known}

    def _end_parent(self, op: Op) -> None:
        self.tracker.end_parent(op.args["run_id"], op.args["status"])


def _cause(err: BaseException) -> str:
    """The telling part of MLflow's long connection errors: what urllib3 says caused it."""
    text = one_line(err, 2000)
    return text[text.find("Caused by"):][:200] if "Caused by" in text else text[:200]
