"""The MLflow UI really shows a sweep: `caat-sweep ui` on a free loopback port, loaded in
headless Chromium (Debian's `chromium`, installed by `make test`) by the same script that
takes README's screenshot; the experiment, the parent run and every trial run must appear."""

import subprocess
import sys
from pathlib import Path

import pytest
from analysis_store import SCENARIOS, StoreWriter
from sweep_support import needs_chromium

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ui_screenshot.py"

pytestmark = [
    # The MLflow server alone takes ~25 s to start on two cores; the generous waits (they end
    # as soon as the page shows what is awaited) are for a loaded CI machine.
    pytest.mark.slow,
    needs_chromium,
]


def test_ui_shows_the_sweep_and_its_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    w = StoreWriter(uri, tmp_path / "artifacts")
    exp, parent = w.sweep("uisweep")
    metrics = dict.fromkeys(("natural_acc", "robust_acc", "worst_class_natural_acc",
                             "worst_class_robust_acc", "class_natural_acc_std",
                             "boundary_error"), 0.5)
    trials = [w.trial(exp, parent, "uisweep", scenario, method, 0, "tune", "completed",
                      metrics)
              for scenario in list(SCENARIOS)[:2] for method in ("trades", "caat")]
    names = [w.client.get_run(run_id).info.run_name for run_id in trials]

    png, text = tmp_path / "runs.png", tmp_path / "runs.txt"
    proc = subprocess.run([sys.executable, str(SCRIPT), "uisweep", "--tracking-uri", uri,
                           "--png", str(png), "--text", str(text), "--timeout", "300"],
                          capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stderr
    assert "not available" not in proc.stderr  # it was `caat-sweep ui`, not a fallback

    shown = text.read_text()
    lines = shown.splitlines()
    assert "caat-sweep/uisweep" in lines  # the experiment
    assert "uisweep" in lines  # the parent run, expanded ...
    assert all(name in lines for name in names)  # ... onto every trial run
    assert "5 matching runs" in " ".join(shown.split())
    # The trial tags and metrics are columns of the table.
    assert {"cell", "phase", "test_robust_acc", "clean/caat", "noisy20/trades"} <= set(lines)

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
