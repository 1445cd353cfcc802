"""Best and last checkpoints (`eval.keep_best`): the best epoch is chosen on validation, its
weights are evaluated exactly as that epoch's test evaluation would have been, the state
resumes, and `eval.autoattack_samples: all` attacks the whole test split."""

from __future__ import annotations

import math

import pytest
import torch
from resume_support import Interrupt, StopAfter
from trial_support import tiny_config

from trainables.autoattack import evaluate_autoattack
from trainables.best import BestCheckpoint, improves
from trainables.metric_names import SCALAR_METRICS
from trainables.trial import (
    STREAM_AUTOATTACK_PGD,
    DirectoryReporter,
    epoch_generator,
    evaluate_splits,
    run_trial,
)


def test_improves_is_strict_and_never_takes_nan():
    assert improves(0.5, None, lower_is_better=False)
    assert improves(0.6, 0.5, False) and not improves(0.5, 0.5, False)  # ties: the earlier
    assert improves(0.4, 0.5, True) and not improves(0.6, 0.5, True)
    assert not improves(math.nan, None, False) and not improves(math.inf, 0.5, False)


def test_lower_is_better_follows_the_metric():
    assert BestCheckpoint("val_boundary_error").lower_is_better
    assert not BestCheckpoint("val_worst_class_robust_acc").lower_is_better


# ------------------------------------------------------------------------------ trials

AA = {"autoattack": "fast", "autoattack_targets": 1, "autoattack_samples": 40,
      "autoattack_best": True}


def overfitting_config(epochs: int = 12) -> dict:
    """PGD-AT on 600 images with 60% uniform label noise at a constant lr 0.05: measured here,
    validation robust accuracy 0.18, 0.29, 0.37, 0.38, 0.38, 0.41 (epoch 6), then 0.21-0.40,
    0.35 at epoch 12 (robust overfitting). The test split is evaluated whole every epoch, so
    each epoch's `test_*` is what its checkpoint would report."""
    return tiny_config(dataset={"test_size": 1000},
                       scenario={"noise_type": "uniform", "noise_rate": 0.6},
                       method={"name": "pgd_at"},
                       optim={"epochs": epochs, "lr": 0.05, "schedule": "constant"},
                       eval={"max_samples": None, **AA}, runtime={"threads": 1})


@pytest.mark.slow
def test_best_is_the_best_validation_epoch_and_last_is_the_last(tmp_path):
    cfg = overfitting_config()
    run = run_trial(cfg, DirectoryReporter(tmp_path / "a"))
    val = [e["val_robust_acc"] for e in run.history]
    best = run.metrics["best_epoch"]
    assert best == 1 + val.index(max(val))  # the first epoch with the highest value
    assert best < len(val), f"validation robust accuracy did not peak early: {val}"
    at_best, last = run.history[best - 1], run.history[-1]
    for m in SCALAR_METRICS:
        assert run.metrics[f"test_best_{m}"] == at_best[f"test_{m}"], m
        assert run.metrics[f"test_{m}"] == last[f"test_{m}"], m
    assert run.metrics["test_best_robust_acc"] != run.metrics["test_robust_acc"]
    # The class-wise twins are the best checkpoint's, on the same images.
    counts = torch.tensor(run.metrics["test_best_class_count"], dtype=torch.float64)
    assert counts.tolist() == run.metrics["test_class_count"] and counts.sum() == 1000
    per_class = torch.tensor(run.metrics["test_best_class_robust_acc"], dtype=torch.float64)
    assert math.isclose(float((per_class * counts).sum() / counts.sum()),
                        run.metrics["test_best_robust_acc"], rel_tol=1e-12)
    # AutoAttack on the best weights, with the best epoch's PGD stream.
    problem, model = run.problem, run.best.model(run.model)
    direct = evaluate_autoattack(run.config, model, problem, pgd_generator=epoch_generator(
        0, best - 1, STREAM_AUTOATTACK_PGD, torch.device("cpu")))
    for k in ("autoattack_acc", "pgd_autoattack_gap", "class_autoattack_acc"):
        assert run.metrics[f"test_best_{k}"] == direct[f"test_{k}"], k
    assert "test_best_autoattack_indices" not in run.metrics  # the records stay the last's
    # Killed after the best epoch and resumed: the best weights come back from the checkpoint.
    with pytest.raises(Interrupt):
        run_trial(cfg, StopAfter(tmp_path / "b", best + 1))
    resumed = run_trial(cfg, DirectoryReporter(tmp_path / "b"))
    assert {k: v for k, v in resumed.metrics.items() if "best" in k} == \
        {k: v for k, v in run.metrics.items() if "best" in k}
    for k, v in run.best.weights.items():
        assert torch.equal(v, resumed.best.weights[k]), k


def test_a_best_last_epoch_is_copied_and_keep_best_false_reports_none(tmp_path,
                                                                      fmnist_small):
    cfg = tiny_config(optim={"epochs": 1}, eval={"max_samples": 100})
    run = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    assert run.metrics["best_epoch"] == 1
    for k, v in run.metrics.items():
        if k.startswith("test_") and not k.startswith("test_best_"):
            assert run.metrics["test_best_" + k.removeprefix("test_")] == v, k
    off = tiny_config(optim={"epochs": 1}, eval={"keep_best": False})
    plain = run_trial(off, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    assert plain.best is None and not [k for k in plain.metrics if "best" in k]


def test_the_last_epoch_competes_on_the_subset_the_others_were_measured_on(tmp_path,
                                                                           fmnist_small):
    # 10 classes x 10 validation images, capped at 50 on intermediate epochs.
    cfg = tiny_config(optim={"epochs": 1}, eval={"max_samples": 50})
    run = run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist_small)
    assert len(run.problem.val_y) == 100
    subset = evaluate_splits(run.config, run.model, run.problem, 0, full=False, which=("val",))
    assert run.best.value == subset["val_robust_acc"]
    assert set(subset) == {k for k in subset if k.startswith("val_")}


def test_autoattack_samples_all_attacks_the_whole_test_split(tmp_path, fmnist_small):
    cfg = tiny_config(dataset={"test_size": 60}, optim={"epochs": 1},
                      eval={"autoattack": "fast", "autoattack_targets": 1,
                            "autoattack_samples": "all"})
    run = run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist_small)
    assert sorted(run.metrics["test_autoattack_indices"]) == sorted(run.problem.test_idx.tolist())
    assert run.metrics["test_class_autoattack_count"] == run.metrics["test_class_count"]
    assert sum(run.metrics["test_class_count"]) == 60
