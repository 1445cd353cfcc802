"""Sweeps survive their driver being killed (SIGKILL, then `caat-sweep resume`) and a Ray
worker node disappearing mid-trial. Each test runs the driver as a subprocess with its own
Ray (private RAY_TMPDIR) and leaves no process behind."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_support import (  # noqa: F401
    CLI,
    kill_session,
    private_ray_env,
    session_pids,
    tiny_space,
    write_space,
)

from sweeper.search import study_trials
from sweeper.tracking import Tracker

pytestmark = pytest.mark.slow


def _slow_space(name: str, epochs: int, n_train: int, **top) -> dict:
    """Trials of a few seconds each, so a kill lands mid-sweep."""
    space = tiny_space(name=name, trials_per_cell=3, **top)
    space["base"]["dataset"]["n_train"] = n_train
    space["base"]["optim"]["epochs"] = epochs
    return space


def _finished_runs(db: Path) -> dict[str, str]:
    """trial id -> run id of runs with an outcome, read straight from the SQLite store."""
    if not db.is_file():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute(
                "select t.value, r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
                "and t.key = 'trial_id' join tags o on o.run_uuid = r.run_uuid "
                "and o.key = 'outcome'").fetchall()
    except sqlite3.Error:  # the driver is creating the schema
        return {}
    return dict(rows)


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def _ray_trials(sweep_dir: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(str(sweep_dir)).trials}


def test_sigkilled_driver_resumes_without_duplicate_or_running_runs(
        tmp_path, private_ray_env):  # noqa: F811
    # Every checkpoint kept: with a cap, a kill between Ray's deletion of the checkpoint its
    # saved state names and its next upload strands that trial (README, "Resume").
    space = _slow_space("killed", epochs=4, n_train=3000, keep_checkpoints=None)
    path = write_space(tmp_path / "space.yaml", space)
    db, storage = tmp_path / "mlflow.db", tmp_path / "runs"
    args = ["--storage", str(storage)]
    env = private_ray_env
    log = (tmp_path / "launch.log").open("w")
    proc = subprocess.Popen([*CLI, "launch", str(path), *args, "--tracking-uri",
                             f"sqlite:///{db}", "--quiet"], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    def two_finished() -> dict[str, str] | None:
        runs = _finished_runs(db)
        return runs if len(runs) >= 2 else None

    try:
        before = _wait(two_finished, 300, "finished trials", proc)
    finally:
        kill_session(proc)  # SIGKILL: no chance to clean up, like a lost head node
    assert proc.returncode == -9
    tracker = Tracker(f"sqlite:///{db}", "killed")
    assert len(tracker.trial_runs()) < 2 * 3 + 2  # it really was stopped mid-sweep

    resume = subprocess.run([*CLI, "resume", "killed", *args, "--quiet"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    assert resume.returncode == 0, resume.stderr[-3000:]

    runs = tracker.trial_runs()
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), "duplicate runs for one trial"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = _ray_trials(storage / "killed")
    assert sorted(ids) == sorted(trials) and len(trials) == 2 * 3 + 2
    assert {r.data.tags["outcome"] for r in runs} <= {"completed", "pruned"}
    # Runs finished before the kill are found again by trial id: the same runs. (A trial
    # started after Ray's last saved state is unknown to it, re-run under a new id, and
    # its old run deleted, so that runs = trials.)
    by_trial = {r.data.tags["trial_id"]: r.info.run_id for r in runs}
    kept = [t for t in before if t in by_trial]
    assert kept and all(by_trial[t] == before[t] for t in kept)
    # The Optuna studies were restored, not rebuilt: they hold the trials from before the
    # kill, each finished once, and no more trials than the space asks for.
    studies = study_trials(str(storage / "killed"))
    assert all(len(per_trial) == 3 for per_trial in studies.values())
    in_studies = {t: s for per in studies.values() for t, s in per.items()}
    assert {t for t in kept if t in in_studies}, "no tuning trial finished before the kill"
    assert all(s.state.name in ("COMPLETE", "PRUNED") for s in in_studies.values())
    parent = tracker.client.get_run(json.loads(
        (storage / "killed" / "sweep.json").read_text())["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert not session_pids(proc.pid)


CLUSTER_SCRIPT = r'''
import json, subprocess, sys, time
from pathlib import Path
from ray.cluster_utils import Cluster

space, storage, db, out = sys.argv[1:5]
cli = [sys.executable, "-m", "sweeper.cli"]
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "object_store_memory": 100 * 2**20})
worker = cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
cluster.wait_for_nodes()
raylet = worker.all_processes["raylet"][0].process.pid
driver = subprocess.Popen([*cli, "launch", space, "--address", cluster.address, "--storage",
                           storage, "--tracking-uri", f"sqlite:///{db}", "--quiet"],
                          stdout=open(Path(out).with_suffix(".log"), "w"),
                          stderr=subprocess.STDOUT)

def ppid(pid):
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None

def trial_on_worker():
    """A trial that has reported an epoch from a process of the worker node."""
    for result in Path(storage).glob("*/*/result.json"):
        lines = result.read_text().splitlines()
        if lines and ppid(json.loads(lines[-1])["pid"]) == raylet:
            return result.parent.name, json.loads(lines[-1])["epoch"]
    return None

found, deadline = None, time.monotonic() + 300
while found is None and time.monotonic() < deadline and driver.poll() is None:
    found = trial_on_worker()
    time.sleep(0.1)
if found is not None:
    cluster.remove_node(worker)  # kills its raylet and the trial running there
rc = driver.wait(timeout=900)
Path(out).write_text(json.dumps({"rc": rc, "removed": found}))
cluster.shutdown()
'''


def test_sweep_survives_losing_a_worker_node_mid_trial(tmp_path, private_ray_env):  # noqa: F811
    space = _slow_space("nodes", epochs=6, n_train=20000, max_failures=2,
                        asha={"enabled": False}, confirm={"seeds": []})
    space["methods"] = ["erm"]
    del space["search"]["trades"]
    path = write_space(tmp_path / "space.yaml", space)
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    out, db, storage = tmp_path / "out.json", tmp_path / "mlflow.db", tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(storage), str(db),
                             str(out)], env=private_ray_env, cwd=tmp_path,
                            start_new_session=True)
    try:
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None or session_pids(proc.pid):
            kill_session(proc)
    result = json.loads(out.read_text())
    log = out.with_suffix(".log").read_text()
    assert result["removed"] is not None, "no trial ran on the worker node:\n" + log[-3000:]
    assert result["rc"] == 0, log[-3000:]
    removed_trial, epoch_then = result["removed"]
    assert epoch_then < 6  # removed mid-trial

    runs = {r.data.tags["trial_id"]: r for r in Tracker(f"sqlite:///{db}", "nodes").trial_runs()}
    assert len(runs) == 3
    assert {r.data.tags["outcome"] for r in runs.values()} == {"completed"}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert int(runs[removed_trial].data.tags["retries"]) >= 1
