"""`caat-sweep dashboard`: optuna-dashboard over a sweep's per-cell Optuna studies.

A small sweep is faked the way a launch leaves it: a manifest in a storage directory and a
SQLite Optuna storage holding one study per cell, named by the cell id. The fast tests check
the refusals (one line, exit 2, nothing created), and that a real process serves the
studies and stops on Ctrl-C. The slow test loads the page in headless Chromium
(scripts/dashboard_screenshot.py) and checks that every cell's study is listed.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.request
import warnings
from pathlib import Path

import optuna
import pytest
from sweep_support import CLI, free_port, needs_chromium, wait_http

from sweeper import storage
from sweeper.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dashboard_screenshot.py"

CELLS = ("clean/caat", "noisy20/trades")
METRIC = "val_robust_acc"


def fake_sweep(root: Path, name: str = "dash", *, optuna_storage: str | None = None,
               cells: tuple[str, ...] = CELLS) -> tuple[str, str]:
    """A sweep manifest under `root`/runs and its studies (a few trials each); returns
    (storage directory, studies URL). Without `optuna_storage`, the studies go where a
    launch puts them by default: the sweep directory's optuna.db."""
    where = str(root / "runs")
    manifest = storage.Manifest(name=name, storage=where, tracking_uri="sqlite:///unused.db",
                                space_text="name: dash\n", space_source="dash.yaml",
                                optuna_storage=optuna_storage)
    manifest.save()
    url = manifest.studies_url
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for i, cell in enumerate(cells):
        study = optuna.create_study(storage=url, study_name=cell, direction="maximize")
        with warnings.catch_warnings():  # experimental in Optuna; a launch names them too
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC])
        for x in (0.1, 0.5, 0.9):
            study.add_trial(optuna.trial.create_trial(
                params={"method.eps": x},
                distributions={"method.eps": optuna.distributions.FloatDistribution(0, 1)},
                value=x * (i + 1)))
    return where, url


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------ refusals


def test_unknown_sweep_exits_2_in_one_line(tmp_path, capsys):
    where, _ = fake_sweep(tmp_path)
    code, err = run_cli(capsys, "dashboard", "nope", "--storage", where,
                        "--port", str(free_port()))
    assert code == 2
    assert err == [f"caat-sweep dashboard: error: sweep 'nope': not found in {where} "
                   "(sweeps there: dash); pass --storage where it was launched"]


def test_busy_port_exits_2_in_one_line(tmp_path, capsys):
    where, _ = fake_sweep(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, err = run_cli(capsys, "dashboard", "dash", "--storage", where,
                            "--port", str(port))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"caat-sweep dashboard: error: --port: 127.0.0.1:{port} is not "
                             "free (")
    assert err[0].endswith("choose another with --port")


def test_port_out_of_range_exits_2(tmp_path, capsys):
    where, _ = fake_sweep(tmp_path)
    code, err = run_cli(capsys, "dashboard", "dash", "--storage", where, "--port", "70000")
    assert code == 2
    assert err == ["caat-sweep dashboard: error: --port: 70000 is not a port number "
                   "(1-65535)"]


def test_missing_default_study_file_exits_2_and_creates_nothing(tmp_path, capsys):
    where, url = fake_sweep(tmp_path, cells=())
    db = Path(url.removeprefix("sqlite:///"))
    assert db == tmp_path / "runs" / "dash" / "optuna.db" and not db.exists()
    code, err = run_cli(capsys, "dashboard", "dash", "--storage", where,
                        "--port", str(free_port()))
    assert code == 2
    assert err == [f"caat-sweep dashboard: error: Optuna storage {url}: no such file (the "
                   "sweep has created no study there yet)"]
    assert not db.exists()


def test_storage_url_that_does_not_open_exits_2_without_the_password(tmp_path, capsys):
    where = str(tmp_path / "runs")
    storage.Manifest(name="dash", storage=where, tracking_uri="sqlite:///unused.db",
                     space_text="", space_source="",
                     optuna_storage="nosuchdb://sweeper:s3cret@dbhost/studies").save()
    code, err = run_cli(capsys, "dashboard", "dash", "--storage", where,
                        "--port", str(free_port()))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("caat-sweep dashboard: error: Optuna storage "
                             "nosuchdb://sweeper:***@dbhost/studies: cannot open it (")
    assert "s3cret" not in err[0]


# ------------------------------------------------------------------------- a real server


def test_a_real_process_serves_the_studies_and_stops_on_ctrl_c(tmp_path):
    where, url = fake_sweep(tmp_path, optuna_storage=f"sqlite:///{tmp_path / 'studies.db'}")
    port = free_port()
    proc = subprocess.Popen([*CLI, "dashboard", "dash", "--storage", where, "--port",
                             str(port)], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/meta", timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30) as r:
            studies = json.load(r)["study_summaries"]
        assert sorted(s["study_name"] for s in studies) == list(CELLS)
        # Bound to loopback only: the machine's other addresses do not answer.
        assert _listening_addresses(port) == {"127.0.0.1"}
        proc.send_signal(signal.SIGINT)
        # communicate: drains stderr while waiting (a full pipe would block the server);
        # 60 s: a loaded 2-core CI machine once took longer than 30 to stop.
        _, err_text = proc.communicate(timeout=60)
        assert proc.returncode == 0, err_text
        err = err_text.strip().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err == [f"optuna-dashboard for sweep 'dash' (2 cell studies in {url}) on "
                   f"http://127.0.0.1:{port}/dashboard (Ctrl-C stops it)",
                   "optuna-dashboard stopped"]


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


# ------------------------------------------------------------------------------ Chromium



# optuna-dashboard starts in seconds; the generous waits in the script (they end as soon as
# the page shows what is awaited) are for a loaded CI machine.
def screenshot_text(tmp_path: Path, where: str, *options: str) -> str:
    text = tmp_path / "dashboard.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "dash", "--storage", where, *options,
                           "--text", str(text), "--timeout", "300"],
                          capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stderr
    return text.read_text()


@pytest.mark.slow
@needs_chromium
def test_the_dashboard_page_lists_every_cell_study(tmp_path):
    where, _ = fake_sweep(tmp_path)
    shown = screenshot_text(tmp_path, where)
    # The study list: one card per study, titled "<study id>. <study name>".
    titles = [line.split(". ", 1) for line in shown.splitlines()]
    listed = {title[1] for title in titles if len(title) == 2 and title[0].isdigit()}
    assert listed == set(CELLS), shown


@pytest.mark.slow
@needs_chromium
def test_a_cell_study_page_shows_its_objective_and_history(tmp_path):
    where, _ = fake_sweep(tmp_path)
    lines = screenshot_text(tmp_path, where, "--study", "noisy20/trades").splitlines()
    assert lines[0].startswith("noisy20/trades (id=")  # the page's title
    # The history plot's axis is named by the objective's metric, as a launch names it.
    assert {"History", METRIC} <= set(lines), lines
