"""What a new user hits in the first hour: resources no node has, deterministic trial errors,
how a sweep ended (sweep.json, a dead driver), and the commands the tools print, pasted."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sweep_support import tiny_space, write_space
from trial_support import tiny_config

from sweeper import hints
from sweeper.cli import main
from sweeper.lock import lock_path
from sweeper.search import _driver
from sweeper.search._resources import StallWatch, check_resources
from trainables.errors import ConfigError
from trainables.trial import DirectoryReporter, run_trial

# ------------------------------------------------------------------ resources


def test_a_local_cluster_refuses_a_trial_it_can_never_fit(ray_local, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tiny_space(resources={"cpu": 1, "gpu": 0.5})  # README's example, on a CPU box
    path = write_space(tmp_path / "tiny.yaml", space)
    rc = main(["launch", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert ("resources.gpu: a trial asks for 0.5 GPU, and this machine's Ray has 0; set "
            "resources.gpu: 0") in err
    # Refused before anything was written: no sweep, no MLflow store.
    assert not (tmp_path / "runs" / "tiny").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_resources_checked_against_the_cluster():
    have = {"CPU": 2.0, "memory": 1e9}
    assert check_resources({"cpu": 1, "gpu": 0}, have, local=True) is None
    with pytest.raises(ConfigError, match=r"^resources\.cpu: a trial asks for 4 CPU, and this "
                                          r"machine's Ray has 2; lower resources\.cpu to at "
                                          r"most 2"):
        check_resources({"cpu": 4, "gpu": 0}, have, local=True)
    # A cluster that may scale up: a warning, not a refusal.
    warning = check_resources({"cpu": 1, "gpu": 1}, have, local=False)
    assert warning.startswith("warning: resources.gpu: a trial asks for 1 GPU, and the "
                              "cluster has 0 now")


def test_the_stall_watch_fires_only_when_trials_wait_with_nothing_running():
    now = [0.0]
    watch = StallWatch(10, {"cpu": 1, "gpu": 1})
    watch.clock = lambda: now[0]
    assert not watch.observe(["PENDING"])
    now[0] = 9.0
    assert not watch.observe(["PENDING", "TERMINATED"])
    now[0] = 12.0
    assert not watch.observe(["RUNNING", "PENDING"])  # queued behind a running trial: fine
    now[0] = 13.0
    assert not watch.observe(["PENDING"])  # the wait starts again
    now[0] = 23.0
    assert watch.observe(["PENDING"])
    assert "no trial could start for 10 s (resources.pending_timeout_s)" in watch.message()
    assert not StallWatch(None, {}).observe(["PENDING"])  # null: wait forever
    # Pickled with the experiment, it forgets the old process's clock.
    import pickle

    assert pickle.loads(pickle.dumps(watch))._since is None


def test_a_sweep_whose_trials_never_start_stops_resumably_and_says_why(
        ray_local, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tiny_space(resources={"cpu": 1, "gpu": 1, "pending_timeout_s": 2})
    path = write_space(tmp_path / "tiny.yaml", space)
    storage = tmp_path / "elsewhere" / "runs"
    # --address: a cluster that may scale (the shared local Ray stands in for it).
    rc = main(["launch", str(path), "--storage", str(storage), "--tracking-uri",
               f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet", "--address", "auto"])
    err = capsys.readouterr().err
    assert rc == 4, err[-3000:]
    assert "warning: resources.gpu: a trial asks for 1 GPU, and the cluster has 0 now" in err
    assert "no trial could start for 2 s (resources.pending_timeout_s)" in err
    assert "Tuner.restore(" not in err  # Ray's own hint, which would skip the studies
    manifest = json.loads((storage / "tiny" / "sweep.json").read_text())
    assert manifest["state"] == "interrupted"
    resume = f"caat-sweep resume tiny --storage {storage}"
    assert f"`{resume}` continues it" in err
    # Pasted, it runs (and, the cluster still without GPUs, stops the same way).
    assert main(shlex.split(resume)[1:] + ["--quiet"]) == 4


# ------------------------------------------------------------ deterministic errors


def test_a_checkpoint_of_another_format_fails_with_one_line(tmp_path):
    reporter = DirectoryReporter(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    torch.save({"model": {"weight": torch.zeros(1)}}, tmp_path / "checkpoint" / "state.pt")
    with pytest.raises(ConfigError, match=r"checkpoint .*state\.pt: not a checkpoint of this "
                                          r"trial \(RuntimeError: Error\(s\) in loading"):
        run_trial(tiny_config(), reporter)


# ------------------------------------------------- how a sweep ended, pasted hints


def _hints(text: str) -> list[str]:
    """Every `caat-sweep ...` command a tool printed between backticks."""
    return re.findall(r"`(caat-sweep [^`]+)`", text)


def test_printed_hints_carry_their_options_and_work_when_pasted(ray_local, tmp_path, capsys,
                                                                 monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # neither the storage nor the store is the default
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = tmp_path / "scratch" / "runs"
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    path = write_space(tmp_path / "tiny.yaml", tiny_space(trials_per_cell=1))
    assert main(["launch", str(path), "--storage", str(storage), "--tracking-uri", uri,
                 "--quiet"]) == 0
    printed = _hints(capsys.readouterr().err)
    assert f"caat-sweep status tiny --storage {storage}" in printed
    assert f"caat-sweep analyze tiny --out runs/analysis/tiny --tracking-uri {uri}" in printed
    for command in printed:
        assert main(shlex.split(command)[1:]) == 0, command
    assert (tmp_path / "here" / "runs" / "analysis" / "tiny" / "summary.md").is_file()
    # Artifacts beside the SQLite store, never in ./mlruns of wherever the driver ran.
    assert not (tmp_path / "here" / "mlruns").exists()
    assert list((tmp_path / "db" / "mlflow-artifacts" / "tiny").rglob("classwise.json"))

    # A driver that died without a word (SIGKILL, a lost machine): sweep.json still says
    # running and its lock names a process that is gone. status tells it from a live one.
    manifest_path = storage / "tiny" / "sweep.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "state": "running"}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    Path(lock_path(str(storage), "tiny")).write_text(json.dumps({
        "host": socket.gethostname(), "pid": dead.pid, "start_ticks": None,
        "since": "2026-12-01 10:00:00", "command": "caat-sweep launch tiny.yaml"}))
    capsys.readouterr()
    assert main(["status", "tiny", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "sweep tiny: stopped" in out
    assert f"driver: none (pid {dead.pid} on {socket.gethostname()} is gone)" in out
    resume = _hints(out)
    assert resume == [f"caat-sweep resume tiny --storage {storage}"]
    assert main(shlex.split(resume[0])[1:] + ["--quiet"]) == 0  # takes the stale lock over
    assert json.loads(manifest_path.read_text())["state"] == "done"


def test_a_driver_that_ends_on_an_error_records_failed(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Broken:
        def fit(self):
            raise RuntimeError("the tuner fell over")

    monkeypatch.setattr(_driver, "_new_tuner", lambda *args: Broken())
    path = write_space(tmp_path / "tiny.yaml", tiny_space())
    with pytest.raises(RuntimeError, match="fell over"):
        main(["launch", str(path), "--quiet"])
    manifest = json.loads((tmp_path / "runs" / "tiny" / "sweep.json").read_text())
    assert manifest["state"] == "failed"
    capsys_free = main(["status", "tiny"])  # a failed sweep's status still reads
    assert capsys_free == 0


def test_hint_options_only_where_they_differ_from_the_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default_storage = str(tmp_path / "runs")
    assert hints.command("resume", "s", storage=default_storage) == "caat-sweep resume s"
    assert hints.command("status", "s", storage="/x y/runs") == \
        "caat-sweep status s --storage '/x y/runs'"
    # status and resume find a sweep by its storage, analyze by its tracking store.
    assert hints.command("analyze", "s", storage="/elsewhere",
                         tracking_uri="http://mlflow:5000") == \
        "caat-sweep analyze s --out runs/analysis/s --tracking-uri http://mlflow:5000"
    assert hints.command("analyze", "s", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db") == \
        "caat-sweep analyze s --out runs/analysis/s"
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


# ------------------------------------------------------------------- --help, --version


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps at the terminal width


def test_help_tells_the_truth_about_columns_and_exit_statuses(capsys):
    assert "pruned, failed and interrupted" in _help(capsys, "status")
    assert "Exit status 2: bad input" in _help(capsys, "analyze")
    assert "Exit status 2, with one line naming the field, on a bad config" in \
        _help(capsys, "train")
    launch = _help(capsys, "launch")
    assert "4: stopped because trials waited resources.pending_timeout_s" in launch
    assert "or a cell got no confirmation runs" in launch
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    from importlib import metadata

    assert capsys.readouterr().out.startswith(f"caat-sweep {metadata.version('caat-sweeper')} ")


@pytest.mark.parametrize("error, expected", [
    (ConfigError("model.arch: 'resnet99' unknown"), "model.arch: 'resnet99' unknown"),
    (ModuleNotFoundError("No module named 'timm'"),
     "ModuleNotFoundError: No module named 'timm'"),
])
def test_deterministic_worker_errors_end_their_trial_once(monkeypatch, error, expected):
    from ray import tune

    from sweeper.contract import UNRETRYABLE_KEY
    from sweeper.search import _trainable
    from sweeper.search._inputs import SWEEP_KEY

    def fails(*args):
        raise error

    reported = []
    monkeypatch.setattr(_trainable, "run_sweep_trial", fails)
    monkeypatch.setattr(tune, "report", reported.append)
    _trainable.sweep_trial({SWEEP_KEY: {"cell": "c"}}, datasets={}, warm_starts={}, faults=[])
    assert reported == [{UNRETRYABLE_KEY: expected}]
    # Anything else may be transient: it goes to Ray, which retries from the checkpoint.
    monkeypatch.setattr(_trainable, "run_sweep_trial",
                        lambda *a: (_ for _ in ()).throw(OSError("NFS hiccup")))
    with pytest.raises(OSError):
        _trainable.sweep_trial({SWEEP_KEY: {"cell": "c"}}, datasets={}, warm_starts={},
                               faults=[])
