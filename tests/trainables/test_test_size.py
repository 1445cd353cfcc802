"""dataset.test_size: a class-stratified test subset, the same for every trial and seed."""

from __future__ import annotations

import numpy as np
import torch
from trial_support import tiny_config

from trainables.config import load_config
from trainables.scenarios import pick_test_subset
from trainables.trial import build_problem


def test_subset_keeps_class_proportions_and_is_fixed():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    idx = pick_test_subset(labels, 4, 50)
    assert idx.size == 50 and np.all(np.diff(idx) > 0)
    # Largest remainders; ties go to the lower class.
    assert np.bincount(labels[idx], minlength=4).tolist() == [25, 13, 7, 5]
    assert np.array_equal(idx, pick_test_subset(labels, 4, 50))
    assert pick_test_subset(labels, 4, 500).size == 200  # larger than the split: all of it


def test_trials_of_any_seed_evaluate_the_same_test_subset(fmnist_small):
    problems = [build_problem(load_config(tiny_config(
        dataset={"test_size": 300}, runtime={"seed": seed})), torch.device("cpu"),
        fmnist_small) for seed in (0, 1)]
    assert all(len(p.test_y) == 300 for p in problems)
    assert torch.equal(problems[0].test_x, problems[1].test_x)
    counts = torch.bincount(problems[0].test_y, minlength=10)
    expected = 300 * torch.bincount(fmnist_small.test_y, minlength=10) / len(fmnist_small.test_y)
    assert torch.all((counts - expected).abs() < 1)
