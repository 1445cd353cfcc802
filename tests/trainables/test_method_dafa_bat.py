"""DAFA and BAT equal their official code from the same tensors (float64), and resume bit
for bit. The transcriptions, with repository, commit and file, are in
`reference_dafa_bat.py`; the starts are the project's own draws, handed to both (the
originals' attacks start from the unclipped x + 0.001 randn, the project from it clipped to
[0, 1], as `test_fidelity.py` does for TRADES)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import reference_dafa_bat as ref
import torch
import torch.nn.functional as F
from resume_support import Interrupt, StopAfter, flat_tensors
from torch import nn
from trial_support import tiny_config

from trainables import methods, models
from trainables.config import load_config
from trainables.methods import Batch, MethodData
from trainables.methods.bat import early_stopped_attack
from trainables.methods.dafa import class_similarity, dafa_weights, weight_epoch
from trainables.trial import DirectoryReporter, load_state, run_trial

C, N, SIDE = 10, 40, 12
RTOL, ATOL = 1e-5, 1e-9


@pytest.fixture(autouse=True)
def float64(request):
    if "fmnist_small" in request.fixturenames:  # the trials train in float32
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=RTOL, atol=ATOL)


def problem(seed: int = 0, fitted: bool = False):
    """A float64 small_cnn (with BatchNorm), briefly trained, and a batch of N images;
    ``fitted``: trained longer (once per session), so that BAT's attacks stop at varied
    iterates."""
    torch.manual_seed(seed)
    model = models.build("small_cnn", C, 1, input_shape=(1, SIDE, SIDE)).double()
    x = torch.rand(N, 1, SIDE, SIDE)
    y = torch.arange(N) % C
    if fitted:
        model.load_state_dict(_fitted_state(seed))
        return model, x, y
    warm = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        warm.zero_grad()
        F.cross_entropy(model(x), y).backward()
        warm.step()
    return model, x, y


@functools.lru_cache
def _fitted_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = models.build("small_cnn", C, 1, input_shape=(1, SIDE, SIDE)).double()
    x = torch.rand(N, 1, SIDE, SIDE)
    y = torch.arange(N) % C
    warm = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        warm.zero_grad()
        F.cross_entropy(model(x), y).backward()
        warm.step()
    return copy.deepcopy(model.state_dict())


def build(name: str, model: nn.Module, y: torch.Tensor, *, epochs: int = 5, **knobs):
    cfg = load_config({"dataset": {"name": "synthetic"}, "method": {"name": name, **knobs},
                       "optim": {"epochs": epochs}})
    data = MethodData(num_classes=C, train_labels=y, class_counts=torch.bincount(y, minlength=C),
                      meta_x=torch.rand(C, 1, SIDE, SIDE), meta_y=torch.arange(C),
                      device=y.device)
    return methods.build(name, model, cfg, data)


class TrainForwards:
    """The inputs and outputs of the model's train-mode forwards, in order."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if module.training:
            self.inputs.append(args[0].detach().clone())
            self.outputs.append(output.detach().clone())


def gaussian_start(x: torch.Tensor) -> torch.Tensor:
    """The project's TRADES start (`attacks._random_start` 'normal'), drawn the same way."""
    return 0.001 * torch.randn(x.shape, dtype=x.dtype)


def clipped(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x + start, 0.0, 1.0) - x


def assert_same_grads(loss_a, model_a, loss_b, model_b) -> None:
    ga = torch.autograd.grad(loss_a, list(model_a.parameters()))
    gb = torch.autograd.grad(loss_b, list(model_b.parameters()))
    for (name, _), a, b in zip(model_a.named_parameters(), ga, gb, strict=True):
        assert close(a, b), f"grad of {name}: max diff {float((a - b).abs().max()):.2e}"


# -------------------------------------------------------------------------------- DAFA


def test_weight_epoch_keeps_the_codes_proportion():
    assert weight_epoch(70 / 110, 110) == 70  # the code's --dafa_warmup 70 of 110
    assert weight_epoch(70 / 110, 3) == 2
    assert weight_epoch(70 / 110, 1) == 1
    assert weight_epoch(1 / 3, 3) == 1 and weight_epoch(1.0, 5) == 5


def test_dafa_weights_equal_calculate_class_weights():
    g = torch.Generator().manual_seed(3)
    k = 6
    labels = torch.arange(90) % k
    # Outputs leaning to the true class, some classes more than others: both branches.
    logits = 2 * torch.randn(90, k, generator=g) + 3 * torch.eye(k)[labels] * torch.linspace(
        0.2, 1.5, k)[labels].unsqueeze(1)
    probs = F.softmax(logits, dim=1)
    sums = torch.zeros(k, k).index_add_(0, labels, probs)
    got = dafa_weights(class_similarity(sums, torch.bincount(labels, minlength=k)), 1.5)
    want = ref.calculate_class_weights(probs.numpy(), labels.numpy(), lamb=1.5)
    assert close(got, torch.from_numpy(want)), (got, want)
    assert (got > 1).any() and (got < 1).any()


