"""The tracking write queue: writes a tracking server does not take are queued, not raised,
and the Tune loop does not wait on a dead server; a replay logs each epoch once and creates
each run once; what is left goes to disk, comes back unchanged and `sync` sends it."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import yaml
from mlflow.exceptions import MlflowException
from sweep_support import tiny_space

from sweeper import _write_queue as wq
from sweeper.search import SWEEP_KEY
from sweeper.tracking import (
    Tracker,
    TrackingCallback,
    end_sweep_run,
    pending_path,
    pending_writes,
    sync_pending,
)
from trainables.errors import ConfigError


class Server:
    """Whether the fake tracking server answers, and what it was asked."""

    def __init__(self):
        self.down = False
        self.lose_next_answer = False  # the next write lands, but its answer is lost
        self.calls = 0


class FlakyClient:
    """An MlflowClient in front of a real SQLite store that fails like an unreachable
    server (MLflow raises MlflowException for a refused connection or a timeout)."""

    def __init__(self, client, server: Server):
        self._client, self._server = client, server

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self._server.calls += 1
            if self._server.down:
                raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow "
                                      "failed with exception ConnectionError: refused")
            out = attr(*args, **kwargs)
            if self._server.lose_next_answer:
                self._server.lose_next_answer = False
                raise MlflowException("API request failed with timeout exception Read "
                                      "timed out")
            return out

        return call


class FlakyTracker(Tracker):
    def __init__(self, uri: str, sweep: str, server: Server):
        super().__init__(uri, sweep)
        self.server = server

    @property
    def client(self):
        return FlakyClient(super().client, self.server)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _trial(trial_id: str) -> SimpleNamespace:
    config = {"dataset": {"name": "gmm", "shape": [1, 1, 8], "num_classes": 3},
              "method": {"name": "erm"},
              SWEEP_KEY: {"cell": "s/erm", "scenario": "s", "method": "erm", "seed": 0,
                     "phase": "tune", "epochs": 3}}
    return SimpleNamespace(trial_id=trial_id, config=config, checkpoint=None,
                           last_result={"epoch": 0}, num_failures=0, status="RUNNING")


@pytest.fixture
def sweep(tmp_path):
    """A parent run in a SQLite store, a flaky view of it, and a callback writing through
    that view with a fake clock; the sweep's storage in tmp_path/runs/t."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, "t").start_parent("val_robust_acc", "max", "name: t\n")
    server, clock = Server(), Clock()
    path = pending_path(str(tmp_path / "runs" / "t"))
    callback = TrackingCallback(uri, "t", parent, SWEEP_KEY, queue_path=path)
    callback._tracker = FlakyTracker(uri, "t", server)
    callback._queue = wq.WriteQueue(callback._tracker, path, clock=clock)
    return SimpleNamespace(uri=uri, parent=parent, server=server, clock=clock, path=path,
                           callback=callback, dir=str(tmp_path / "runs" / "t"))


def _epochs(cb: TrackingCallback, trial, epochs) -> None:
    for epoch in epochs:
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "train_loss": 1.0 / epoch,
                                          "timestamp": 1.7e9 + epoch})
        trial.last_result = {"epoch": epoch}


def _runs(uri: str) -> dict[str, object]:
    runs = Tracker(uri, "t").trial_runs()
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), f"duplicate runs: {ids}"
    return {r.data.tags["trial_id"]: r for r in runs}


def _steps(uri: str, run) -> list[int]:
    history = Tracker(uri, "t").client.get_metric_history(run.info.run_id, "train_loss")
    return sorted(m.step for m in history)


