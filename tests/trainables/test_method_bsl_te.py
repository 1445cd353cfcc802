"""AT-BSL and TE equal their official code from the same tensors (float64), and resume
bit for bit.

The official code is transcribed in `reference_bsl_te.py` (repository, commit and file cited
there). As in `test_fidelity.py`, a small_cnn with BatchNorm, one batch and one random start
go to the project's method and to the transcription on copies of the model; the examples,
the losses, their gradients and (TE) the per-sample averages must agree. The one deviation
both share with the project's PGD-AT and TRADES: the random start is clipped to [0, 1]
before the first step (the originals take the first gradient from the unclipped point), so
the transcription is handed the project's clipped start.

Checkpoints: AT-BSL's training scripts pick the best epoch by PGD accuracy on the test set
(`eval_adv_test_whitebox(model, device, test_loader)` from epoch 75 on); TE's `train_te.py`
saves the best test-set robust model. Nothing here does: the harness selects on the
validation split, and the test split is only reported.
"""

from __future__ import annotations

import copy
import io

import pytest
import reference_bsl_te as ref
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from resume_support import Interrupt, StopAfter
from torch import nn
from trial_support import tiny_config

from trainables import methods, models
from trainables.config import load_config
from trainables.errors import ConfigError
from trainables.methods import Batch, MethodData
from trainables.methods.te import rampup
from trainables.trial import DirectoryReporter, load_state, run_trial

C, N, SIDE = 10, 24, 12
RTOL, ATOL = 1e-5, 1e-9
# A long tail over the C classes (the prior AT-BSL adds), 132 training labels in all.
TAIL = torch.tensor([50, 30, 20, 12, 8, 5, 3, 2, 1, 1])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small_cnn trained a little (BatchNorm statistics not trivial) and N images."""
    torch.manual_seed(seed)
    model = models.build("small_cnn", C, 1, input_shape=(1, SIDE, SIDE))
    model = model.to(torch.get_default_dtype())
    x, y = torch.rand(N, 1, SIDE, SIDE), torch.arange(N) % C
    warm = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        warm.zero_grad()
        F.cross_entropy(model(x), y).backward()
        warm.step()
    return model, x, y


def build(name: str, model: nn.Module, train_y: torch.Tensor, epochs: int = 5,
          **knobs) -> methods.Method:
    cfg = load_config({"dataset": {"name": "synthetic"}, "method": {"name": name, **knobs},
                       "optim": {"epochs": epochs}})
    meta_y = torch.arange(C)
    data = MethodData(num_classes=C, train_labels=train_y,
                      class_counts=torch.bincount(train_y, minlength=C),
                      meta_x=torch.rand(C, 1, SIDE, SIDE), meta_y=meta_y,
                      device=train_y.device)
    return methods.build(name, model, cfg, data)


def grads(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True))


def assert_same_grads(a: list[torch.Tensor], b: list[torch.Tensor], model: nn.Module) -> None:
    for (name, _), ga, gb in zip(model.named_parameters(), a, b, strict=True):
        assert close(ga, gb), f"grad of {name}: max diff {max_diff(ga, gb):.2e}"


class TrainInputs:
    """The inputs of the model's train-mode forwards (the examples it trains on)."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if module.training:
            self.seen.append(args[0].detach().clone())


