"""AutoAttack beside PGD (`eval.autoattack`): subset, config, flags, trial wiring, masking."""

import json
import logging
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from trial_support import tiny_config

from trainables import autoattack as aa_mod
from trainables.autoattack import (
    autoattack_report,
    balanced_quota,
    check_classes,
    run_autoattack,
    stratified_subset,
)
from trainables.config import EvalConfig, load_config
from trainables.errors import ConfigError
from trainables.metric_names import (
    AUTOATTACK_CLASSWISE,
    AUTOATTACK_DETAILS,
    AUTOATTACK_METRICS,
    AUTOATTACK_RECORDS,
)
from trainables.scenarios import pick_test_subset
from trainables.trial import DirectoryReporter, prepare, run_trial

# ------------------------------------------------------------------------------ subset


def test_balanced_quota_is_equal_as_far_as_the_classes_allow():
    assert balanced_quota(np.array([50, 3, 40, 20]), 40).tolist() == [13, 3, 12, 12]
    assert balanced_quota(np.array([5, 5]), 100).tolist() == [5, 5]  # more than there is
    assert balanced_quota(np.array([7, 0, 7]), 5).tolist() == [3, 0, 2]


def test_stratified_subset_is_balanced_fixed_nested_and_seed_free():
    rng = np.random.default_rng(3)
    labels = rng.choice(4, size=500, p=[0.5, 0.02, 0.3, 0.18])
    pos = stratified_subset(labels, 60)
    counts = np.bincount(labels[pos], minlength=4)
    assert counts.sum() == 60
    assert counts[1] == np.bincount(labels)[1]  # the rare class gives all it has...
    assert counts[[0, 2, 3]].max() - counts[[0, 2, 3]].min() <= 1  # ...the rest share equally
    assert np.all(np.diff(pos) > 0) and pos.min() >= 0 and pos.max() < labels.size
    # No seed: the global RNGs (a trial's seed) do not move it.
    np.random.seed(123)
    torch.manual_seed(123)
    assert np.array_equal(stratified_subset(labels, 60), pos)
    assert set(pos) <= set(stratified_subset(labels, 90))
    assert np.array_equal(stratified_subset(labels, 10_000), np.arange(500))


def test_fashion_mnist_subset_has_equal_counts(fmnist):
    pos = stratified_subset(fmnist.test_y.numpy(), 1000)
    assert np.bincount(fmnist.test_y.numpy()[pos]).tolist() == [100] * 10


# ------------------------------------------------------------------------------ config


def test_config_keys_and_defaults():
    cfg = load_config(None, ["eval.autoattack=fast", "eval.autoattack_targets=5",
                             "eval.autoattack_samples=200"])
    assert (cfg.eval.autoattack, cfg.eval.autoattack_targets,
            cfg.eval.autoattack_samples) == ("fast", 5, 200)
    default = load_config().eval
    assert (default.autoattack, default.autoattack_targets,
            default.autoattack_samples) == ("none", 3, 1000)


@pytest.mark.parametrize("overrides, start", [
    (["eval.autoattack=apgd"], "eval.autoattack: allowed: 'none', 'fast' or 'standard'"),
    (["eval.autoattack_targets=0"], "eval.autoattack_targets:"),
    (["eval.autoattack_samples=0"], "eval.autoattack_samples:"),
    (["eval.autoattack=fast", "eval.test=none"], "eval.autoattack: fast attacks the test"),
])
def test_bad_config_fails_with_one_line(overrides, start):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(start) and "\n" not in str(err.value)


@pytest.mark.parametrize("eval_cfg, classes, field", [
    ({"autoattack": "fast", "autoattack_targets": 10}, 10, "eval.autoattack_targets: 10"),
    ({"autoattack": "fast", "autoattack_targets": 3}, 3, "eval.autoattack: APGD-T needs"),
    ({"autoattack": "standard"}, 9, "eval.autoattack: standard attacks 9"),
])
def test_targets_must_be_below_the_class_count(eval_cfg, classes, field):
    with pytest.raises(ConfigError) as err:
        check_classes(EvalConfig(**eval_cfg), classes)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
    check_classes(EvalConfig(autoattack="fast", autoattack_targets=9), 10)
    check_classes(EvalConfig(autoattack="standard"), 10)
    check_classes(EvalConfig(autoattack_targets=50), 2)  # none: nothing to check


