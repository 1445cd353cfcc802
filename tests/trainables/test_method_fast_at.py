"""FGSM-RS, N-FGSM and the catastrophic-overfitting probe.

Equivalence: from the same model, batch and random start, each method's examples, loss and
gradient equal the transcription of its official code (`reference_fast_at.py`, repository,
commit and lines cited there), float64. The originals attack in train mode; the project in
eval mode: on a BatchNorm-free model (mlp) the two modes coincide and the transcription runs
as written; on small_cnn (BatchNorm) it runs its attack in eval mode, and the test shows
that mode is the only difference. Then: the probe's rule equals fast_adversarial's early
stop, its PGD relates to the code's exactly as documented, a trial resumes bit for bit, and
the flag rises on a collapse and not on a healthy run.
"""

from __future__ import annotations

import copy
import random

import pytest
import reference_fast_at as ref
import torch
import torch.nn.functional as F
from resume_support import Interrupt, StopAfter, flat_tensors, timeless
from torch import nn
from trial_support import tiny_config

from trainables import methods, models
from trainables.attacks import ce_per_sample, pgd
from trainables.config import load_config
from trainables.methods import Batch, MethodData
from trainables.methods import overfit as overfit_mod
from trainables.methods.fgsm_rs import fgsm_rs_examples
from trainables.methods.n_fgsm import n_fgsm_examples
from trainables.methods.overfit import OverfitProbe, collapsed, probe_subset
from trainables.trial import DirectoryReporter, load_state, method_data, run_trial

C, N, SIDE, EPS = 10, 40, 12, 0.1
TOL = {"rtol": 1e-10, "atol": 1e-12}


def problem(arch: str, seed: int = 0):
    """A float64 model after a few steps of training, and a batch with pixels at 0 and 1
    (so the [0, 1] clamps bite)."""
    torch.manual_seed(seed)
    model = models.build(arch, C, 1, input_shape=(1, SIDE, SIDE)).double()
    x = torch.rand(N, 1, SIDE, SIDE)
    x[:, :, :3] = 0.0
    x[:, :, -3:] = 1.0
    y = torch.arange(N) % C
    warm = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        warm.zero_grad()
        F.cross_entropy(model(x), y).backward()
        warm.step()
    return model, x, y


def build(name: str, model: nn.Module, y: torch.Tensor, **knobs):
    cfg = load_config({"dataset": {"name": "synthetic"},
                       "method": {"name": name, "eps": EPS, **knobs}})
    data = MethodData(num_classes=C, train_labels=y, class_counts=torch.bincount(y, minlength=C),
                      meta_x=torch.zeros(0, 1, SIDE, SIDE), meta_y=y[:0], device=y.device)
    return methods.build(name, model, cfg, data)