def test_writes_queue_while_the_server_is_down_then_each_is_logged_once(sweep):
    cb, server, clock = sweep.callback, sweep.server, sweep.clock
    a, b = _trial("a"), _trial("b")
    cb.on_trial_start(0, [], a)
    _epochs(cb, a, [1])
    server.down = True
    _epochs(cb, a, [2])  # fails: the server is marked down, nothing raised
    assert cb.queue.down and len(cb.queue.ops) == 1
    calls = server.calls
    # While it is down, nothing waits on it: writes only queue (a run created meanwhile too).
    _epochs(cb, a, [3])
    cb.on_trial_complete(0, [], a)
    cb.on_trial_start(0, [], b)
    _epochs(cb, b, [1, 2])
    cb.on_trial_recover(0, [], b)
    _epochs(cb, b, [1, 2, 3])  # re-run after a restore: queued once
    assert server.calls == calls and len(cb.queue.ops) == 9

    server.down = False
    clock.now += wq.BACKOFF_FIRST_S
    b.last_result = {"epoch": 3}
    cb.on_trial_complete(0, [], b)  # the server answers again: the whole queue goes
    assert not cb.queue.ops and not cb.queue.down

    runs = _runs(sweep.uri)
    assert set(runs) == {"a", "b"}
    assert all(r.info.status == "FINISHED" and r.data.tags["outcome"] == "completed"
               for r in runs.values())
    assert _steps(sweep.uri, runs["a"]) == _steps(sweep.uri, runs["b"]) == [1, 2, 3]
    assert runs["b"].data.tags["retries"] == "0"
    assert runs["b"].data.params["dataset.name"] == "gmm"


def test_a_write_whose_answer_was_lost_is_not_duplicated(sweep):
    cb, server, clock = sweep.callback, sweep.server, sweep.clock
    a = _trial("a")
    server.lose_next_answer = True  # the run is created, the driver does not hear it
    cb.on_trial_start(0, [], a)
    assert cb.queue.down
    clock.now += wq.BACKOFF_FIRST_S
    _epochs(cb, a, [1])
    server.lose_next_answer = True  # epoch 2 is logged, the driver does not hear it
    _epochs(cb, a, [2])
    clock.now += 2 * wq.BACKOFF_FIRST_S
    _epochs(cb, a, [3])
    cb.on_trial_complete(0, [], a)
    runs = _runs(sweep.uri)
    assert len(runs) == 1 and runs["a"].info.status == "FINISHED"
    assert runs["a"].data.params["dataset.name"] == "gmm"
    assert _steps(sweep.uri, runs["a"]) == [1, 2, 3]


def test_back_off_grows_and_a_new_attempt_waits_for_it(sweep):
    queue, server, clock = sweep.callback.queue, sweep.server, sweep.clock
    server.down = True
    waits = []
    for _ in range(6):
        queue.put(wq.set_tag("a", "k", "v"))
        calls = server.calls
        queue.put(wq.set_tag("a", "k", "v"))  # within the back-off: no request
        assert server.calls == calls
        waits.append(queue._down_until - clock.now)
        clock.now = queue._down_until
    assert waits == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_a_backlog_goes_out_in_slices_not_in_one_stall(sweep):
    cb, server, clock = sweep.callback, sweep.server, sweep.clock
    a = _trial("a")
    cb.on_trial_start(0, [], a)
    server.down = True
    _epochs(cb, a, range(1, 21))
    server.down = False
    clock.now = cb.queue._down_until
    real = cb.queue._apply

    def one_second_each(op):  # a slow server: every write takes a second
        clock.now += 1.0
        real(op)

    cb.queue._apply = one_second_each
    cb.on_trial_recover(0, [], a)
    assert len(cb.queue.ops) == 21 - wq.SLICE_S and not cb.queue.down
    cb.on_experiment_end([a])  # the end sends everything
    assert not cb.queue.ops
    assert _steps(sweep.uri, _runs(sweep.uri)["a"]) == list(range(1, 21))


