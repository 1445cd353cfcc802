"""The reported robust accuracy is reproduced by an independent PGD implementation."""

import sys
from pathlib import Path

import pytest
from trial_support import tiny_config

from trainables.trial import DirectoryReporter, run_trial

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from independent_pgd import independent_pgd_accuracy  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_independent_pgd_reproduces_reported_robust_accuracy(tmp_path, fmnist, method):
    from dataclasses import replace

    # 3000 test images: enough that two random starts agree to well within a point.
    splits = replace(fmnist, test_x=fmnist.test_x[:3000], test_y=fmnist.test_y[:3000])
    cfg = tiny_config(method={"name": method, "steps": 5},
                      dataset={"train_size": 3000}, optim={"epochs": 2},
                      eval={"steps": 20, "max_samples": 100})
    result = run_trial(cfg, DirectoryReporter(tmp_path), splits=splits)
    reported = result.metrics["test_robust_acc"]
    assert 0.2 < reported < result.metrics["test_natural_acc"]  # a real, non-trivial attack
    acc = independent_pgd_accuracy(result.model, result.problem.test_x, result.problem.test_y,
                                   eps=result.config.eval_eps,
                                   alpha=result.config.eval_step_size, iters=20)
    assert abs(acc - reported) <= 0.01, (acc, reported)
