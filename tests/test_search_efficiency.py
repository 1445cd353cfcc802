"""benchmarks/search_efficiency.py: the best-so-far curve, the budget to reach a target and
the criterion, on synthetic trials checked by hand; the benchmark end to end (slow)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import search_efficiency as se  # noqa: E402

R = se.TrialRecord

# Handed-out order: 20 epochs at 0.5; pruned after 4; 20 epochs at 0.7; pruned after 12;
# 20 epochs at 0.6.
TRIALS = [R(20, 0.5), R(4, None), R(20, 0.7), R(12, None), R(20, 0.6)]


def test_best_so_far_counts_every_epoch_and_only_completed_values():
    assert se.best_so_far(TRIALS) == [(20, 0.5), (24, 0.5), (44, 0.7), (56, 0.7), (76, 0.7)]


def test_best_so_far_minimises_and_starts_unknown():
    curve = se.best_so_far([R(4, None), R(20, 0.3), R(20, 0.1), R(20, 0.2)], mode="min")
    assert curve == [(4, None), (24, 0.3), (44, 0.1), (64, 0.1)]


def test_best_within_a_budget():
    curve = se.best_so_far(TRIALS)
    assert se.best_within(curve, 10) is None  # nothing has ended within 10 epochs
    assert se.best_within(curve, 43) == 0.5
    assert se.best_within(curve, 44) == 0.7
    assert se.best_within(curve, 1000) == 0.7


def test_epochs_to_reach_a_target():
    curve = se.best_so_far(TRIALS)
    assert se.epochs_to_reach(curve, 0.5) == 20
    assert se.epochs_to_reach(curve, 0.69) == 44
    assert se.epochs_to_reach(curve, 0.71) is None
    low = se.best_so_far([R(20, 0.3), R(20, 0.1)], mode="min")
    assert se.epochs_to_reach(low, 0.2, mode="min") == 40


def test_a_pruned_trials_value_never_counts():
    # Optuna keeps a pruned trial's last intermediate value as its value: it must not count.
    dist = {"lr": FloatDistribution(0.01, 0.1)}
    trials = [create_trial(state=state, value=value, params={"lr": 0.05}, distributions=dist,
                           user_attrs={"ray_trial_id": tid}, intermediate_values=iv)
              for state, value, tid, iv in [
                  (TrialState.COMPLETE, 0.6, "b", {19: 0.6}),
                  (TrialState.PRUNED, 0.9, "a", {3: 0.9})]]
    trials[0].number, trials[1].number = 1, 0  # handed out: "a" first
    assert se.records(trials, {"a": 4, "b": 20}) == [R(4, None), R(20, 0.6)]


def full(values):
    """A random_full curve: every trial runs 20 epochs."""
    return se.best_so_far([R(20, v) for v in values])


def test_verdict_met():
    # random_full finds 0.70 (median of 0.70, 0.68, 0.72) with 8 x 20 = 160 trial-epochs.
    rf = [full([0.5, 0.6, 0.7, 0.6, 0.5, 0.6, 0.6, 0.5]), full([0.68] * 8),
          full([0.72] + [0.5] * 7)]
    # tpe_asha gets within 0.01 of 0.70 after 44, 64 and never (of 160): median 0.4.
    tpe = [se.best_so_far(TRIALS), se.best_so_far([R(4, None), R(20, 0.5), R(20, 0.5),
                                                    R(20, 0.695)]),
           se.best_so_far([R(20, 0.6)] * 8)]
    v = se.verdict(tpe, rf)
    assert v["target"] == pytest.approx(0.70) and v["budget"] == 160
    assert v["reach"]["tpe_asha"] == pytest.approx(64 / 160)
    assert v["met"]
    # Best within 80 trial-epochs: 0.7, 0.695 (64), 0.6 (80): median 0.695, 0.005 short.
    assert v["at_share"] == pytest.approx(0.695) and v["gap"] == pytest.approx(-0.005)


def test_verdict_missed_by_how_much():
    rf = [full([0.8] * 8)] * 3
    late = se.best_so_far([R(20, 0.6)] * 4 + [R(20, 0.795)] * 4)  # within 1 point at 100
    never = se.best_so_far([R(20, 0.75)] * 8)
    v = se.verdict([late, late, never], rf, others={"random_asha": [never] * 3})
    assert v["reach"]["tpe_asha"] == pytest.approx(100 / 160) and not v["met"]
    assert v["reach"]["random_asha"] == math.inf
    assert v["at_share"] == pytest.approx(0.6) and v["gap"] == pytest.approx(-0.2)


def test_subset_space_keeps_only_the_chosen_cells():
    raw = {"methods": ["erm", "caat"],
           "scenarios": [{"eps": 0.1}, {"eps": 0.2}, {"eps": 0.1, "methods": ["caat"]}]}
    out = se.subset_space(raw, ["a/erm", "b/caat", "c/caat"], ["a", "b", "c"])
    assert out["scenarios"] == [{"eps": 0.1, "methods": ["erm"]},
                                {"eps": 0.2, "methods": ["caat"]},
                                {"eps": 0.1, "methods": ["caat"]}]
    assert raw["scenarios"][0] == {"eps": 0.1}  # not edited in place


def test_search_spaces_differ_only_in_sampler_and_asha():
    base = {"asha": {"grace_period": 4}, "optuna": {"n_startup_trials": 3}, "confirm": {}}
    tpe, rand, rfull = (se.search_space(base, s, 7, 5, startup=2) for s in se.SEARCHES)
    assert tpe["optuna"] == {"n_startup_trials": 2, "seed": 7}
    assert rand["optuna"] == {"n_startup_trials": 3, "seed": 7, "sampler": "random"}
    assert rand["optuna"]["sampler"] == "random" and rand["asha"] == {"grace_period": 4}
    assert rfull["asha"] == {"grace_period": 4, "enabled": False}
    assert {s["trials_per_cell"] for s in (tpe, rand, rfull)} == {5}
    assert rfull["confirm"] == {"seeds": []} and rfull["name"] == "random_full-s7"


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "search_efficiency.py"),
           "--cells", "clean_ir-1_eps-0.1/erm,clean_ir-1_eps-0.1/pgd_at",
           "--trials-per-cell", "3", "--seeds", "1", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("tpe_asha", "random_full", "clean_ir-1_eps-0.1/pgd_at", "overall: met in"):
        assert line in out.stdout
    # A second run reuses the finished searches: the same figures, nothing rerun.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    table = [o.stdout.split("\nsearch ")[1].split("# this run")[0] for o in (out, again)]
    assert table[0] == table[1]