def test_what_is_left_goes_to_disk_and_sync_sends_it(sweep):
    cb, server = sweep.callback, sweep.server
    a = _trial("a")
    cb.on_trial_start(0, [], a)
    server.down = True
    _epochs(cb, a, [1, 2, 3])
    cb.on_trial_complete(0, [], a)
    cb.on_experiment_end([a])
    left = end_sweep_run(cb.tracker, sweep.parent, "FINISHED", sweep.path)  # the driver's end
    assert left == len(cb.queue.ops) + 1 == 6
    assert pending_writes(sweep.dir, "t") == 6

    saved = wq.PendingWrites.from_disk(sweep.path, "t")
    assert [o.kind for o in saved.ops] == ["metrics"] * 3 + ["finish", "reconcile",
                                                             "end_parent"]
    assert saved.ops[:5] == list(cb.queue.ops)  # the round trip keeps every field
    with pytest.raises(ConfigError, match="of sweep 't', not 'other'"):
        wq.PendingWrites.from_disk(sweep.path, "other")

    assert Tracker(sweep.uri, "t").client.get_run(sweep.parent).info.status == "RUNNING"
    # A new process (`caat-sweep sync`) with the server back.
    assert sync_pending(Tracker(sweep.uri, "t"), sweep.path) == (6, 0)
    assert pending_writes(sweep.dir, "t") == 0
    runs = _runs(sweep.uri)
    assert runs["a"].info.status == "FINISHED" and _steps(sweep.uri, runs["a"]) == [1, 2, 3]
    assert Tracker(sweep.uri, "t").client.get_run(sweep.parent).info.status == "FINISHED"
    assert sync_pending(Tracker(sweep.uri, "t"), sweep.path) == (0, 0)


def test_resume_sends_what_an_earlier_session_left_first(sweep, tmp_path, capsys):
    from sweeper import storage as st
    from sweeper.cli import main

    space = yaml.safe_dump(tiny_space(name="t"))
    st.Manifest(name="t", storage=str(tmp_path / "runs"), tracking_uri=sweep.uri,
                space_text=space, space_source="space.yaml", parent_run_id=sweep.parent,
                state="done").save()
    cb, a = sweep.callback, _trial("a")
    sweep.server.down = True
    cb.on_trial_start(0, [], a)
    _epochs(cb, a, [1, 2, 3])
    cb.on_trial_complete(0, [], a)
    cb.on_experiment_end([a])
    assert end_sweep_run(cb.tracker, sweep.parent, "FINISHED", sweep.path) == 8
    assert main(["status", "t", "--storage", str(tmp_path / "runs")]) == 0
    assert "8 MLflow writes" in capsys.readouterr().out

    assert main(["resume", "t", "--storage", str(tmp_path / "runs")]) == 0
    assert "sent the 8 MLflow writes" in capsys.readouterr().err
    assert pending_writes(sweep.dir, "t") == 0
    runs = _runs(sweep.uri)
    assert runs["a"].info.status == "FINISHED" and _steps(sweep.uri, runs["a"]) == [1, 2, 3]
    assert Tracker(sweep.uri, "t").client.get_run(sweep.parent).info.status == "FINISHED"


def test_a_restored_driver_keeps_the_queue_file_and_finds_runs_by_trial_id(sweep):
    cb = sweep.callback
    restored = pickle.loads(pickle.dumps(cb))
    assert restored.queue_path == sweep.path and restored._queue is None
    a = _trial("a")
    cb.on_trial_start(0, [], a)
    _epochs(cb, a, [1, 2])
    _epochs(restored, a, [2, 3])  # the restored driver re-runs epoch 2
    assert _steps(sweep.uri, _runs(sweep.uri)["a"]) == [1, 2, 3]


def test_a_refused_write_is_dropped_not_retried_forever(sweep, caplog):
    queue = sweep.callback.queue
    queue.put(wq.set_tag("nobody", "k", "v"))  # no run of that trial
    queue.put(wq.end_parent(sweep.parent, "FINISHED"))
    assert not queue.ops and not queue.down and queue.dropped == 1
    assert "refused tag nobody" in caplog.text
    assert Tracker(sweep.uri, "t").client.get_run(sweep.parent).info.status == "FINISHED"


def test_quick_requests_set_mlflow_http_variables_only_meanwhile(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    import os

    with wq.quick_requests("http://127.0.0.1:5000"):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(wq.REQUEST_TIMEOUT_S)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
