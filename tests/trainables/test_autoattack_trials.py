"""benchmarks/autoattack_trials.py: AutoAttack after the fact on a saved trial reports what
the trial itself reports with `eval.autoattack`, and its cached result is tied to the model."""

import json
import sys
from pathlib import Path

import pytest
from trial_support import tiny_config

from trainables.models import save_checkpoint
from trainables.trial import DirectoryReporter, run_trial

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from autoattack_trials import attack_trial, read_result, settings  # noqa: E402

AA = {"autoattack": "fast", "autoattack_samples": 40, "autoattack_targets": 1}


@pytest.mark.slow
def test_posthoc_autoattack_equals_the_trials_own(tmp_path):
    cfg = tiny_config(dataset={"test_size": 300}, eval=AA)
    result = run_trial(cfg, DirectoryReporter(tmp_path / "run"))
    trial = tmp_path / "pair-0.4" / "erm" / "seed0"
    trial.mkdir(parents=True)
    # What benchmarks/noise_imbalance_table.py's run_one leaves: the config without
    # AutoAttack (the trials ran before it), metrics and the model.
    plain = tiny_config(dataset={"test_size": 300})
    (trial / "metrics.json").write_text(json.dumps({"config": plain}))
    save_checkpoint(result.model, trial / "model.pt")

    want = settings("fast", 40, 1)
    attack_trial(str(trial), want, threads=1)
    got = read_result(trial, want)
    m = result.metrics
    assert got["autoattack_indices"] == m["test_autoattack_indices"]
    assert len(got["autoattack_indices"]) == 40
    for key in ("autoattack_acc", "worst_class_autoattack_acc", "pgd_autoattack_gap",
                "autoattack_pgd_acc", "autoattack_natural_acc"):
        assert got[key] == pytest.approx(m[f"test_{key}"], abs=1e-12), key

    # Another attack setting, or another model in the trial directory: not this result.
    assert read_result(trial, settings("fast", 40, 2)) is None
    save_checkpoint(run_trial(tiny_config(runtime={"seed": 1}),
                              DirectoryReporter(tmp_path / "other")).model, trial / "model.pt")
    assert read_result(trial) is None
