"""Plugins: a separately installed package adds a method through an entry point, and it is
listed, validated, swept through Ray workers, tracked and analysed like a built-in.

`make test` installs the example plugin (examples/plugin: method `trades_ls` with its own
knob `method.smoothing`). Broken plugins are made here as bare distributions (a
`*.dist-info` with an `entry_points.txt`) on a subprocess's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from sweep_support import tiny_space, write_space

from sweeper.cli import main
from sweeper.tracking import Tracker
from trainables.config import load_config
from trainables.errors import ConfigError
from trainables.registry import METHODS

pytestmark = pytest.mark.skipif(
    "trades_ls" not in METHODS, reason="the example plugin is not installed (`make plugin`)")

ROOT = Path(__file__).resolve().parents[2]


def fake_distribution(site: Path, name: str, entry_points: dict[str, str],
                      modules: dict[str, str] | None = None) -> None:
    """A minimal installed distribution: metadata, entry points, and module files."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[caat_sweeper.methods]\n{lines}")
    for module, text in (modules or {}).items():
        (site / f"{module}.py").write_text(text)


def cli(*args: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


def test_methods_lists_the_builtins_and_the_plugin_with_their_knobs():
    proc = cli("methods", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = {e["name"]: e for e in json.loads(proc.stdout)}
    assert {"erm", "pgd_at", "trades", "frl", "mwn", "anti_adv", "caat", "trades_ls"} <= set(
        entries)
    assert entries["caat"]["source"] == "built-in" and entries["erm"]["knobs"] == []
    plugin = entries["trades_ls"]
    assert plugin["source"] == "plugin caat-sweeper-example 0.1.0"
    smoothing = {k["name"]: k for k in plugin["knobs"]}["smoothing"]
    assert smoothing["default"] == 0.1 and smoothing["bounds"] == {"ge": 0.0, "lt": 1.0}
    assert {k["name"] for k in plugin["knobs"]} == {"beta", "eps", "step_size", "steps",
                                                    "smoothing"}
    text = cli("methods").stdout
    assert "trades_ls  (plugin caat-sweeper-example 0.1.0)" in text
    assert "  method.smoothing  float = 0.1 (>= 0, < 1)  label smoothing" in text


def test_a_plugin_knob_is_validated_like_a_builtin_one():
    cfg = load_config({"method": {"name": "trades_ls", "smoothing": 0.2, "beta": 3}})
    assert cfg.resolved()["method"]["smoothing"] == 0.2
    with pytest.raises(ConfigError, match=r"^method.smoothing: Input should be less than 1"):
        load_config({"method": {"name": "trades_ls", "smoothing": 1.5}})
    with pytest.raises(ConfigError, match="^method.smoothing: unknown key for method 'trades'"):
        load_config({"method": {"name": "trades", "smoothing": 0.2}})


def test_a_plugin_that_fails_to_import_is_one_line_and_the_rest_keeps_working(tmp_path):
    fake_distribution(tmp_path, "broken", {"broken": "broken_plugin:Method",
                                           "trades": "broken_plugin:Method"},
                      {"broken_plugin": "import no_such_module_here\n"})
    proc = cli("methods", site=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("broken  (plugin broken 0.1)\n  cannot be loaded: method.name: plugin 'broken' "
            "(broken 0.1, broken_plugin:Method) failed to import: ModuleNotFoundError: No "
            "module named 'no_such_module_here'") in proc.stdout
    assert "trades  (built-in)" in proc.stdout and "trades_ls  (plugin" in proc.stdout
    assert ("note: method.name: plugin 'trades' (broken 0.1, broken_plugin:Method) ignored: "
            "the name 'trades' is taken") in proc.stdout
    proc = cli("train", "--out", str(tmp_path / "run"), "--set", "method.name=broken",
               site=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "caat-sweep train: error: method.name: plugin 'broken' (broken 0.1, "
        "broken_plugin:Method) failed to import: ModuleNotFoundError: No module named "
        "'no_such_module_here'"]
    assert not (tmp_path / "run").exists()


def plugin_space(**top) -> dict:
    space = tiny_space(name="plugin", methods=["trades", "trades_ls"], trials_per_cell=3,
                       search={"trades_ls": {"method.smoothing": {
                           "type": "float", "low": 0.0, "high": 0.3}}}, **top)
    space["search"].pop("trades")
    return space


def test_the_plugin_sweeps_through_ray_workers_with_its_knob_searched(ray_local, tmp_path,
                                                                      capsys):
    space = plugin_space()
    path = write_space(tmp_path / "plugin.yaml", space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "runs")
    assert main(["launch", str(path), "--storage", storage, "--tracking-uri", uri,
                 "--quiet"]) == 0
    runs = Tracker(uri, "plugin").trial_runs()
    plugin_runs = [r for r in runs if r.data.tags["method"] == "trades_ls"]
    assert len(plugin_runs) == 3 + len(space["confirm"]["seeds"])  # tuning + confirmation
    assert all(r.data.tags["outcome"] in ("completed", "pruned") for r in plugin_runs)
    tuned = {float(r.data.params["method.smoothing"]) for r in plugin_runs
             if r.data.tags["phase"] == "tune"}
    assert len(tuned) == 3 and all(0.0 <= s <= 0.3 for s in tuned)  # Optuna searched it
    for run in runs:  # each run logs its own method's knobs only
        assert ("method.smoothing" in run.data.params) == (run.data.tags["method"] ==
                                                           "trades_ls")
        assert "method.meta_lr" not in run.data.params
    # status and analyze know the plugin's sweep.
    capsys.readouterr()
    assert main(["status", "plugin", "--storage", storage]) == 0
    assert "/trades_ls" in capsys.readouterr().out
    out = tmp_path / "analysis"
    assert main(["analyze", "plugin", "--out", str(out), "--tracking-uri", uri]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["method"]) == {"trades", "trades_ls"}
    importance = pd.read_csv(out / "importance.csv")
    assert "method.smoothing" in set(importance["param"])


def test_a_config_error_in_the_worker_fails_its_trial_once_with_one_line(
        ray_local, tmp_path, monkeypatch, capsys):
    """A method the driver knows (registered at run time) and the workers do not: every
    worker's config fails to load. Each such trial fails at once, not retried, with one line
    in its `error` tag, and the sweep's exit status says trials failed."""
    from trainables.knobs import TradesKnobs
    from trainables.methods.trades import TRADES

    class LocalKnobs(TradesKnobs):
        name: str = "driver_only"

    class DriverOnly(TRADES):
        name, knobs = "driver_only", LocalKnobs

    monkeypatch.setitem(METHODS.table, "driver_only", DriverOnly)
    space = tiny_space(name="local", methods=["erm", "driver_only"], max_failures=3,
                       trials_per_cell=1)
    space["search"] = {}
    path = write_space(tmp_path / "local.yaml", space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["launch", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri",
                 uri, "--quiet"])
    assert code == 1
    runs = Tracker(uri, "local").trial_runs()
    bad = [r for r in runs if r.data.tags["method"] == "driver_only"]
    assert bad and all(r.data.tags["outcome"] == "failed" and r.info.status == "FAILED"
                       for r in bad)
    for run in bad:
        assert "retries" not in run.data.tags  # failed once
        assert run.data.tags["error"].startswith("method.name: unknown 'driver_only'; allowed:")
    good = [r for r in runs if r.data.tags["method"] == "erm"]
    assert good and all(r.data.tags["outcome"] == "completed" for r in good)
    assert "failed" in capsys.readouterr().err
