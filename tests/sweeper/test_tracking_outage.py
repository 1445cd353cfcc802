"""A tracking server that goes away mid-sweep costs nothing: the driver (a subprocess with
its own Ray) keeps the sweep running against a real `mlflow server` that is stopped, and
either restarted mid-sweep (the queue is sent then) or only after the driver has ended
(the queue waits on disk for `caat-sweep sync`). Either way every trial ends with exactly
one run, in its final state, with every epoch it reached."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_support import (
    CLI,
    free_port,
    kill_session,
    session_pids,
    tiny_space,
    wait_http,
    write_space,
)

from sweeper._write_queue import QUEUE_FILE
from sweeper.tracking import Tracker

pytestmark = pytest.mark.slow


def _space(name: str, epochs: int, n_train: int) -> dict:
    """Trials of several seconds (TRADES epochs of 1-3 s on one core), so that an outage
    lands in the middle of the sweep."""
    space = tiny_space(name=name, trials_per_cell=3)
    space["base"]["dataset"]["n_train"] = n_train
    space["base"]["optim"]["epochs"] = epochs
    return space


class MlflowServer:
    """`mlflow server` on a SQLite file, stopped (SIGKILL) and started again on one port."""

    def __init__(self, tmp_path: Path):
        self.dir, self.port = tmp_path, free_port()
        self.db = tmp_path / "server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
             f"sqlite:///{self.db}", "--artifacts-destination", str(self.dir / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.dir, stdout=subprocess.DEVNULL,
            stderr=(self.dir / "server.log").open("a"), start_new_session=True)
        wait_http(f"{self.uri}/health", timeout=120)

    def stop(self) -> None:
        if self.proc is not None:
            kill_session(self.proc)
            self.proc = None

    def epochs_logged(self) -> int:
        """train_loss values in the store, read straight from its SQLite file."""
        if not self.db.is_file():
            return 0
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as con:
                return con.execute("select count(*) from metrics where key = 'train_loss'"
                                   ).fetchone()[0]
        except sqlite3.Error:
            return 0


def _epochs_reported(sweep_dir: Path) -> int:
    """Epochs the trials have reported to Ray (its result.json files in storage)."""
    return sum(len(p.read_text().splitlines()) for p in sweep_dir.glob("*/result.json"))


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def _launch(tmp_path: Path, space: dict, server: MlflowServer, env: dict) -> subprocess.Popen:
    path = write_space(tmp_path / "space.yaml", space)
    log = (tmp_path / "driver.log").open("w")
    return subprocess.Popen([*CLI, "launch", str(path), "--storage", str(tmp_path / "runs"),
                             "--tracking-uri", server.uri, "--quiet"], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _check_every_trial_logged_once(uri: str, sweep_dir: Path) -> None:
    """One run per Ray trial, in its final state, with every epoch it reached; parent
    FINISHED."""
    from ray.tune import ExperimentAnalysis

    trials = {t.trial_id: t for t in ExperimentAnalysis(str(sweep_dir)).trials}
    tracker = Tracker(uri, sweep_dir.name)
    runs = tracker.trial_runs()
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), f"duplicate runs: {sorted(ids)}"
    assert set(ids) == set(trials) and len(trials) == 2 * 3 + 2
    for run in runs:
        trial = trials[run.data.tags["trial_id"]]
        assert trial.status == "TERMINATED"
        assert run.info.status == "FINISHED", (trial.trial_id, run.info.status)
        assert run.data.tags["outcome"] in ("completed", "pruned")
        history = tracker.client.get_metric_history(run.info.run_id, "train_loss")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, trial.last_result["epoch"] + 1)), (trial.trial_id, steps)
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert manifest["state"] == "done"
    assert tracker.client.get_run(manifest["parent_run_id"]).info.status == "FINISHED"


@contextlib.contextmanager
def _outage(tmp_path: Path, space: dict, env: dict):
    """A sweep launched against a live tracking server, which is stopped once the first
    epoch is logged: yields (server, driver, sweep dir) with the server down; the driver's
    processes are gone afterwards."""
    server = MlflowServer(tmp_path)
    server.start()
    driver = _launch(tmp_path, space, server, env)
    try:
        _wait(lambda: server.epochs_logged() >= 1, 300, "epoch logged", driver)
        server.stop()
        yield server, driver, tmp_path / "runs" / space["name"]
    finally:
        if driver.poll() is None or session_pids(driver.pid):
            kill_session(driver)


def test_a_server_restarted_mid_sweep_gets_every_queued_write_once(tmp_path,
                                                                   private_ray_env):
    # `mlflow server` takes 10-40 s to start again: the sweep must outlast that.
    space = _space("blip", epochs=6, n_train=20000)
    with _outage(tmp_path, space, private_ray_env) as (server, driver, sweep_dir):
        reported = _epochs_reported(sweep_dir)
        # The sweep goes on without the server: trials report epochs meanwhile.
        _wait(lambda: _epochs_reported(sweep_dir) >= reported + 2, 120,
              "epochs during the outage", driver)
        server.start()
        assert driver.poll() is None, "the sweep ended before the server came back"
        driver.wait(timeout=300)
    log = (tmp_path / "driver.log").read_text()
    try:
        assert driver.returncode == 0, log[-3000:]
        assert "did not answer" in log and "answers again" in log, log[-3000:]
        assert "caat-sweep sync" not in log
        assert not (sweep_dir / QUEUE_FILE).exists()
        _check_every_trial_logged_once(server.uri, sweep_dir)
    finally:
        server.stop()


def test_a_server_down_until_the_end_is_caught_up_by_sync(tmp_path,
                                                          private_ray_env):
    space = _space("outage", epochs=4, n_train=10000)
    with _outage(tmp_path, space, private_ray_env) as (server, driver, sweep_dir):
        driver.wait(timeout=300)
    log = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, log[-3000:]
    awaiting = [ln for ln in log.splitlines() if "await `caat-sweep sync outage`" in ln]
    assert len(awaiting) == 1, log[-3000:]
    queued = json.loads((sweep_dir / QUEUE_FILE).read_text())["ops"]
    assert f"{len(queued)} MLflow writes" in awaiting[0]
    assert [o["kind"] for o in queued[-2:]] == ["reconcile", "end_parent"]

    storage = ["--storage", str(tmp_path / "runs")]
    try:
        server.start()
        status = subprocess.run([*CLI, "status", "outage", *storage], capture_output=True,
                                text=True, timeout=120, cwd=tmp_path)
        assert status.returncode == 0, status.stderr[-2000:]
        assert f"{len(queued)} MLflow writes" in status.stdout
        sync = subprocess.run([*CLI, "sync", "outage", *storage], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert f"{len(queued)} MLflow writes sent; nothing pending" in sync.stderr
        assert not (sweep_dir / QUEUE_FILE).exists()
        _check_every_trial_logged_once(server.uri, sweep_dir)
    finally:
        server.stop()
