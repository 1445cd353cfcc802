"""Scenarios: splits, stratified subsample, long-tailed imbalance and exact label noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trainables.config import load_config
from trainables.errors import ConfigError
from trainables.scenarios import (
    NOISE_TYPES,
    Scenario,
    ScenarioError,
    build_scenario,
    imbalance_counts,
    scenario_from_config,
    transition_matrix,
)

C = 10
PER_CLASS = 500
META, VAL = 10, 20


def pool(num_classes: int = C, per_class: int = PER_CLASS, shuffle_seed: int = 123) -> np.ndarray:
    # Shuffled so no test can pass by relying on the pool being sorted by class.
    y = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(shuffle_seed).permutation(y)


def build(y: np.ndarray | None = None, num_classes: int = C, **kw) -> Scenario:
    args = dict(noise_type="none", noise_rate=0.0, imbalance_ratio=1.0, meta_per_class=META,
                val_per_class=VAL, seed=0)
    args.update(kw)
    return build_scenario(pool(num_classes) if y is None else y, num_classes, **args)


def expected_noisy(counts: np.ndarray, rate: float) -> np.ndarray:
    return np.floor(rate * counts + 0.5).astype(int)


# ----------------------------------------------------------------------------- splits


def test_splits_disjoint_balanced_clean_and_cover_the_pool():
    y = pool()
    s = build(y, noise_type="uniform", noise_rate=0.4, seed=3)
    meta, val, train = set(s.meta_idx), set(s.val_idx), set(s.train_idx)
    assert not (meta & val) and not (meta & train) and not (val & train)
    # Ratio 1 and no train_size: every pool sample lands in exactly one split.
    assert len(meta) + len(val) + len(train) == y.size
    assert np.array_equal(np.bincount(y[s.meta_idx], minlength=C), np.full(C, META))
    assert np.array_equal(np.bincount(y[s.val_idx], minlength=C), np.full(C, VAL))
    # Noise only on training labels: clean_labels are the pool's labels.
    assert np.array_equal(s.clean_labels, y[s.train_idx])
    assert s.train_labels.shape == s.train_idx.shape == s.is_noisy.shape
    assert np.array_equal(s.is_noisy, s.train_labels != s.clean_labels)
    assert np.all(np.diff(s.train_idx) > 0)


def test_splits_are_random_not_the_first_samples():
    y = np.repeat(np.arange(C), PER_CLASS)  # sorted pool
    s = build(y)
    first_of_class = {c * PER_CLASS + i for c in range(C) for i in range(META)}
    assert set(s.meta_idx) != first_of_class


def test_class_too_small_for_meta_and_val_names_the_fields():
    y = np.concatenate([np.repeat(np.arange(C), PER_CLASS), np.full(5, 3)])
    y = y[y != 7]
    y = np.concatenate([y, np.full(25, 7)])  # class 7 has 25 < 10 + 20 + 1
    with pytest.raises(ScenarioError, match=r"scenario\.meta_per_class.*val_per_class.*class 7"):
        build(y)
    with pytest.raises(ScenarioError, match="class 7 has 25"):
        build(y)
    build(y, meta_per_class=4, val_per_class=20)  # 25 = 4 + 20 + 1: just enough


def test_scenario_error_is_a_config_error():
    assert issubclass(ScenarioError, ConfigError)


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("noise_type", ["uniform", "pair", "flip2"])
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.45])
def test_noise_is_realised_exactly_per_class(noise_type, rate):
    s = build(noise_type=noise_type, noise_rate=rate, imbalance_ratio=10.0, seed=1)
    counts = s.clean_class_counts
    noisy = np.bincount(s.clean_labels[s.is_noisy], minlength=C)
    assert np.array_equal(noisy, expected_noisy(counts, rate))
    assert s.realised_noise_rate == pytest.approx(expected_noisy(counts, rate).sum() / counts.sum())
    assert abs(s.realised_noise_rate - rate) < 0.01
    assert np.allclose(np.diag(s.transition), 1 - expected_noisy(counts, rate) / counts)
    assert np.allclose(s.transition.sum(axis=1), 1.0)


def test_uniform_spreads_off_diagonal_evenly_and_never_keeps_the_label():
    s = build(noise_type="uniform", noise_rate=0.4, seed=2)
    assert np.all(s.train_labels[s.is_noisy] != s.clean_labels[s.is_noisy])
    counts = np.zeros((C, C), dtype=int)
    np.add.at(counts, (s.clean_labels, s.train_labels), 1)
    off = counts[~np.eye(C, dtype=bool)].reshape(C, C - 1)
    # 188 corrupted per class over 9 others: 20 or 21 each.
    assert np.all(off.max(axis=1) - off.min(axis=1) <= 1)
    assert np.all(off.min(axis=1) >= 188 // (C - 1))


def test_uniform_targets_vary_between_classes_and_seeds():
    # Even spreading must not mean the same deterministic pattern everywhere.
    a = build(noise_type="uniform", noise_rate=0.2, seed=0)
    b = build(noise_type="uniform", noise_rate=0.2, seed=1)
    assert not np.array_equal(a.transition, b.transition)


def test_pair_moves_all_off_diagonal_mass_to_the_next_class():
    s = build(noise_type="pair", noise_rate=0.3, imbalance_ratio=10.0, seed=4)
    target = np.zeros((C, C))
    target[np.arange(C), (np.arange(C) + 1) % C] = 1
    off = s.transition * (1 - np.eye(C))
    assert np.allclose(off * (1 - target), 0.0)
    assert np.allclose(off.sum(axis=1), off[np.arange(C), (np.arange(C) + 1) % C])
    assert np.array_equal(s.train_labels[s.is_noisy], (s.clean_labels[s.is_noisy] + 1) % C)


def test_flip2_uses_exactly_two_other_classes_half_each():
    rate = 0.4
    s = build(noise_type="flip2", noise_rate=rate, seed=5)
    counts = np.zeros((C, C), dtype=int)
    np.add.at(counts, (s.clean_labels, s.train_labels), 1)
    k = expected_noisy(s.clean_class_counts, rate)
    for c in range(C):
        row = counts[c].copy()
        row[c] = 0
        targets = np.flatnonzero(row)
        assert targets.size == 2 and c not in targets
        assert sorted(row[targets]) == [k[c] // 2, k[c] - k[c] // 2]
        assert np.allclose(s.transition[c, targets], rate / 2, atol=1 / s.clean_class_counts[c])


def test_flip2_partners_depend_on_the_seed():
    def partners(seed):
        t = build(noise_type="flip2", noise_rate=0.2, seed=seed).transition * (1 - np.eye(C))
        return [set(np.flatnonzero(row)) for row in t]

    assert partners(0) == partners(0)
    assert partners(0) != partners(1)


def test_none_leaves_labels_unchanged():
    s = build(noise_type="none", imbalance_ratio=10.0)
    assert not s.is_noisy.any()
    assert np.array_equal(s.train_labels, s.clean_labels)
    assert np.array_equal(s.transition, np.eye(C))
    assert s.realised_noise_rate == 0.0
    assert np.array_equal(s.class_counts, s.clean_class_counts)


def test_class_counts_follow_observed_labels():
    s = build(noise_type="pair", noise_rate=0.3, imbalance_ratio=10.0)
    assert np.array_equal(s.class_counts, np.bincount(s.train_labels, minlength=C))
    assert np.array_equal(s.clean_class_counts, np.bincount(s.clean_labels, minlength=C))
    assert not np.array_equal(s.class_counts, s.clean_class_counts)


def test_noise_registry_lists_the_documented_types():
    assert set(NOISE_TYPES) == {"none", "uniform", "pair", "flip2"}


def test_lower_noise_rate_corrupts_a_subset_with_the_same_labels():
    for noise_type in ("uniform", "flip2", "pair"):
        lo = build(noise_type=noise_type, noise_rate=0.1, seed=7)
        hi = build(noise_type=noise_type, noise_rate=0.4, seed=7)
        assert np.array_equal(lo.train_idx, hi.train_idx)
        assert np.all(hi.is_noisy[lo.is_noisy])
        assert np.array_equal(lo.train_labels[lo.is_noisy], hi.train_labels[lo.is_noisy])


def test_transition_matrix_empty_rows_are_identity():
    t = transition_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 3)
    assert np.allclose(t, [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]])


# ----------------------------------------------------------------------------- imbalance


@pytest.mark.parametrize("ratio", [10.0, 100.0])
def test_imbalance_counts_match_the_formula(ratio):
    s = build(imbalance_ratio=ratio, seed=6)
    n_max = PER_CLASS - META - VAL
    # Independent of the implementation's formula: exact powers checked by hand below.
    expected = [max(1, math.floor(n_max * ratio ** (-c / (C - 1)) + 1e-9)) for c in range(C)]
    assert s.clean_class_counts.tolist() == expected
    assert s.clean_class_counts[0] == n_max  # class 0 is the head
    assert s.clean_class_counts[-1] == math.floor(n_max / ratio)  # tail is n_max / ratio
    assert np.all(np.diff(s.clean_class_counts) <= 0)


def test_imbalance_exact_values_by_hand():
    assert imbalance_counts(500, 3, 100.0).tolist() == [500, 50, 5]
    assert imbalance_counts(470, 10, 10.0)[[0, 9]].tolist() == [470, 47]
    assert imbalance_counts(500, 10, 1.0).tolist() == [500] * 10
    assert imbalance_counts(10, 5, 1e6).min() == 1  # never empties a class


def test_imbalance_ratio_one_keeps_everything():
    s = build(imbalance_ratio=1.0)
    assert s.clean_class_counts.tolist() == [PER_CLASS - META - VAL] * C


def test_larger_imbalance_keeps_a_subset_and_same_meta_val():
    a = build(imbalance_ratio=10.0, seed=8)
    b = build(imbalance_ratio=100.0, seed=8)
    assert set(b.train_idx) <= set(a.train_idx)
    assert np.array_equal(a.meta_idx, b.meta_idx) and np.array_equal(a.val_idx, b.val_idx)


def test_imbalance_on_uneven_pool_caps_at_available():
    # Class 0 is not the largest: the head target n_max exceeds what class 0 has.
    y = np.concatenate([np.full(100, 0), np.full(400, 1), np.full(300, 2)])
    s = build(y, num_classes=3, imbalance_ratio=4.0, meta_per_class=5, val_per_class=5)
    assert s.clean_class_counts.tolist() == [90, 390 // 2, 390 // 4]


# ----------------------------------------------------------------------------- train_size


def test_train_size_is_a_stratified_subsample():
    y = np.concatenate([np.full(1030, 0), np.full(530, 1), np.full(280, 2), np.full(130, 3)])
    s = build(y, num_classes=4, train_size=370)
    # Remaining pool 1000/500/250/100 (1850); 370 in proportion: 200/100/50/20.
    assert s.clean_class_counts.tolist() == [200, 100, 50, 20]
    assert s.train_idx.size == 370
    full = build(y, num_classes=4)
    assert set(s.train_idx) <= set(full.train_idx)
    assert np.array_equal(s.meta_idx, full.meta_idx)


def test_train_size_rounds_to_the_exact_total_and_then_imbalances():
    s = build(train_size=1001)
    assert s.train_idx.size == 1001
    assert s.clean_class_counts.max() - s.clean_class_counts.min() <= 1
    t = build(train_size=1000, imbalance_ratio=10.0)
    assert t.clean_class_counts[0] == 100 and t.clean_class_counts[-1] == 10


def test_train_size_too_large_names_the_field():
    with pytest.raises(ScenarioError, match=r"dataset\.train_size.*4700"):
        build(train_size=4701)
    with pytest.raises(ScenarioError, match=r"dataset\.train_size"):
        build(train_size=3)


# ----------------------------------------------------------------------------- determinism


def assert_same(a: Scenario, b: Scenario) -> None:
    for field in ("train_idx", "train_labels", "clean_labels", "is_noisy", "meta_idx",
                  "val_idx", "class_counts", "clean_class_counts", "transition"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_same_seed_same_scenario():
    kw = dict(noise_type="uniform", noise_rate=0.3, imbalance_ratio=10.0, seed=11)
    assert_same(build(**kw), build(**kw))


def test_different_seeds_differ():
    kw = dict(noise_type="uniform", noise_rate=0.3, imbalance_ratio=10.0)
    a, b = build(seed=0, **kw), build(seed=1, **kw)
    assert not np.array_equal(a.meta_idx, b.meta_idx)
    assert not np.array_equal(a.val_idx, b.val_idx)
    assert not np.array_equal(a.train_idx, b.train_idx)
    noisy_a = set(a.train_idx[a.is_noisy])
    assert noisy_a != set(b.train_idx[b.is_noisy])


def test_same_seed_same_splits_across_noise_settings():
    ref = build(noise_type="none", noise_rate=0.0, imbalance_ratio=10.0, seed=9)
    for noise_type, rate in (("uniform", 0.2), ("uniform", 0.6), ("pair", 0.4), ("flip2", 0.3)):
        s = build(noise_type=noise_type, noise_rate=rate, imbalance_ratio=10.0, seed=9)
        assert np.array_equal(s.meta_idx, ref.meta_idx)
        assert np.array_equal(s.val_idx, ref.val_idx)
        assert np.array_equal(s.train_idx, ref.train_idx)
        assert np.array_equal(s.clean_labels, ref.clean_labels)


# ----------------------------------------------------------------------------- scale, summary


def test_hundred_classes():
    c = 100
    y = pool(c, 60)
    s = build(y, num_classes=c, noise_type="uniform", noise_rate=0.4, imbalance_ratio=10.0,
              meta_per_class=5, val_per_class=5, seed=2)
    assert s.transition.shape == (c, c)
    assert np.allclose(s.transition.sum(axis=1), 1.0)
    assert s.clean_class_counts[0] == 50 and s.clean_class_counts[-1] == 5
    noisy = np.bincount(s.clean_labels[s.is_noisy], minlength=c)
    assert np.array_equal(noisy, expected_noisy(s.clean_class_counts, 0.4))
    assert np.array_equal(np.bincount(y[s.meta_idx], minlength=c), np.full(c, 5))
    f = build(y, num_classes=c, noise_type="flip2", noise_rate=0.4, meta_per_class=5,
              val_per_class=5)
    assert np.all(((f.transition > 0).sum(axis=1)) == 3)  # diagonal + two partners


def test_big_pool_uniform_noise_with_many_classes():
    c = 100
    y = pool(c, 600)
    s = build(y, num_classes=c, noise_type="uniform", noise_rate=0.45, meta_per_class=10,
              val_per_class=50, seed=3)
    k = expected_noisy(s.clean_class_counts, 0.45)
    counts = np.zeros((c, c), dtype=int)
    np.add.at(counts, (s.clean_labels, s.train_labels), 1)
    off = counts[~np.eye(c, dtype=bool)].reshape(c, c - 1)
    assert np.array_equal(off.sum(axis=1), k)
    assert np.all(off.max(axis=1) - off.min(axis=1) <= 1)


def test_summary_is_json_serialisable():
    s = build(noise_type="pair", noise_rate=0.2, imbalance_ratio=10.0)
    out = json.loads(json.dumps(s.summary()))
    assert out["class_counts"] == s.class_counts.tolist()
    assert out["clean_class_counts"] == s.clean_class_counts.tolist()
    assert out["realised_noise_rate"] == pytest.approx(s.realised_noise_rate)
    assert out["n_train"] == s.train_idx.size and out["n_meta"] == C * META
    assert out["noise_type"] == "pair" and out["num_classes"] == C


def test_from_config():
    cfg = load_config({"scenario": {"noise_type": "pair", "noise_rate": 0.2,
                                    "meta_per_class": META, "val_per_class": VAL},
                       "runtime": {"seed": 4}})
    s = scenario_from_config(pool(), C, cfg)
    assert_same(s, build(noise_type="pair", noise_rate=0.2, seed=4))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kw", "field"), [
    (dict(noise_rate=1.0, noise_type="uniform"), "scenario.noise_rate"),
    (dict(noise_rate=-0.1, noise_type="uniform"), "scenario.noise_rate"),
    (dict(noise_rate=0.2, noise_type="none"), "scenario.noise_rate"),
    (dict(noise_type="symmetric"), "scenario.noise_type"),
    (dict(imbalance_ratio=0.5), "scenario.imbalance_ratio"),
    (dict(imbalance_ratio=float("inf")), "scenario.imbalance_ratio"),
    (dict(meta_per_class=-1), "scenario.meta_per_class"),
    (dict(val_per_class=2.5), "scenario.val_per_class"),
    (dict(seed=-1), "runtime.seed"),
    (dict(train_size=0), "dataset.train_size"),
])
def test_bad_arguments_name_the_field(kw, field):
    with pytest.raises(ScenarioError) as info:
        build(**kw)
    msg = str(info.value)
    assert msg.startswith(field) and "\n" not in msg


def test_unknown_noise_type_lists_valid_names():
    with pytest.raises(ScenarioError, match="allowed: flip2, none, pair, uniform"):
        build(noise_type="sym", noise_rate=0.1)


def test_bad_labels_and_classes():
    with pytest.raises(ScenarioError, match=r"dataset\.num_classes"):
        build(num_classes=1, y=np.zeros(100, dtype=int))
    with pytest.raises(ScenarioError, match=r"dataset\.num_classes.*\[0, 10\)"):
        build(y=np.append(pool(), 10))
    with pytest.raises(ScenarioError, match=r"dataset\.num_classes"):
        build(y=np.append(pool(), -1))
    with pytest.raises(ScenarioError, match="labels"):
        build(y=pool().astype(float))
    with pytest.raises(ScenarioError, match="labels"):
        build(y=pool().reshape(10, -1))
    with pytest.raises(ScenarioError, match=r"scenario\.noise_type.*3 classes"):
        build(y=pool(2), num_classes=2, noise_type="flip2", noise_rate=0.2)
