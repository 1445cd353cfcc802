"""benchmarks/noise_imbalance_table.py's best-and-last table: each figure is the mean with its
95% t-interval over seeds, the robust overfitting gap is best - last per seed, and the Wilson
line reads each run's own worst class and its test images."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from scipy import stats
from statsmodels.stats.proportion import proportion_confint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from noise_imbalance_table import best_last_table, collect  # noqa: E402

LAST_ROBUST = (0.40, 0.44, 0.45)
BEST_ROBUST = (0.46, 0.47, 0.49)


def write_trial(root: Path, seed: int) -> None:
    d = root / "pair-0.4" / "trades" / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = {"natural_acc": 0.7, "robust_acc": LAST_ROBUST[seed],
               "worst_class_natural_acc": 0.3, "worst_class_robust_acc": 0.02,
               "best_natural_acc": 0.68, "best_robust_acc": BEST_ROBUST[seed],
               "best_worst_class_robust_acc": 0.05, "best_epoch": 3 + seed % 2,
               # Class 1 is the worst: 10 of 500 images.
               "class_robust_acc": [0.5, 0.02, 0.6], "class_count": [500, 500, 500],
               "seconds": 60.0, "config": {"init": {"erm_epochs": 1}, "optim": {"epochs": 5}}}
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_best_last_table_shows_t_intervals_the_gap_and_the_wilson_width(tmp_path):
    for seed in range(3):
        write_trial(tmp_path, seed)
    text = best_last_table(collect(tmp_path))
    row = next(line for line in text.splitlines() if line.startswith("| trades"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["trades", "3", "6", "3-4"]
    last = [100 * v for v in LAST_ROBUST]
    low, high = stats.t.interval(0.95, 2, loc=sum(last) / 3, scale=stats.sem(last))
    assert cells[5] == f"{sum(last) / 3:.1f} [{low:.1f}, {high:.1f}]"
    gap = [100 * (b - a) for a, b in zip(LAST_ROBUST, BEST_ROBUST, strict=True)]
    low, high = stats.t.interval(0.95, 2, loc=sum(gap) / 3, scale=stats.sem(gap))
    assert cells[10] == f"{sum(gap) / 3:.1f} [{low:.1f}, {high:.1f}]"
    w_low, w_high = proportion_confint(10, 500, alpha=0.05, method="wilson")
    assert f"at most ±{100 * (w_high - w_low) / 2:.1f} points" in text
    assert not math.isnan(w_low)
