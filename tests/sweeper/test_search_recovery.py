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
from sweep_support import (
    CLI,
    kill_session,
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


def _runs(db: Path) -> list[tuple[str, str, str | None, int]]:
    """(trial id, phase, outcome or None, metric rows) per trial run, read-only from SQLite."""
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(
                "select t.value, p.value, o.value, (select count(*) from metrics m "
                "where m.run_uuid = r.run_uuid) from runs r "
                "join tags t on t.run_uuid = r.run_uuid and t.key = 'trial_id' "
                "join tags p on p.run_uuid = r.run_uuid and p.key = 'phase' "
                "left join tags o on o.run_uuid = r.run_uuid and o.key = 'outcome'").fetchall()
    except sqlite3.Error:  # the driver is creating the schema
        return []


# Where the driver is SIGKILLed, in order, in one sweep; each kill is followed by `resume`.
KILL_POINTS = {
    "early": lambda runs: any(n for *_, n in runs),  # a trial has reported an epoch
    "tuning": lambda runs: sum(p == "tune" and o is not None for _, p, o, _ in runs) >= 3,
    "confirmation": lambda runs: any(p == "confirm" and n for _, p, _, n in runs),
}


def test_driver_killed_at_every_stage_resumes_with_default_checkpoints(
        tmp_path, private_ray_env):
    # Default keep_checkpoints (2): Ray prunes checkpoints its last saved state may still
    # name; resume falls back to an intact one (sweeper/restore.py) instead of failing.
    space = _slow_space("killed", epochs=5, n_train=3000, confirm={"seeds": [1, 2]})
    assert "keep_checkpoints" not in space
    path = write_space(tmp_path / "space.yaml", space)
    db, storage = tmp_path / "mlflow.db", tmp_path / "runs"
    args = ["--storage", str(storage), "--quiet"]
    commands = [[*CLI, "launch", str(path), *args, "--tracking-uri", f"sqlite:///{db}"]]
    commands += [[*CLI, "resume", "killed", *args]] * len(KILL_POINTS)
    finished_before: dict[str, str] = {}
    for command, (point, reached) in zip(commands, KILL_POINTS.items(), strict=False):
        log = (tmp_path / f"{point}.log").open("w")
        proc = subprocess.Popen(command, env=private_ray_env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(lambda r=reached: r(_runs(db)), 300, f"the {point} kill point", proc)
        finally:
            kill_session(proc)  # SIGKILL: no chance to clean up, like a lost head node
        assert proc.returncode == -9, f"{point}: " + (tmp_path / f"{point}.log").read_text()
        finished_before.update(_finished_runs(db))
    tracker = Tracker(f"sqlite:///{db}", "killed")
    final = subprocess.run(commands[-1], env=private_ray_env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600,
                           start_new_session=True)
    assert final.returncode == 0, final.stderr[-3000:]

    runs = tracker.trial_runs()
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)), "duplicate runs for one trial"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trials = _ray_trials(storage / "killed")
    assert set(ids) == set(trials), (f"runs without a Ray trial: {set(ids) - set(trials)}; "
                                     f"Ray trials without a run: {set(trials) - set(ids)}; "
                                     f"Ray's: {trials}")
    assert len(trials) == 2 * 3 + 2 * 2
    assert {r.data.tags["outcome"] for r in runs} <= {"completed", "pruned"}, "a failed trial"
    # Runs finished before a kill are found again by trial id: the same runs. (A trial
    # started after Ray's last saved state is unknown to it, re-run under a new id, and
    # its old run deleted, so that runs = trials.)
    by_trial = {r.data.tags["trial_id"]: r.info.run_id for r in runs}
    kept = [t for t in finished_before if t in by_trial]
    assert kept and all(by_trial[t] == finished_before[t] for t in kept)
    # The Optuna studies live in their storage through every kill: each holds exactly one
    # Optuna trial per Ray tuning trial of its cell (none lost, none duplicated, a trial
    # asked for after Ray's last save adopted by its replacement), in the state the run's
    # outcome says, and they load with plain Optuna.
    studies = study_trials(str(storage / "killed"))
    tuning = {r.data.tags["trial_id"]: r for r in runs if r.data.tags["phase"] == "tune"}
    for cell, per_trial in studies.items():
        assert sorted(per_trial) == sorted(t for t, r in tuning.items()
                                           if r.data.tags["cell"] == cell), cell
    in_studies = {t: s for per in studies.values() for t, s in per.items()}
    state_of = {"completed": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}
    assert {t: s.state.name for t, s in in_studies.items()} == {
        t: state_of[r.data.tags["outcome"]] for t, r in tuning.items()}
    assert {t for t in kept if t in in_studies}, "no tuning trial finished before a kill"
    import optuna

    url = f"sqlite:///{storage / 'killed' / 'optuna.db'}"
    assert {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(url)} == {
        cell: 3 for cell in studies}
    # Every completed run has all its epochs, once each.
    for run in runs:
        if run.data.tags["outcome"] == "completed":
            steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id,
                                                                       "train_loss")]
            assert steps == list(range(1, 6)), (run.data.tags["trial_id"], steps)
    parent = tracker.client.get_run(json.loads(
        (storage / "killed" / "sweep.json").read_text())["parent_run_id"])
    assert parent.info.status == "FINISHED"
    fallbacks = [r.data.tags["restore"] for r in runs if "restore" in r.data.tags]
    print(f"checkpoint fallbacks: {fallbacks}")  # which kills hit Ray's pruning window