def test_dafa_step_equals_the_codes_trades_loss_at_given_weights():
    model, x, y = problem()
    ref_model = copy.deepcopy(model)
    method = build("dafa", model, y, eps=0.1, step_size=0.025, steps=5, beta=6.0)
    weights = torch.linspace(0.4, 1.7, C)  # bounds and steps both shrunk and widened
    method.load_state_dict({"class_weights": weights, "weights_set": True})
    seen = TrainForwards(model)
    model.train()
    torch.manual_seed(21)
    loss = method.step(Batch(x=x, y=y, idx=torch.arange(N)), lr=0.1).loss
    torch.manual_seed(21)
    start = clipped(x, gaussian_start(x))
    ref_loss, ref_adv, _ = ref.dafa_trades_loss(ref_model, x, y, start, weights,
                                                step_size=0.025, epsilon=0.1,
                                                perturb_steps=5, beta=6.0, n_class=C)
    # The code's order of the train-mode forwards: the adversarial batch, then the clean.
    assert close(seen.inputs[0], ref_adv) and torch.equal(seen.inputs[1], x)
    gap = (ref_adv - x).abs().flatten(1).max(1).values
    assert (gap > 0.1 + 1e-9).any() and (gap < 0.1 - 1e-3).any()  # class bounds in use
    assert close(loss, ref_loss)
    assert_same_grads(loss, model, ref_loss, ref_model)
    for (name, a), b in zip(model.named_buffers(), ref_model.buffers(), strict=True):
        assert close(a, b), name  # BatchNorm's running statistics, same order


