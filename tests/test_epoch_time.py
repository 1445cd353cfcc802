"""benchmarks/epoch_time.py runs for methods with and without attack steps (a method's
knobs decide whether it has `steps`), and prints one row per method."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_time_prints_a_row_per_method():
    methods = ["erm", "trades", "fgsm_rs"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "epoch_time.py"), "--methods", *methods,
         "--n-train", "128", "--epochs", "2", "--repeats", "1", "--steps", "1",
         "--threads", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.split() and line.split()[0] in methods}
    assert set(rows) == set(methods)
    assert rows["erm"][1] == "-" and rows["fgsm_rs"][1] == "-" and rows["trades"][1] == "1"
