"""MLflow tracking: trial metrics only, runs found again by trial id, orphan and RUNNING runs
cleaned up, a sweep against a real `mlflow server`, and the UI bound to 127.0.0.1."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sweep_support import (
    CLI,
    free_port,
    kill_session,
    tiny_space,
    wait_http,
    write_space,
)

from sweeper.cli import main
from sweeper.contract import resolve_tracking_uri
from sweeper.search import SWEEP_KEY
from sweeper.tracking import Tracker, TrackingCallback, metrics_of, trial_outcome


def test_only_trial_metrics_are_logged():
    result = {"epoch": 2, "train_loss": 0.5, "val_robust_acc": 0.4, "frac_anti": 0.3,
              "training_iteration": 2, "time_this_iter_s": 1.0, "timestamp": 17e8,
              "pid": 12, "hostname": "h", "node_ip": "1.2.3.4", "done": False,
              "trial_id": "abc", "config/optim/lr": 0.1, "should_checkpoint": True,
              "time_since_restore": 3.0, "iterations_since_restore": 2, "date": "x"}
    assert metrics_of(result) == {"train_loss": 0.5, "val_robust_acc": 0.4, "frac_anti": 0.3}


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_tracking_uri_is_the_flag_then_the_environment_then_the_default(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'env.db'}"
    assert resolve_tracking_uri("sqlite:///flag.db") == f"sqlite:///{tmp_path / 'flag.db'}"
    (tmp_path / "bare.db").touch()
    assert resolve_tracking_uri("bare.db") == f"sqlite:///{tmp_path / 'bare.db'}"


def test_every_command_reads_mlflow_tracking_uri_unless_given_the_flag(tmp_path, monkeypatch,
                                                                       capsys):
    import sweeper.cli as cli

    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    space = tiny_space(methods=["erm"])
    del space["search"]["trades"]
    path = write_space(tmp_path / "space.yaml", space)
    storage = ["--storage", str(tmp_path / "runs")]
    assert main(["launch", str(path), *storage, "--quiet"]) == 2
    assert f"cannot reach {dead}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny").exists() and not (tmp_path / "mlflow.db").exists()
    assert main(["analyze", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert f"cannot reach {dead}" in capsys.readouterr().err
    # The flag wins over the environment.
    assert main(["analyze", "tiny", "--out", str(tmp_path / "out"), "--tracking-uri",
                 "sqlite:///flag.db"]) == 2
    assert f"no MLflow store at {tmp_path / 'flag.db'}" in capsys.readouterr().err
    started = []
    from sweeper import servers

    monkeypatch.setattr(servers, "run_process_group",
                        lambda cmd, what: started.append(cmd) or 0)
    assert main(["ui"]) == 0 and dead in started[-1]
    assert main(["ui", "--tracking-uri", "sqlite:///flag.db"]) == 0
    assert f"sqlite:///{tmp_path / 'flag.db'}" in started[-1]
    # --help says so, for every command that takes --tracking-uri.
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    takes = [n for n, p in sub.choices.items() if "--tracking-uri" in p.format_help()]
    assert sorted(takes) == ["analyze", "launch", "sync", "ui"]
    assert all("$MLFLOW_TRACKING_URI" in sub.choices[n].format_help()
               for n in ("analyze", "launch", "ui"))


@pytest.mark.parametrize("last, error, expected", [
    ({"epoch": 3}, False, "completed"), ({"epoch": 1}, False, "pruned"),
    ({"epoch": 3}, True, "failed"), (None, True, "failed")])
def test_outcome_of_a_trial(last, error, expected):
    assert trial_outcome({"epochs": 3}, last, error) == expected


def _fake_trial(trial_id: str, epochs_done: int = 0) -> SimpleNamespace:
    config = {"dataset": {"name": "gmm", "shape": [1, 1, 8], "num_classes": 3},
              "method": {"name": "erm"},
              SWEEP_KEY: {"cell": "s/erm", "scenario": "s", "method": "erm", "seed": 0,
                     "phase": "tune", "epochs": 3}}
    return SimpleNamespace(trial_id=trial_id, config=config, checkpoint=None,
                           last_result={"epoch": epochs_done}, num_failures=0,
                           status="RUNNING")


def test_a_restarted_driver_finds_runs_by_trial_id_and_logs_each_epoch_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, "t").start_parent("val_robust_acc", "max", "name: t\n")
    trial = _fake_trial("abc")
    first = TrackingCallback(uri, "t", parent, SWEEP_KEY)
    first.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        first.on_trial_result(0, [], trial, {"epoch": epoch, "train_loss": 1.0 / epoch})
    # A new driver (the callback comes back unpickled, without its caches) re-runs epoch 2.
    second = pickle.loads(pickle.dumps(first))
    second.on_trial_start(0, [], trial)
    for epoch in (2, 3):
        second.on_trial_result(0, [], trial, {"epoch": epoch, "train_loss": 1.0 / epoch})
    trial.last_result = {"epoch": 3}
    second.on_trial_complete(0, [], trial)

    tracker = Tracker(uri, "t")
    runs = tracker.trial_runs()
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"
    assert run.data.params["dataset.name"] == "gmm" and run.data.params["method.name"] == "erm"
    assert "method.eps" not in run.data.params  # ERM has no attack, hence no eps knob
    history = tracker.client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_autoattack_scalars_are_metrics_its_lists_are_not(tmp_path):
    from pyarrow.fs import LocalFileSystem

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, "t").start_parent("val_robust_acc", "max", "")
    callback = TrackingCallback(uri, "t", parent, SWEEP_KEY)
    trial = _fake_trial("aa")
    callback.on_trial_start(0, [], trial)
    aa = {"test_autoattack_acc": 0.31, "test_worst_class_autoattack_acc": 0.12,
          "test_pgd_autoattack_gap": 0.05}
    # The last epoch's result, with list- and string-valued keys a trial may put there.
    callback.on_trial_result(0, [], trial, {"epoch": 3, "train_loss": 0.2, **aa,
                                            "test_autoattack_indices": [4, 8, 15],
                                            "autoattack_version": "fast"})
    # What reaches the driver through the checkpoint: every list the trial reported.
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    lists = {"test_class_robust_acc": [0.4, 0.5], "test_class_autoattack_acc": [0.3, 0.32],
             "cfa_class_eps": [0.09, 0.11], "cfa_class_eps_by_epoch": [[0.1, 0.1], [0.09, 0.11]],
             "test_autoattack_indices": [4, 8, 15],
             "test_autoattack_flags": ["subset: 3 of 1000 asked"]}
    (ckpt / "classwise.json").write_text(json.dumps(lists))
    callback.on_checkpoint(0, [], trial, SimpleNamespace(filesystem=LocalFileSystem(),
                                                         path=str(ckpt)))
    trial.last_result = {"epoch": 3}
    callback.on_trial_complete(0, [], trial)

    tracker = Tracker(uri, "t")
    run = tracker.trial_runs()[0]
    assert run.data.metrics == {"train_loss": 0.2, **aa}
    assert all(m.step == 3 for k in aa for m in tracker.client.get_metric_history(
        run.info.run_id, k))
    assert run.data.tags["autoattack_flags"] == "subset: 3 of 1000 asked"
    local = tracker.client.download_artifacts(run.info.run_id, "classwise.json", str(tmp_path))
    # The evaluation's lists and a method's own (CFA's class bounds and their history); not
    # AutoAttack's image positions or flags.
    assert json.loads(Path(local).read_text()) == {
        "test_class_robust_acc": [0.4, 0.5], "test_class_autoattack_acc": [0.3, 0.32],
        "cfa_class_eps": [0.09, 0.11], "cfa_class_eps_by_epoch": [[0.1, 0.1], [0.09, 0.11]]}


def test_end_of_session_deletes_unknown_trials_and_closes_running_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = Tracker(uri, "t").start_parent("val_robust_acc", "max", "")
    callback = TrackingCallback(uri, "t", parent, SWEEP_KEY)
    known, orphan = _fake_trial("known"), _fake_trial("orphan")
    for trial in (known, orphan):
        callback.on_trial_start(0, [], trial)
    callback.on_experiment_end([known])
    runs = Tracker(uri, "t").trial_runs()
    assert [r.data.tags["trial_id"] for r in runs] == ["known"]
    assert runs[0].info.status == "KILLED"  # unfinished: a resume reopens it
    callback.on_trial_start(0, [], known)
    assert Tracker(uri, "t").trial_runs()[0].info.status == "RUNNING"


@pytest.mark.slow  # `mlflow server` takes ~25 s to start on two cores
def test_sweep_against_a_real_mlflow_server(ray_local, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", timeout=120)
        space = tiny_space(methods=["erm"], confirm={"seeds": [1]})
        del space["search"]["trades"]
        path = write_space(tmp_path / "space.yaml", space)
        assert main(["launch", str(path), "--storage", str(tmp_path / "runs"),
                     "--tracking-uri", uri, "--quiet"]) == 0
        tracker = Tracker(uri, "tiny")
        runs = tracker.trial_runs()
        assert len(runs) == 3 and not (tmp_path / "mlflow.db").exists()
        assert {r.data.tags["phase"] for r in runs} == {"tune", "confirm"}
        assert all(r.info.status == "FINISHED" and r.data.tags["method"] == "erm"
                   for r in runs)
        run = next(r for r in runs if r.data.tags["outcome"] == "completed")
        local = tracker.client.download_artifacts(run.info.run_id, "classwise.json",
                                                  str(tmp_path))
        assert "val_class_robust_acc" in json.loads(Path(local).read_text())
        # status reads the same server, from the manifest.
        assert main(["status", "tiny", "--storage", str(tmp_path / "runs")]) == 0
    finally:
        kill_session(server)


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on a port."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                out.append(local.rsplit(":", 1)[0])
    return out


@pytest.mark.slow  # `caat-sweep ui` (an MLflow server) takes ~25 s to start on two cores
def test_ui_serves_on_localhost_only(tmp_path):
    port = free_port()
    ui = subprocess.Popen([*CLI, "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                           "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        assert _listening(port) and set(_listening(port)) == {"0100007F"}  # 127.0.0.1
    finally:
        kill_session(ui)