def test_class_count_is_checked_when_the_data_loads_before_training():
    cfg = load_config({"dataset": {"name": "gmm", "num_classes": 5, "n_train": 300,
                                   "n_test": 100, "shape": [1, 4, 4]},
                       "model": {"arch": "linear"},
                       "eval": {"autoattack": "standard"}, "runtime": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="this dataset has 5"):
        prepare(cfg)


# ------------------------------------------------------------------------------ models


class Head(nn.Module):
    """A trained network behind an optional twist that fools or trips AutoAttack's checks."""

    def __init__(self, net: nn.Module, twist: str = "none"):
        super().__init__()
        self.net, self.twist = net, twist
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        if self.twist == "quantise":  # round has a zero gradient: masks it entirely
            x = torch.round(x * 4) / 4
        out = self.net(x)
        if self.twist == "softmax":
            return out.softmax(1)
        if self.twist == "noise":
            return out + torch.randn_like(out)
        if self.twist == "dropout":
            return self.dropout(out)
        if self.twist == "scale":
            # Logits x 1e4 saturate the softmax in fp32: the cross-entropy gradient is
            # exactly 0 and PGD cannot move, while a scale-free loss (APGD-T's DLR) still
            # finds the same adversarial examples as on the plain network.
            return out * 1e4
        return out


@pytest.fixture(scope="module")
def trained_mlp(fmnist_small):
    """An MLP trained naturally on 4000 Fashion-MNIST images (about a second)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = fmnist_small.train_x, fmnist_small.train_y
    for _ in range(5):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def test_images(fmnist_small):
    pick = torch.as_tensor(stratified_subset(fmnist_small.test_y.numpy(), 300))
    return fmnist_small.test_x[pick], fmnist_small.test_y[pick]


def report(model, x, y, *, eps=0.05, version="fast"):
    return autoattack_report(model, x, y, 10, eps=eps, version=version, targets=3, steps=20,
                             step_size=eps / 4, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- running


def test_fast_gives_sane_metrics_and_leaves_state_as_it_was(trained_mlp, test_images):
    x, y = test_images
    keep = y != 9  # an absent class: NaN in the class-wise list, as class_accuracy gives
    model = Head(trained_mlp).train()
    rng = torch.get_rng_state()
    out = report(model, x[keep], y[keep])
    assert torch.equal(torch.get_rng_state(), rng)  # pyautoattack reseeds torch: forked
    assert model.training and model.net.training  # attacked in eval mode, mode restored
    assert 0 <= out["autoattack_acc"] <= out["autoattack_natural_acc"]
    assert out["autoattack_acc"] <= out["autoattack_pgd_acc"] + 0.01
    cls = out["class_autoattack_acc"]
    assert len(cls) == 10 and math.isnan(cls[9])
    assert out["worst_class_autoattack_acc"] == min(c for c in cls if not math.isnan(c))
    assert out["pgd_autoattack_gap"] == pytest.approx(out["autoattack_pgd_acc"]
                                                      - out["autoattack_acc"])
    assert out["autoattack_flags"] == [] and out["autoattack_flag_count"] == 0
    # Seeded: the same model gives the same result.
    again = report(model, x[keep], y[keep])
    assert again["class_autoattack_acc"][:9] == cls[:9]


@pytest.mark.parametrize("twist, flagged", [
    ("none", None),
    ("noise", "randomized defense"),
    ("softmax", "probability distribution"),
    ("quantise", "zero gradient"),
    ("dropout", None),  # dropout is off in eval mode, where the attack runs: not random
])
def test_checks_flags_are_captured_not_printed(trained_mlp, test_images, twist, flagged,
                                               capfd, caplog):
    x, y = test_images
    caplog.set_level(logging.DEBUG)
    res = run_autoattack(Head(trained_mlp, twist).train(), x[:50], y[:50], eps=0.05,
                         version="fast", targets=3)
    if flagged is None:
        assert res.flags == []
    else:
        assert any(flagged in f for f in res.flags)
        assert len(res.flags) == len(set(res.flags))
        assert all("\n" not in f for f in res.flags)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert not [r for r in caplog.records if r.name == "auto-attack"]
    assert logging.getLogger("auto-attack").propagate


def test_pgd_autoattack_gap_exposes_masked_gradients(trained_mlp, test_images):
    x, y = test_images
    plain = report(Head(trained_mlp), x, y)
    masked = report(Head(trained_mlp, "scale"), x, y)
    # Measured (300 images, eps 0.05): plain PGD 0.423 vs AA 0.410 (gap 0.013); scaled PGD
    # 0.837 (it barely moves) vs AA 0.410, the plain network's own number (gap 0.427).
    assert plain["pgd_autoattack_gap"] < 0.03
    assert masked["pgd_autoattack_gap"] > 0.2
    assert masked["autoattack_acc"] == pytest.approx(plain["autoattack_acc"], abs=0.02)


# ------------------------------------------------------------------------------- trial


def test_trial_reports_autoattack_once_into_metrics_json(tmp_path, monkeypatch, fmnist):
    from sweeper.cli import main

    calls = []
    real = aa_mod.run_autoattack
    monkeypatch.setattr(aa_mod, "run_autoattack", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(dataset={"name": "fashion_mnist", "train_size": 600, "test_size": 300},
                      optim={"epochs": 2}, eval={"steps": 2, "max_samples": 200,
                                                  "autoattack": "fast",
                                                  "autoattack_samples": 50})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", str(tmp_path / "cfg.yaml"), "--out", str(out)]) == 0
    assert len(calls) == 1  # after the last epoch only
    written = json.loads((out / "metrics.json").read_text())
    for name in AUTOATTACK_METRICS + AUTOATTACK_CLASSWISE + AUTOATTACK_DETAILS + AUTOATTACK_RECORDS:
        assert name.removeprefix("test_") in written
    assert len(written["class_autoattack_acc"]) == 10
    assert written["autoattack_flags"] == []
    # Positions in the dataset's test split (not in the 300-image evaluated subset): 5 of
    # each class, all among the images the trial evaluates.
    idx = np.array(written["autoattack_indices"])
    labels = fmnist.test_y.numpy()
    assert np.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert set(idx) <= set(pick_test_subset(labels, 10, 300))
    assert idx.max() >= 300  # drawn from the whole split, not 0..299


def test_resume_after_the_last_epoch_keeps_autoattack_without_rerunning(
        tmp_path, monkeypatch, fmnist_small):
    calls = []
    real = aa_mod.run_autoattack
    monkeypatch.setattr(aa_mod, "run_autoattack", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny_config(eval={"steps": 2, "max_samples": 200, "autoattack": "fast",
                            "autoattack_samples": 30})
    first = run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist_small).metrics
    again = run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist_small).metrics
    assert len(calls) == 1
    keys = [k for k in first if "autoattack" in k]
    assert len(keys) == 10  # 4 scalars, 3 details, 2 records, the class counts
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}
    assert again["test_class_natural_acc"] == first["test_class_natural_acc"]


# -------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_pgd_at_model_autoattack_is_below_pgd_and_matches_torchattacks(tmp_path, fmnist):
    """A PGD-AT model (no masking): AutoAttack a little below PGD-20 on the same images, and
    a second implementation of the same attacks (torchattacks' APGD and APGD-T) agrees.

    Measured (mlp, 20000 images x 15 epochs, 500 test images, eps 0.1, ~2 min on 2 cores):
    PGD-20 0.652, AutoAttack fast 0.636 (gap 0.016), torchattacks 0.636."""
    torchattacks = pytest.importorskip(
        "torchattacks", reason="torchattacks (pip install --no-deps torchattacks==3.5.1) is "
        "the independent AutoAttack this test compares with")
    cfg = {"dataset": {"name": "fashion_mnist", "train_size": 20000, "test_size": 500},
           "scenario": {"meta_per_class": 5, "val_per_class": 10}, "model": {"arch": "mlp"},
           "method": {"name": "pgd_at", "steps": 5},
           "optim": {"epochs": 15, "batch_size": 128, "lr": 0.05},
           "eval": {"test": "final", "max_samples": 200, "autoattack": "fast",
                    "autoattack_samples": 500},
           "runtime": {"seed": 0, "device": "cpu"}}
    result = run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist)
    m = result.metrics
    assert m["test_autoattack_acc"] <= m["test_autoattack_pgd_acc"]
    assert m["test_pgd_autoattack_gap"] <= 0.03
    assert m["test_autoattack_acc"] > 0.4  # it is a robust model: a comparison worth making

    # The same images, from the dataset's test split through the recorded positions.
    idx = torch.as_tensor(m["test_autoattack_indices"])
    x, y = fmnist.test_x[idx], fmnist.test_y[idx]
    model = result.model.eval()
    eps = result.config.eval_eps
    ce = torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, seed=0,
                           loss="ce")
    targeted = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1,
                                  seed=0, n_classes=10)
    targeted.n_target_classes = 3  # as `fast`
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    for attack in (ce, targeted):
        adv = attack(x, y)
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            robust &= model(adv).argmax(1) == y
    assert robust.double().mean().item() == pytest.approx(m["test_autoattack_acc"], abs=0.015)


@pytest.mark.slow
def test_standard_square_breaks_quantised_inputs_that_fast_cannot(trained_mlp, test_images):
    """Rounding the input to quarters leaves no gradient: PGD and `fast` (both gradient
    attacks) barely move, and the zero-gradient check says so; `standard`'s Square attack
    needs no gradient and breaks it, and its own check flags the drop.

    Measured (300 images, eps 0.05): natural 0.823, PGD 0.820, fast 0.807, standard 0.613."""
    x, y = test_images
    masked = Head(trained_mlp, "quantise")
    fast = report(masked, x, y)
    standard = report(masked, x, y, version="standard")
    assert fast["pgd_autoattack_gap"] < 0.03
    assert any("zero gradient" in f for f in fast["autoattack_flags"])
    assert standard["pgd_autoattack_gap"] > 0.1
    assert any("Square Attack has decreased" in f for f in standard["autoattack_flags"])
