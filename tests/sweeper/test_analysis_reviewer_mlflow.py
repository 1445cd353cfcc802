"""The reviewer's figures through a real MLflow store: the checklist's config params
(eval.autoattack, init.erm_epochs, optim.epochs, init.checkpoint, eval.best_metric) and
classwise.json's image counts reach the analysis, and `caat-sweep analyze` prints the
checklist."""

from __future__ import annotations

import pandas as pd
import pytest
from analysis_store import CONFIRM, StoreWriter, class_lists

from sweeper.analysis import load_sweep
from sweeper.cli import main

PARAMS = {"eval.autoattack": "fast", "init.erm_epochs": 2, "init.checkpoint": None,
          "eval.keep_best": True, "eval.best_metric": "val_robust_acc"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-rev")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    w = StoreWriter(uri, root / "artifacts")
    exp, parent = w.sweep("rev")
    for method in ("trades", "caat"):
        for seed, test in enumerate(CONFIRM["clean", method]):
            # StoreWriter logs the last epoch's test_* itself; the best checkpoint's beside them.
            best = {f"test_best_{k}": v for k, v in test.items()}
            best["test_best_robust_acc"] = test["robust_acc"] + 0.02
            final = {**best, "best_epoch": 2, "test_autoattack_acc": test["robust_acc"] - .01,
                     "test_worst_class_autoattack_acc": .1, "test_pgd_autoattack_gap": .01}
            counts = {"test_class_count": [100] * 10, "test_class_autoattack_count": [20] * 10,
                      "test_class_autoattack_acc": class_lists(test)["test_class_robust_acc"],
                      **{k.replace("test_", "test_best_"): v
                         for k, v in class_lists(test).items() if k.startswith("test_")}}
            run_id = w.trial(exp, parent, "rev", "clean", method, seed, "confirm", "completed",
                             test, final_extra=final, classwise_extra=counts)
            for key, value in PARAMS.items():
                w.client.log_param(run_id, key, str(value))
    return uri


def test_the_runs_table_carries_the_checklist_params(store):
    runs = load_sweep("rev", store).runs
    assert set(runs["eval_autoattack"]) == {"fast"}
    assert set(runs["init_erm_epochs"]) == {2} and set(runs["optim_epochs"]) == {3}
    assert set(runs["init_checkpoint"]) == {"None"}
    assert set(runs["eval_best_metric"]) == {"val_robust_acc"}


def test_analyze_prints_the_checklist_and_counts_images(store, tmp_path, capsys):
    out = tmp_path / "rev"
    assert main(["analyze", "rev", "--out", str(out), "--tracking-uri", store]) == 0
    stdout = capsys.readouterr().out
    lines = [line.strip() for line in stdout.splitlines()]
    start = lines.index("Reviewer's checklist:")
    checklist = lines[start + 1:start + 8]
    assert checklist[0] == ("[met] selection on validation only: configs chosen by "
                            "val_robust_acc (max); best checkpoint by val_robust_acc")
    assert checklist[2] == ("[not met] AutoAttack version and images: fast on 200 of 1000 "
                            "test images, in 6 of 6 runs")
    assert checklist[4] == ("[met] training budget per method: 5 epochs for every method "
                            "(init.erm_epochs + optim.epochs)")
    assert checklist[5].startswith("[met] best and last checkpoints reported: both in 6 of 6")
    md = (out / "summary.md").read_text()
    assert all(f"- {line}" in md for line in checklist)
    tidy = pd.read_csv(out / "summary.csv")
    row = tidy[tidy["method"].eq("caat") & tidy["metric"].eq("test_autoattack_acc")].iloc[0]
    assert row["wilson_n"] == 200  # AutoAttack's images, not the whole split's
    row = tidy[tidy["method"].eq("caat") & tidy["metric"].eq("test_robust_acc")].iloc[0]
    assert row["wilson_n"] == 1000
    gap = tidy[tidy["method"].eq("caat") & tidy["metric"].eq("robust_overfit_gap")].iloc[0]
    assert gap["mean"] == pytest.approx(0.02)
    assert "One run's binomial precision (Wilson 95%" in md