def method_loss(method, x, y, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's training loss on (x, y) with the global generator at ``seed``, and
    the uniform draw U[0, 1) its start is made of (the first draw after seeding)."""
    torch.manual_seed(seed)
    u = torch.rand(x.shape)
    torch.manual_seed(seed)
    method.model.train()
    return method.step(Batch(x=x, y=y, idx=torch.arange(len(y))), lr=0.1).loss, u


def grads(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def assert_same(ours_loss, ref_loss, ours_model, ref_model):
    assert torch.allclose(ours_loss, ref_loss, **TOL)
    for a, b in zip(grads(ours_loss, ours_model), grads(ref_loss, ref_model), strict=True):
        assert torch.allclose(a, b, **TOL)


# ------------------------------------------------------------------------- equivalence

CASES = [("mlp", "train"), ("small_cnn", "eval")]


@pytest.mark.parametrize("arch, attack_mode", CASES)
def test_fgsm_rs_equals_fast_adversarial(float64, arch, attack_mode):
    model, x, y = problem(arch)
    # Copies first: a train-mode forward moves BatchNorm's running statistics.
    twin, third = copy.deepcopy(model), copy.deepcopy(model)
    method = build("fgsm_rs", model, y)
    alpha = 1.25 * EPS
    assert method.step_size == pytest.approx(alpha)  # the code's 10/255 at 8/255
    loss, u = method_loss(method, x, y, seed=7)
    start = (2 * u - 1) * EPS  # the project's uniform draw, handed to the transcription
    ref_loss, ref_x = ref.fgsm_rs_step(twin, x, y, start, epsilon=EPS, alpha=alpha,
                                       attack_mode=attack_mode)
    assert_same(loss, ref_loss, model, twin)
    x_adv = fgsm_rs_examples(third, x, y, eps=EPS, step_size=alpha, noise=start)
    assert torch.allclose(x_adv, ref_x, **TOL)
    assert float((x_adv - x).abs().max()) <= EPS + 1e-12
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


@pytest.mark.parametrize("arch, attack_mode", CASES)
def test_n_fgsm_equals_the_official_code(float64, arch, attack_mode):
    model, x, y = problem(arch)
    # Copies first: a train-mode forward moves BatchNorm's running statistics.
    twin, third = copy.deepcopy(model), copy.deepcopy(model)
    method = build("n_fgsm", model, y)
    assert method.step_size == pytest.approx(EPS)  # alpha 8 at epsilon 8
    assert method.noise_radius == pytest.approx(2 * EPS)  # unif 2
    loss, u = method_loss(method, x, y, seed=7)
    start = (2 * u - 1) * 2 * EPS
    ref_loss, ref_x = ref.n_fgsm_step(twin, x, y, start, epsilon=EPS, alpha=EPS,
                                      attack_mode=attack_mode)
    assert_same(loss, ref_loss, model, twin)
    x_adv = n_fgsm_examples(third, x, y, noise=start, step_size=EPS)
    assert torch.allclose(x_adv, ref_x, **TOL)
    # No projection back to the eps ball: the perturbation reaches past eps, up to 3 eps.
    reach = float((x_adv - x).abs().max())
    assert EPS * 2 < reach <= 3 * EPS + 1e-12
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_the_attack_mode_is_the_only_difference_on_batchnorm(float64):
    # small_cnn: the transcription as written (train-mode attack) differs from the project,
    # which the eval-mode case above matches exactly; the README's fidelity table says so.
    model, x, y = problem("small_cnn")
    start = (2 * torch.rand(x.shape) - 1) * EPS
    ours = fgsm_rs_examples(model, x, y, eps=EPS, step_size=1.25 * EPS, noise=start)
    _, as_written = ref.fgsm_rs_step(copy.deepcopy(model), x, y, start, epsilon=EPS,
                                     alpha=1.25 * EPS, attack_mode="train")
    assert not torch.allclose(ours, as_written, **TOL)


# --------------------------------------------------------------------------- the probe


def test_rule_equals_fast_adversarials_early_stop():
    rng = random.Random(0)
    runs = [[0.45, 0.5, 0.29, 0.0], [0.3, 0.1, 0.0], [0.5, 0.31, 0.12, 0.0],
            [0.1, 0.2, 0.4], [0.5, 0.3, 0.3], []]
    runs += [[rng.choice([0.0, 0.1, 0.2, 0.3, 0.5, 0.6]) for _ in range(6)] for _ in range(200)]
    for accs in runs:
        previous, fired = overfit_mod.START_REFERENCE, None
        for epoch, acc in enumerate(accs):
            if fired is None and collapsed(acc, previous, 0.2):
                fired = epoch
            previous = acc
        assert fired == ref.early_stop_epoch(accs), accs


def scripted_probe(monkeypatch, accs, **knobs):
    """A probe whose PGD accuracies are ``accs`` in turn; returns each epoch's report."""
    values = iter(accs)
    monkeypatch.setattr(overfit_mod, "probe_accuracy", lambda *a, **k: (0.9, next(values)))
    cfg = load_config({"method": {"name": "fgsm_rs", **knobs}})
    y = torch.zeros(50, dtype=torch.long)
    data = MethodData(num_classes=C, train_labels=y, class_counts=torch.bincount(y),
                      meta_x=torch.zeros(0), meta_y=y[:0], device=y.device,
                      train_x=torch.zeros(50, 1, 2, 2))
    probe = OverfitProbe(cfg.method, data, eps=0.1, seed=0, batch_size=8)
    return [probe(nn.Identity(), e)["catastrophic_overfit"] for e in range(len(accs))]


def test_flag_latches_and_reference_best_catches_a_slow_collapse(monkeypatch):
    slow = [0.5, 0.35, 0.2, 0.05, 0.4]  # never 0.2 below the epoch before
    assert scripted_probe(monkeypatch, slow) == [0, 0, 0, 0, 0]
    assert scripted_probe(monkeypatch, slow, overfit_reference="best") == [0, 0, 1, 1, 1]
    assert scripted_probe(monkeypatch, [0.5, 0.1, 0.5]) == [0, 1, 1]  # latched
    assert scripted_probe(monkeypatch, [0.5, 0.1], overfit_drop=0.5) == [0, 0]


def test_probe_pgd_relates_to_the_codes_attack_pgd_as_documented(float64):
    # The code's attack_pgd freezes a sample once it is misclassified; the probe's PGD does
    # not. From the same start, the code's correct samples are exactly those the probe's PGD
    # gets right at every iterate (so the code's accuracy is at most the probe's).
    model, x, y = problem("mlp")
    start = (2 * torch.rand(x.shape) - 1) * 0.3
    iterates = [pgd(model, x, lambda z: ce_per_sample(z, y), eps=0.3, step_size=0.075,
                    steps=t, init_delta=start) for t in range(6)]
    right = torch.stack([model(z).argmax(1) == y for z in iterates])
    code = ref.attack_pgd_correct(model, x, y, start, epsilon=0.3, alpha=0.075,
                                  attack_iters=5)
    assert torch.equal(code, right.all(0))
    assert int(code.sum()) <= int(right[-1].sum())


def test_probe_subset_is_fixed_by_the_seed():
    a, b = probe_subset(1000, 64, seed=3), probe_subset(1000, 64, seed=3)
    assert torch.equal(a, b) and len(a.unique()) == 64 and int(a.max()) < 1000
    assert not torch.equal(a, probe_subset(1000, 64, seed=4))
    assert len(probe_subset(10, 64, seed=3)) == 10
    assert len(probe_subset(10, 0, seed=3)) == 0


# ----------------------------------------------------------------------------- trials


PROBE = {"probe_size": 128, "probe_steps": 2}


def trial_config(name: str, epochs: int) -> dict:
    # Validation only: the test split's evaluation is the trial loop's, not ours.
    return tiny_config(method={"name": name, **PROBE}, optim={"epochs": epochs},
                       eval={"test": "none", "max_samples": 100})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fgsm_rs", "n_fgsm"])
def test_resume_equals_an_uninterrupted_run(tmp_path, fmnist_small, name):
    cfg = trial_config(name, epochs=2)
    run = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    with pytest.raises(Interrupt):
        run_trial(cfg, StopAfter(tmp_path / "b", 1), splits=fmnist_small)
    resumed = run_trial(cfg, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert timeless(resumed.history) == timeless(run.history)  # every metric, every epoch
    a = flat_tensors(load_state(tmp_path / "a" / "checkpoint")["method"])
    b = flat_tensors(load_state(tmp_path / "b" / "checkpoint")["method"])
    assert a.keys() == {"probe.subset", "probe.previous", "probe.best", "probe.flag"}
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    # A healthy run: the probe is real and the flag stays down.
    for epoch in run.history:
        assert 0.05 < epoch["train_pgd_acc"] <= epoch["train_natural_acc"]
        assert epoch["catastrophic_overfit"] == 0.0


class Memoriser(nn.Module):
    """Right on the probe's clean images, wrong anywhere else: robustness collapsed to 0
    while clean accuracy is perfect, catastrophic overfitting's signature. Its gradient is
    zero (the model's output is flat), as a masked gradient is."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.x, self.y, self.num_classes = x.flatten(1), y, num_classes
        self.anchor = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        hit = torch.cdist(flat, self.x, compute_mode="donot_use_mm_for_euclid_dist").min(1)
        label = torch.where(hit.values == 0, self.y[hit.indices],
                            (self.y[hit.indices] + 1) % self.num_classes)
        return 10 * F.one_hot(label, self.num_classes).to(x.dtype) + 0 * flat.sum(1, keepdim=True)


def test_flag_rises_on_a_collapse_and_not_on_a_healthy_run(tmp_path, fmnist_small):
    # In a second, on the Fashion-MNIST slice (a real collapse takes minutes: the slow test
    # below): the probe measures a healthy trial's model, then a model whose robustness has
    # collapsed.
    cfg = trial_config("fgsm_rs", epochs=1)
    run = run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist_small)
    assert run.metrics["catastrophic_overfit"] == 0.0
    load = load_config(cfg)
    data = method_data(run.problem, torch.device("cpu"))
    probe = OverfitProbe(load.method, data, eps=load.train_eps, seed=0, batch_size=256)
    healthy = probe(run.model, 0)
    assert healthy["train_pgd_acc"] > 0.2 and healthy["catastrophic_overfit"] == 0.0
    pos = probe.subset
    collapse = Memoriser(data.train_x[pos], data.train_labels[pos], data.num_classes)
    after = probe(collapse, 1)
    assert after["train_natural_acc"] == 1.0 and after["train_pgd_acc"] == 0.0
    assert after["catastrophic_overfit"] == 1.0
    assert probe(run.model, 2)["catastrophic_overfit"] == 1.0  # latched


def overfit_run(tmp_path, **knobs) -> list[dict]:
    """Five epochs of N-FGSM at eps 0.2 (twice the dataset's bound) on 20000 Fashion-MNIST
    images, constant lr 0.05 after one ERM epoch, the probe measured from the best epoch so
    far: the per-epoch probe's readings."""
    cfg = {"dataset": {"name": "fashion_mnist", "train_size": 20000},
           "scenario": {"meta_per_class": 10, "val_per_class": 20},
           "init": {"erm_epochs": 1},
           "method": {"name": "n_fgsm", "eps": 0.2, "probe_size": 256,
                      "overfit_reference": "best", **knobs},
           "optim": {"epochs": 5, "batch_size": 128, "lr": 0.05, "schedule": "constant"},
           "eval": {"test": "none", "max_samples": 100, "steps": 2},
           "runtime": {"seed": 0, "device": "cpu", "threads": 1}}
    run = run_trial(cfg, DirectoryReporter(tmp_path))
    return [{k: e[k] for k in ("train_pgd_acc", "train_natural_acc", "catastrophic_overfit")}
            for e in run.history]


@pytest.mark.slow
def test_a_real_collapse_raises_the_flag_and_a_healthy_run_does_not(tmp_path):
    # Measured here (seed 0, 1 thread; about 2 min each): FGSM without a random start
    # (N-FGSM with no noise) at eps 0.2 collapses, probe PGD accuracy 0.33, 0.14, 0.07,
    # 0.02, 0.02 while clean accuracy climbs to 0.76, the flag up from epoch 3; N-FGSM's
    # default noise (k = 2) at the same eps and lr stays healthy, PGD 0.10 -> 0.19.
    # The assertions keep wide margins around those figures.
    collapse = overfit_run(tmp_path / "fgsm", noise_mult=0.0)
    assert max(e["train_pgd_acc"] for e in collapse) >= 0.2  # it was robust once
    assert collapse[-1]["train_pgd_acc"] < 0.1 < 0.5 < collapse[-1]["train_natural_acc"]
    assert collapse[-1]["catastrophic_overfit"] == 1.0
    healthy = overfit_run(tmp_path / "n_fgsm")
    assert healthy[-1]["train_pgd_acc"] > 0.1
    assert all(e["catastrophic_overfit"] == 0.0 for e in healthy), healthy