def test_corrupt_checkpoints_do_not_fail_their_trials(tmp_path, private_ray_env):
    space = _slow_space("corrupt", epochs=8, n_train=6000, confirm={"seeds": []})
    path = write_space(tmp_path / "space.yaml", space)
    db, storage = tmp_path / "mlflow.db", tmp_path / "runs"
    args = ["--storage", str(storage), "--quiet"]
    proc = subprocess.Popen([*CLI, "launch", str(path), *args, "--tracking-uri",
                             f"sqlite:///{db}"], env=private_ray_env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def unfinished_with_checkpoints() -> list[Path]:
        """Trials 3-5 epochs in (of 8): long enough in Ray's saved state, far from done."""
        def epochs(trial_dir: Path) -> int:
            result = trial_dir / "result.json"
            return len(result.read_text().splitlines()) if result.is_file() else 0

        return [d for d in (storage / "corrupt").glob("*/") if 3 <= epochs(d) <= 5
                and len(list(d.glob("checkpoint_*/state.pt"))) >= 2]

    try:
        _wait(unfinished_with_checkpoints, 300, "a trial 3 epochs in", proc)
    finally:
        kill_session(proc)
    # Truncate every checkpoint of the unfinished trials: whichever one Ray's saved state
    # names is now a 0-byte file, as after a crash mid-write (the old failure: a bare
    # EOFError on every retry, and the trial lost).
    broken = unfinished_with_checkpoints()
    for trial_dir in broken:
        for state in trial_dir.glob("checkpoint_*/state.pt"):
            state.write_bytes(b"")
    resume = subprocess.run([*CLI, "resume", "corrupt", *args], env=private_ray_env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            start_new_session=True)
    assert resume.returncode == 0, resume.stderr[-3000:]
    runs = {r.data.tags["trial_id"]: r for r in Tracker(f"sqlite:///{db}", "corrupt").trial_runs()}
    assert len(runs) == 2 * 3
    assert {r.data.tags["outcome"] for r in runs.values()} <= {"completed", "pruned"}
    tagged = [runs[d.name] for d in broken
              if d.name in runs and "restore" in runs[d.name].data.tags]
    assert tagged, "no trial restored from a corrupt checkpoint"
    for run in tagged:
        assert run.data.tags["restore"].startswith("restarted from scratch (")
        assert "state.pt (0 bytes) does not load" in run.data.tags["error"]
        assert str(storage / "corrupt" / run.data.tags["trial_id"]) in run.data.tags["error"]


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


def test_sweep_survives_losing_a_worker_node_mid_trial(tmp_path, private_ray_env):
    space = _slow_space("nodes", epochs=6, n_train=20000, max_failures=2,
                        asha={"enabled": False}, confirm={"seeds": []}, methods=["erm"])
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
