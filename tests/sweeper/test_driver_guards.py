"""What the driver refuses and how it stops: one driver per sweep (a lock, stale locks
taken over), bad storage paths and oversized spaces refused before Ray starts, a busy UI
port, space files edited since launch, `train --out` onto another config's run, and
SIGTERM stopping a sweep cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sweep_support import (
    CLI,
    free_port,
    kill_session,
    session_pids,
    tiny_space,
    wait_http,
    write_space,
)
from trial_support import tiny_config

from sweeper import search
from sweeper import storage as st
from sweeper.cli import main
from sweeper.lock import Holder, SweepLock, lock_path
from sweeper.search import _driver
from sweeper.tracking import Tracker
from trainables.errors import ConfigError


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------ the lock


def test_a_held_lock_refuses_a_second_driver_and_is_gone_after_release(tmp_path):
    with SweepLock(str(tmp_path), "s1") as first:
        holder = json.loads(Path(first.path).read_text())
        assert holder["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"sweep 's1': another driver is running it "
                                              rf"\(pid {os.getpid()} on "):
            SweepLock(str(tmp_path), "s1").acquire()
        SweepLock(str(tmp_path), "s2").acquire()  # another sweep: its own lock
    assert not Path(lock_path(str(tmp_path), "s1")).exists()


@pytest.mark.parametrize("holder", [
    lambda: Holder(socket.gethostname(), _dead_pid(), None, "then", "caat-sweep launch x"),
    # A live pid that is not the driver any more (reused): its start time differs.
    lambda: Holder(socket.gethostname(), os.getpid(), -1, "then", "caat-sweep launch x"),
])
def test_a_stale_lock_of_a_dead_driver_is_taken_over(tmp_path, capsys, holder):
    path = Path(lock_path(str(tmp_path), "s"))
    path.write_text(json.dumps(holder().__dict__))
    with SweepLock(str(tmp_path), "s"):
        assert json.loads(path.read_text())["start_ticks"] != -1
    assert "removing the stale lock of a driver that is gone" in capsys.readouterr().err


def test_a_lock_held_on_another_host_names_the_file_to_delete(tmp_path):
    path = Path(lock_path(str(tmp_path), "s"))
    path.write_text(json.dumps(Holder("elsewhere", 1234, 5, "then", "x").__dict__))
    with pytest.raises(ConfigError, match=rf"pid 1234 on elsewhere.*if that driver is dead, "
                                          rf"delete {path}"):
        SweepLock(str(tmp_path), "s").acquire()
    assert path.exists()


# --------------------------------------------------------------- refused before Ray starts


@pytest.fixture
def no_ray(monkeypatch):
    """Any of these refusals must come before Ray starts (and before anything is written)."""
    monkeypatch.setattr(_driver, "_init_ray", lambda *a, **k: pytest.fail("Ray was started"))


@pytest.mark.parametrize("storage, expected", [
    ("file", r"--storage: .*/file: .*/file is a file, not a directory"),
    ("file/sub", r"--storage: .*/file/sub: .*/file is a file, not a directory"),
    ("/proc/caat-runs", r"--storage: cannot write to /proc/caat-runs \("),
])
def test_a_bad_storage_path_is_refused_with_one_line(tmp_path, capsys, no_ray, storage,
                                                      expected):
    (tmp_path / "file").write_text("not a directory")
    space = write_space(tmp_path / "space.yaml", tiny_space())
    storage = storage if storage.startswith("/") else str(tmp_path / storage)
    assert main(["launch", str(space), "--storage", storage, "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    assert re.search(expected, _one_line_error(capsys))
    assert not (tmp_path / "mlflow.db").exists()
    assert main(["resume", "x", "--storage", storage]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_writable_storage_check_leaves_no_directory_behind(tmp_path):
    st.check_writable(str(tmp_path / "a" / "b"))
    assert not (tmp_path / "a").exists()


def test_an_oversized_space_is_refused_unless_forced(tmp_path, capsys, no_ray, monkeypatch):
    space = write_space(tmp_path / "space.yaml", tiny_space(trials_per_cell=1_000_000_000))
    argv = ["launch", str(space), "--storage", str(tmp_path / "runs"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv) == 2
    assert ("trials_per_cell: 1000000000 makes 2000000002 trials in 2 cells, more than "
            "max_trials (10000)") in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()
    # --force lets it through to the run itself (replaced here: it would never end).
    monkeypatch.setattr(_driver, "_launch", lambda *a, **k: 0)
    assert main([*argv, "--force"]) == 0
    space = write_space(tmp_path / "space.yaml",
                        tiny_space(trials_per_cell=100, max_trials=100))
    assert main(argv) == 2
    assert "makes 202 trials in 2 cells, more than max_trials (100)" in _one_line_error(capsys)


def test_resume_says_when_the_space_file_was_edited_since_launch(tmp_path, capsys):
    path = write_space(tmp_path / "space.yaml", tiny_space())
    manifest = st.Manifest(name="s", storage=str(tmp_path), tracking_uri="sqlite:///x.db",
                           space_text=path.read_text(), space_source="space.yaml",
                           extra={"space_path": str(path)})
    search.note_space_edits(manifest)
    assert capsys.readouterr().err == ""
    write_space(path, tiny_space(trials_per_cell=5))
    search.note_space_edits(manifest)
    err = _one_line_error(capsys)
    assert f"note: {path} has changed since sweep s was launched; resume continues" in err
    path.unlink()
    search.note_space_edits(manifest)  # gone: nothing to compare, nothing said
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ the UI


def test_ui_on_a_busy_port_exits_2_with_one_line(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port), "--tracking-uri",
                     f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert f"--port: 127.0.0.1:{port} is not free" in _one_line_error(capsys)
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port: 70000 is not a port number" in _one_line_error(capsys)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: reaping it is its new parent's business)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_killed_by_pid_stops_its_whole_server(tmp_path, sig):
    port = free_port()
    ui = subprocess.Popen([*CLI, "ui", "--port", str(port), "--tracking-uri",
                           f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    server: list[int] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        server = _descendants(ui.pid)  # mlflow ui, uvicorn, its workers and job runners
        assert len(server) >= 2
        os.kill(ui.pid, sig)  # as `kill PID`, nohup's parent or a batch system does
        _, err = ui.communicate(timeout=60)
    finally:
        if ui.poll() is None:
            ui.kill()
        for pid in server:  # never leave a server behind, whatever failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert ui.returncode == 0, err
    assert "MLflow UI stopped" in err
    assert not [pid for pid in server if _alive(pid)], "server processes left behind"
    with socket.socket() as s:
        # SO_REUSEADDR, as every server sets it: a connection the server closed may linger in
        # TIME_WAIT on the port, which is no listener; the bind fails only if one is left.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the port is free again


# -------------------------------------------------------------------------- train --out


def test_train_refuses_a_finished_run_of_another_config_unless_forced(tmp_path, capsys):
    def train(*extra: str) -> int:
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(tiny_config(optim={"epochs": 1})))
        return main(["train", str(path), "--out", str(tmp_path / "out"), *extra])

    assert train() == 0
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    capsys.readouterr()
    assert train("--set", "optim.lr=0.5") == 2
    assert "holds a finished trial of a different config" in _one_line_error(capsys)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == first
    assert train("--set", "optim.lr=0.5", "--force") == 0
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert again["config"]["optim"]["lr"] == 0.5
    assert train("--set", "optim.lr=0.5") == 0  # the same config: allowed


# ---------------------------------------------------------- two drivers, SIGTERM (slow)


def _slow_space(name: str) -> dict:
    """Trials of several seconds each, so a second driver or a signal lands mid-sweep (on a
    loaded machine too: the second command itself takes seconds to start)."""
    space = tiny_space(name=name, trials_per_cell=2)
    space["base"]["dataset"]["n_train"] = 6000
    space["base"]["optim"]["epochs"] = 6
    return space


def _trial_runs(db: Path, name: str) -> list:
    return Tracker(f"sqlite:///{db}", name).trial_runs()


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        assert proc.poll() is None, f"driver exited ({proc.returncode}) before {what}"
        time.sleep(0.3)
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


@pytest.mark.slow
def test_a_second_driver_of_a_running_sweep_is_refused(tmp_path, private_ray_env):
    path = write_space(tmp_path / "space.yaml", _slow_space("twice"))
    db, storage = tmp_path / "mlflow.db", tmp_path / "runs"
    args = ["--storage", str(storage), "--quiet"]
    uri = ["--tracking-uri", f"sqlite:///{db}"]
    first = subprocess.Popen([*CLI, "launch", str(path), *args, *uri], env=private_ray_env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        _wait_for(lambda: (storage / "twice" / "sweep.json").is_file(), 300, first,
                  "the sweep's manifest")
        for cmd in (["launch", str(path), *args, *uri], ["resume", "twice", *args]):
            second = subprocess.run([*CLI, *cmd], env=private_ray_env, cwd=tmp_path,
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            err = second.stderr.strip()
            assert len(err.splitlines()) == 1, err
            assert f"sweep 'twice': another driver is running it (pid {first.pid} on " in err
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None or session_pids(first.pid):
            kill_session(first)
    assert first.returncode == 0, out[-3000:]
    runs = _trial_runs(db, "twice")
    assert len(runs) == 2 * 2 + 2  # 2 cells x 2 tuning trials + 1 confirmation seed each
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert not Path(lock_path(str(storage), "twice")).exists()


@pytest.mark.slow
def test_sigterm_stops_the_sweep_cleanly_and_resume_finishes_it(tmp_path,
                                                                private_ray_env):
    path = write_space(tmp_path / "space.yaml", _slow_space("term"))
    db, storage = tmp_path / "mlflow.db", tmp_path / "runs"
    args = ["--storage", str(storage), "--quiet"]
    driver = subprocess.Popen([*CLI, "launch", str(path), *args, "--tracking-uri",
                               f"sqlite:///{db}"], env=private_ray_env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        _wait_for(lambda: any(r.data.metrics for r in _trial_runs(db, "term")), 300, driver,
                  "a trial's first epoch")
        os.kill(driver.pid, signal.SIGTERM)  # the driver only, as `kill PID` does
        out, _ = driver.communicate(timeout=180)
        time.sleep(2)
        assert not session_pids(driver.pid), "Ray processes left behind"
    finally:
        if driver.poll() is None or session_pids(driver.pid):
            kill_session(driver)
    assert driver.returncode == 143, out[-3000:]
    assert "SIGTERM received" not in out  # not Ray's abort dump
    assert "`caat-sweep resume term` continues it" in out
    runs = _trial_runs(db, "term")
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert not Path(lock_path(str(storage), "term")).exists()

    resume = subprocess.run([*CLI, "resume", "term", *args], env=private_ray_env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    runs = _trial_runs(db, "term")
    ids = [r.data.tags["trial_id"] for r in runs]
    assert len(ids) == len(set(ids)) == 2 * 2 + 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    manifest = json.loads((storage / "term" / "sweep.json").read_text())
    assert manifest["state"] == "done"