def uniform_start(x: torch.Tensor, eps: float) -> torch.Tensor:
    """`attacks._random_start`'s uniform draw, clipped to [0, 1] as the project clips it."""
    start = (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * eps
    return torch.clamp(x + start, 0.0, 1.0) - x


def gaussian_start(x: torch.Tensor) -> torch.Tensor:
    """0.001 * randn as the project draws it, clipped to [0, 1] as the project clips it."""
    start = 0.001 * torch.randn(x.shape, dtype=x.dtype)
    return torch.clamp(x + start, 0.0, 1.0) - x


def project_step(method: methods.Method, batch: Batch, seed: int) -> torch.Tensor:
    """The method's loss from the global seed ``seed``, reseeded after for the reference."""
    method.model.train()
    torch.manual_seed(seed)
    loss = method.step(batch, lr=0.1).loss
    torch.manual_seed(seed)
    return loss


# ---------------------------------------------------------------------------- AT-BSL

ATTACK = {"eps": 0.1, "step_size": 0.03, "steps": 3}


def test_at_bsl_equals_official_pgd_loss(float64):
    model, x, y = problem()
    ref_model = copy.deepcopy(model)
    train_y = torch.repeat_interleave(torch.arange(C), TAIL)
    method = build("at_bsl", model, train_y, **ATTACK)
    rec = TrainInputs(model)
    loss = project_step(method, Batch(x=x, y=y, idx=torch.arange(N)), seed=7)
    ref_model.train()
    ref_loss, ref_adv = ref.at_bsl_pgd_loss(ref_model, x, y, TAIL, gaussian_start(x),
                                            step_size=0.03, epsilon=0.1, perturb_steps=3)
    assert close(rec.seen[-1], ref_adv), max_diff(rec.seen[-1], ref_adv)
    assert close(loss, ref_loss)
    assert_same_grads(grads(loss, model), grads(ref_loss, ref_model), model)
    # The prior matters: plain CE on the same example is another loss.
    with torch.no_grad():
        plain = F.cross_entropy(ref_model(ref_adv), y)
    assert abs(plain.item() - ref_loss.item()) > 1e-2


def test_at_bsl_attack_ignores_the_prior_and_tau_zero_is_pgd_at(float64):
    model, x, y = problem()
    batch = Batch(x=x, y=y, idx=torch.arange(N))
    train_y = torch.repeat_interleave(torch.arange(C), TAIL)
    examples, losses = [], []
    for name, knobs in [("at_bsl", {"tau": 0.0, "random_start": "uniform"}),
                        ("pgd_at", {})]:
        m = copy.deepcopy(model)
        rec = TrainInputs(m)
        losses.append(project_step(build(name, m, train_y, **ATTACK, **knobs), batch, 5))
        examples.append(rec.seen[-1])
    assert torch.equal(examples[0], examples[1])
    assert close(losses[0], losses[1])


# -------------------------------------------------------------------------------- TE

TE_KNOBS = {"eps": 0.1, "step_size": 0.03, "steps": 2, "te_momentum": 0.9,
            "te_weight": 300.0, "beta": 6.0}


@pytest.mark.parametrize("base", ["pgd_at", "trades"])
def test_te_equals_official_across_the_ramp_up(float64, base):
    """Four epochs of one batch, with SGD steps between them: epoch 1 before the start
    (the base method, no averages), 2 at the start (weight 300 e^-5), 3 mid-ramp, 4 at
    full weight; samples meet their averages again in later epochs, among others."""
    epochs, lr = 4, 0.05
    model, x, y = problem()
    ref_model = copy.deepcopy(model)
    method = build("te", model, y, epochs=epochs, base=base, te_start=0.5, te_end=1.0,
                   **TE_KNOBS)
    # train_te.py's start_es, end_es: 0.5 and 1.0 of 4 epochs.
    start_es, end_es = 2, 4
    crit = (ref.PGDTE if base == "pgd_at" else ref.TRADESTE)(N, C, momentum=0.9, es=start_es)
    extra = {"beta": 6.0} if base == "trades" else {}
    rec = TrainInputs(model)
    order = torch.Generator().manual_seed(3)
    weights = []
    for epoch in range(epochs):
        method.epoch_start(epoch)
        weight = ref.sigmoid_rampup(epoch + 1, start_es, end_es) * 300.0
        assert method.weight == pytest.approx(weight, rel=1e-12, abs=0.0)
        weights.append(weight)
        # One batch an epoch, of half the samples: rows outside it must stay as they are.
        for i, idx in enumerate(torch.randperm(N, generator=order)[None, :N // 2]):
            batch = Batch(x=x[idx], y=y[idx], idx=idx)
            loss = project_step(method, batch, seed=100 * epoch + i)
            start = (uniform_start(x[idx], 0.1) if base == "pgd_at"
                     else gaussian_start(x[idx]))
            ref_model.train()
            ref_loss, ref_adv = crit(x[idx], y[idx], idx, epoch + 1, ref_model, weight, start,
                                     step_size=0.03, epsilon=0.1, perturb_steps=2, **extra)
            where = f"epoch {epoch + 1}, batch {i + 1}"
            assert close(rec.seen[-1], ref_adv), (where, max_diff(rec.seen[-1], ref_adv))
            assert close(loss, ref_loss), where
            assert close(method.averages, crit.soft_labels), where
            g, ref_g = grads(loss, model), grads(ref_loss, ref_model)
            assert_same_grads(g, ref_g, model)
            with torch.no_grad():  # the same SGD step on both, each from its own gradient
                for p, gp, rp, rgp in zip(model.parameters(), g, ref_model.parameters(),
                                          ref_g, strict=True):
                    p -= lr * gp
                    rp -= lr * rgp
        stats = method.epoch_end(epoch)
        assert stats["te_weight"] == method.weight
        assert ("te_label_agree" in stats) == (epoch + 1 >= start_es)
    assert weights[0] == 0.0 and 0.0 < weights[1] < weights[2] < weights[3] == 300.0
    assert bool((method.averages.sum(dim=1) > 0).any())


def test_te_schedule_is_train_te_py_over_200_epochs():
    """The default fractions (0.45, 0.75) are epochs 90 and 150 of the official 200."""
    knobs = load_config({"method": {"name": "te"}}).method
    for epoch in range(200):
        ramp = rampup(epoch, 200, knobs.te_start, knobs.te_end)
        official = ref.sigmoid_rampup(epoch + 1, 90, 150)
        assert (ramp is not None) == (epoch + 1 >= 90)  # loss.py: `epoch >= self.es`
        assert (ramp or 0.0) * knobs.te_weight == pytest.approx(official * 300, rel=1e-12)


@pytest.mark.parametrize("base", ["pgd_at", "trades"])
def test_te_before_its_start_is_its_base_method(float64, base):
    model, x, y = problem()
    batch = Batch(x=x, y=y, idx=torch.arange(N))
    attack = {k: TE_KNOBS[k] for k in ("eps", "step_size", "steps")}
    base_knobs = {"beta": 6.0} if base == "trades" else {}
    te = build("te", copy.deepcopy(model), y, base=base, **TE_KNOBS)
    plain = build(base, copy.deepcopy(model), y, **attack, **base_knobs)
    assert te.weight == 0.0 and not te.active  # epoch 1 of 5 < 0.45 * 5
    assert close(project_step(te, batch, 9), project_step(plain, batch, 9))
    assert not te.averages.any()


def test_te_knobs_and_state_checks(float64):
    with pytest.raises((ConfigError, ValidationError), match="te_end must be >= te_start"):
        load_config({"method": {"name": "te", "te_start": 0.6, "te_end": 0.5}})
    model, _, y = problem()
    method = build("te", model, y)
    with pytest.raises(ValueError, match="te averages"):
        method.load_state_dict({"averages": torch.zeros(N + 1, C)})
    saved = method.state_dict()
    method.averages += 1.0
    assert not torch.equal(saved["averages"], method.averages)  # a copy, not a view


# -------------------------------------------------------------------------- resume


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "train_samples_per_s"}


def te_epochs(method: methods.Method, model: nn.Module, opt: torch.optim.Optimizer,
              x: torch.Tensor, y: torch.Tensor, epochs: range) -> None:
    for epoch in epochs:
        method.epoch_start(epoch)
        for idx in torch.randperm(len(y))[None, :len(y) // 2]:
            model.train()
            loss = method.step(Batch(x=x[idx], y=y[idx], idx=idx), lr=0.05).loss
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize("base", ["pgd_at", "trades"])
def test_te_state_carries_a_run_across_a_restart(base):
    """The method-level half of the trial's resume (fast): TE rebuilt from its state after
    epoch 1 goes on exactly as the method that never stopped."""
    knobs = {**TE_KNOBS, "base": base, "te_start": 0.0, "te_end": 0.5}
    model, x, y = problem()
    runs = []
    for stop in (False, True):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        method = build("te", m, y, epochs=3, **knobs)
        torch.manual_seed(1)
        te_epochs(method, m, opt, x, y, range(1))
        if stop:  # through bytes, as a checkpoint: a fresh model, optimiser and method
            buf = io.BytesIO()
            torch.save({"model": m.state_dict(), "opt": opt.state_dict(),
                        "method": method.state_dict(), "rng": torch.get_rng_state()}, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
            m = copy.deepcopy(model)
            m.load_state_dict(state["model"])
            opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(state["opt"])
            method = build("te", m, y, epochs=3, **knobs)
            method.load_state_dict(state["method"])
            torch.set_rng_state(state["rng"])
        te_epochs(method, m, opt, x, y, range(1, 3))
        runs.append((m, method))
    (a, ma), (b, mb) = runs
    assert torch.equal(ma.averages, mb.averages) and bool(ma.averages.any())
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ma.epoch_end(2) == mb.epoch_end(2)


# TE starts at once (0.2 of 2 epochs) and ramps over the interruption, so its averages
# carry state across it.
RESUMED = [{"name": "at_bsl"}, {"name": "te", "te_start": 0.2, "te_end": 0.7},
           {"name": "te", "base": "trades", "te_start": 0.2, "te_end": 0.7}]


@pytest.mark.slow  # two trials of Fashion-MNIST each: minutes on a loaded 2-core CPU
@pytest.mark.parametrize("method", RESUMED, ids=["at_bsl", "te", "te_trades"])
def test_resume_equals_an_uninterrupted_run(tmp_path, fmnist_small, method):
    cfg = tiny_config(method=method, optim={"epochs": 2})
    straight = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    with pytest.raises(Interrupt):
        run_trial(cfg, StopAfter(tmp_path / "b", 1), splits=fmnist_small)
    resumed = run_trial(cfg, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert without_timing(got) == without_timing(want)
    a = load_state(tmp_path / "a" / "checkpoint")["method"]
    b = load_state(tmp_path / "b" / "checkpoint")["method"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if method["name"] == "te":
        assert bool((a["averages"].sum(dim=1) > 0).any())
        for key in ("te_weight", "te_label_agree", "te_mse"):
            assert resumed.metrics[key] == straight.metrics[key], key
