"""Direction diagnostics: exact AUCs and shares from known scores, and end to end in a trial."""

import math

import numpy as np
import pytest
import torch

from trainables.diagnostics import (
    EpochSamples,
    class_means,
    direction_diagnostics,
    roc_auc,
)
from trainables.trial import DirectoryReporter, run_trial


def test_roc_auc_by_hand():
    # Pairs (positive, negative) ordered correctly: 5 of 6, one tie counting one half.
    score = np.array([0.9, 0.4, 0.4, 0.1, 0.8])
    positive = np.array([True, True, False, False, False])
    # positives 0.9 and 0.4 against negatives 0.4, 0.1, 0.8: 0.9 beats all three; 0.4 ties
    # 0.4 (1/2), beats 0.1, loses to 0.8 -> (3 + 1.5) / 6.
    assert roc_auc(score, positive) == pytest.approx(4.5 / 6)
    assert roc_auc(-score, positive) == pytest.approx(1.5 / 6)
    assert roc_auc(score, np.zeros(5, bool)) is None
    assert roc_auc(score, np.ones(5, bool)) is None


def test_direction_diagnostics_of_known_choices():
    anti = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=float)
    score = np.array([3.0, 2.0, -1.0, 0.5, 1.0, -2.0, -3.0, 0.0])
    noisy = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    eps = np.array([0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.3, 0.1])
    pref = np.array([np.nan, 1.0, 2.0, -1.0, np.nan, np.nan, 0.0, -2.0])
    out = direction_diagnostics({"anti": anti, "anti_score": score, "eps": eps,
                                 "meta_pref": pref}, labels, noisy, num_classes=4)
    assert out["frac_anti_noisy"] == pytest.approx(2 / 3)
    assert out["frac_anti_clean"] == pytest.approx(1 / 5)
    # Noisy scores 3, 2, -1 against clean 0.5, 1, -2, -3, 0: 5 + 5 + 2 = 12 of 15.
    assert out["anti_noisy_auc"] == pytest.approx(12 / 15)
    # Only the samples of meta-step batches: noisy 1, 2 against clean -1, 0, -2: all above.
    assert out["meta_pref_noisy_auc"] == pytest.approx(1.0)
    assert out["train_class_frac_anti"][:3] == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert math.isnan(out["train_class_frac_anti"][3])  # no sample of class 3
    assert out["train_class_mean_eps"][:3] == pytest.approx([0.1, 0.2, 0.3])


def test_without_noise_there_is_no_noisy_share_and_no_auc():
    out = direction_diagnostics({"anti": np.array([1.0, 0.0]), "anti_score": np.ones(2)},
                                np.array([0, 1]), np.zeros(2, bool), num_classes=2)
    assert out == {"frac_anti_clean": 0.5, "train_class_frac_anti": [1.0, 0.0]}


def test_class_means_skip_empty_classes():
    means = class_means(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 2]), 3)
    assert means[0] == 2.0 and math.isnan(means[1]) and means[2] == 5.0


def test_epoch_samples_gather_by_position():
    log = EpochSamples(6)
    log.add(torch.tensor([4, 1]), {"anti": torch.tensor([1.0, 0.0]),
                                   "meta_pref": torch.tensor([0.5, -0.5])})
    log.add(torch.tensor([0, 3]), {"anti": torch.tensor([True, False])})
    pos, values = log.arrays()
    assert pos.tolist() == [0, 1, 3, 4]  # 2 and 5 never seen (a dropped partial batch)
    assert values["anti"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert np.isnan(values["meta_pref"][[0, 2]]).all()
    assert values["meta_pref"][[1, 3]].tolist() == [-0.5, 0.5]


def gmm_trial(**method) -> dict:
    """A Gaussian mixture that a linear model separates well, 20% uniform label noise, an
    ERM warm start: afterwards, noisy labels are exactly the high-loss ones."""
    return {
        "dataset": {"name": "gmm", "shape": [1, 1, 8], "num_classes": 3, "n_train": 900,
                    "n_test": 90, "gmm_spread": 0.05, "gmm_spread_ratio": 1.0},
        "scenario": {"noise_type": "uniform", "noise_rate": 0.2, "meta_per_class": 5,
                     "val_per_class": 10},
        "model": {"arch": "mlp"},
        "method": {"name": "caat", "steps": 2, **method},
        "init": {"erm_epochs": 3},
        "optim": {"epochs": 2, "batch_size": 50, "lr": 0.05},
        "eval": {"steps": 2},
        "runtime": {"seed": 0, "device": "cpu"},
    }


def test_loss_rank_finds_the_noisy_labels_a_loss_threshold_separates(tmp_path):
    seen = []
    run_trial(gmm_trial(direction_policy="loss_rank", anti_fraction=0.2),
              DirectoryReporter(tmp_path, on_report=seen.append))
    for m in seen:
        assert m["anti_noisy_auc"] > 0.9, m["anti_noisy_auc"]
        assert m["frac_anti"] == pytest.approx(0.2, abs=0.02)
        assert m["frac_anti_noisy"] > 0.6 > 0.1 > m["frac_anti_clean"]
        assert len(m["train_class_frac_anti"]) == len(m["train_class_mean_eps"]) == 3
        assert "meta_grad_norm" not in m and "meta_pref_noisy_auc" not in m  # no meta steps
    assert len(seen[-1]["train_class_frac_anti_by_epoch"]) == 2
    assert seen[-1]["train_class_frac_anti_by_epoch"][1] == seen[-1]["train_class_frac_anti"]


def test_meta_policy_reports_meta_diagnostics(tmp_path):
    seen = []
    run_trial(gmm_trial(meta_interval=2), DirectoryReporter(tmp_path, on_report=seen.append))
    for m in seen:
        for key in ("frac_anti_noisy", "frac_anti_clean", "anti_noisy_auc",
                    "meta_pref_noisy_auc", "meta_grad_norm", "meta_active_frac"):
            assert key in m and math.isfinite(m[key]), key
        assert 0 <= m["meta_active_frac"] <= 1 and m["meta_grad_norm"] > 0
    # The adversarial start: the first epoch begins with no sample anti-adversarial.
    assert seen[0]["frac_anti"] < 0.5