def test_dafa_weights_come_once_from_the_weight_epochs_outputs():
    model, x, y = problem()
    lam = 1.5
    method = build("dafa", model, y, epochs=10, warmup_fraction=0.3, dafa_lambda=lam,
                   eps=0.1, steps=2)
    halves = [torch.arange(N // 2), torch.arange(N // 2, N)]
    seen = TrainForwards(model)

    def epoch(e, record=False):
        method.epoch_start(e)
        probs, labels = [], []
        for idx in halves:
            model.train()
            n_before = len(seen.outputs)
            method.step(Batch(x=x[idx], y=y[idx], idx=idx), lr=0.1)
            probs.append(F.softmax(seen.outputs[n_before], dim=1))  # the adversarial one
            labels.append(y[idx])
        return method.epoch_end(e), torch.cat(probs), torch.cat(labels)

    stats, _, _ = epoch(0)
    assert stats == {"class_weight_max": 1.0, "class_weight_min": 1.0, "dafa_weights_set": 0.0,
                     "train_class_dafa_weight": [1.0] * C, "train_class_dafa_eps": [0.1] * C}
    stats, probs, labels = epoch(2)  # weight_epoch(0.3, 10) = 3: the 0-based epoch 2
    want = ref.calculate_class_weights(probs.numpy(), labels.numpy(), lamb=lam)
    assert close(method.class_weights, torch.from_numpy(want))
    assert stats["dafa_weights_set"] == 1.0 and close(stats["train_class_dafa_weight"], want)
    assert close(stats["train_class_dafa_eps"], 0.1 * np.clip(want, 0, None))
    fixed = method.class_weights.clone()
    epoch(3)  # later epochs use the weights and never recompute them
    assert torch.equal(method.class_weights, fixed)


# --------------------------------------------------------------------------------- BAT


def _from_flags(outputs: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """The reference's outputs (in stopping order) back in the batch's order."""
    out = torch.empty_like(outputs)
    out[flags] = outputs
    return out


ATTACK = {"step_size": 0.03, "epsilon": 0.15, "perturb_steps": 6}
OURS = {"eps": 0.15, "step_size": 0.03, "steps": 6}


def _varied(res) -> None:
    """The stops are varied: some stop, some never do, at several iterates."""
    assert res.stopped.any() and not res.stopped.all()
    assert len(set(res.kept_at.tolist())) >= 3, res.kept_at


def test_last_clean_attack_equals_stop_to_lastclean_from_a_fixed_start():
    model, x, y = problem(fitted=True)
    start = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    lc = early_stopped_attack(model, x, y, keep="last_clean", init_delta=start, **OURS)
    adv, _, _, flags = ref.stop_to_lastclean(model, x, y, start, **ATTACK)
    assert close(lc.examples, _from_flags(adv, flags))
    _varied(lc)
    assert (lc.kept_at == 0).any()  # misclassified at the start: the start itself


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_first_adv_attack_equals_stop_to_firstadv_from_a_fixed_start(tau):
    model, x, y = problem(fitted=True)
    g = torch.Generator().manual_seed(5)
    start = 0.001 * torch.randn(x.shape, generator=g)
    index = torch.randperm(N, generator=g).tolist()
    fa = early_stopped_attack(model, x, y, keep="first_adv", tau=tau, init_delta=start,
                              **OURS)
    adv, _, _, flags = ref.stop_to_firstadv(model, x, y, start, index, tau=tau, **ATTACK)
    assert close(fa.examples, _from_flags(adv, flags[torch.tensor(index)]))
    _varied(fa)
    assert int(fa.kept_at.min()) == tau  # the (tau + 1)-th misclassified iterate, at best


def test_bat_step_equals_the_codes_train_step():
    model, x, y = problem(fitted=True)
    ref_model = copy.deepcopy(model)
    method = build("bat", model, y, eps=0.15, step_size=0.03, steps=6, beta=6.0)
    seen = TrainForwards(model)
    model.train()
    torch.manual_seed(31)
    out = method.step(Batch(x=x, y=y, idx=torch.arange(N)), lr=0.1)
    torch.manual_seed(31)  # the project draws the last-clean start, then the first-adv one
    start_lc, start_fa = clipped(x, gaussian_start(x)), clipped(x, gaussian_start(x))
    index = torch.randperm(N, generator=torch.Generator().manual_seed(7)).tolist()
    ref_loss, lc, lc_flags, fa, fa_order = ref.bat_train_loss(
        ref_model, x, y, start_lc, start_fa, index, step_size=0.03, epsilon=0.15,
        num_steps=6, beta=6.0, tau=1)
    # Train-mode forwards in the code's order: last clean, first adversarial, clean.
    assert close(seen.inputs[0], _from_flags(lc, lc_flags))
    assert close(seen.inputs[1], _from_flags(fa, fa_order))
    assert torch.equal(seen.inputs[2], x)
    assert close(out.loss, ref_loss)
    assert_same_grads(out.loss, model, ref_loss, ref_model)
    assert 0 < out.sums["bat_firstadv_stopped"] < N


def test_bat_without_uniform_terms_or_attack_steps_is_trades_at_the_clean_point():
    """uniform_weight 0 and eps 0: both examples are x, the loss CE(x) + beta KL(x || x)."""
    model, x, y = problem()
    method = build("bat", model, y, eps=0.0, step_size=0.01, steps=2, uniform_weight=0.0)
    model.train()
    loss = method.step(Batch(x=x, y=y, idx=torch.arange(N)), lr=0.1).loss
    model.train()
    assert close(loss, F.cross_entropy(model(x), y))


# ------------------------------------------------------------------------------ resume


# DAFA: weight_epoch(1/3, 3) = 1, so the weights are set in the first epoch, go into its
# checkpoint, and the resumed epochs 2 and 3 must train with them. Slow: six epochs in all
# (about 10 s per 3-epoch trial on one free core, minutes on a loaded 2-core CPU).
@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "dafa", "warmup_fraction": 1 / 3,
                                     "dafa_lambda": 1.5}, {"name": "bat"}],
                         ids=["dafa", "bat"])
def test_resume_equals_an_uninterrupted_run(tmp_path, fmnist_small, method):
    # A smaller slice than tiny_config's, validation only: six epochs of two attacks in all.
    cfg = tiny_config(method=method, optim={"epochs": 3}, dataset={"train_size": 384},
                      eval={"test": "none"})
    straight = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    with pytest.raises(Interrupt):
        run_trial(cfg, StopAfter(tmp_path / "b", 1), splits=fmnist_small)
    resumed = run_trial(cfg, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for a, b in zip(resumed.history, straight.history, strict=True):  # timings aside
        assert ({k: v for k, v in a.items() if k != "train_samples_per_s"}
                == {k: v for k, v in b.items() if k != "train_samples_per_s"})
    a = flat_tensors(load_state(tmp_path / "a" / "checkpoint")["method"])
    b = flat_tensors(load_state(tmp_path / "b" / "checkpoint")["method"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    if method["name"] == "dafa":
        assert a["weights_set"] is True and not torch.all(a["class_weights"] == 1)
        for key in ("train_class_dafa_weight_by_epoch", "train_class_dafa_eps_by_epoch"):
            assert len(resumed.metrics[key]) == 3
            assert resumed.metrics[key] == straight.metrics[key]
    else:
        assert 0 < resumed.metrics["bat_firstadv_stopped"] < 1
