"""CFA and WAT equal their official code from the same tensors (float64), and resume bit
for bit.

The official code is transcribed in `reference_cfa_wat.py` (repositories, commits and files
cited there). What is compared:
- CFA: the class bounds and class betas from given class accuracies (CCM, CCR, their start
  epoch); the step at those bounds and betas (loss, gradient, adversarial examples) and the
  class robust train accuracies it accumulates; the FAWA gate, update and choice of final
  weights over scripted epochs.
- WAT: the Hedge weights from given class losses over several epochs; the validation attack
  and losses behind them; the class-weighted TRADES step.

Every choice here reads the validation split (`MethodData.val_x`/`val_y`): CFA's FAWA gate
reads it as the code does, and its choice of the final average, which the code makes on the
test split, reads it too (`fawa_best`); WAT's class losses come from it as in the code. The
test split is never read. As in `test_fidelity.py`, the project's TRADES start is x + 0.001
* randn clipped to [0, 1]; the references get that very start.
"""

from __future__ import annotations

import copy

import pytest
import reference_cfa_wat as ref
import torch
import torch.nn.functional as F
from resume_support import Interrupt, StopAfter, flat_tensors
from torch import nn
from trial_support import tiny_config

from trainables import methods, models
from trainables.attacks import ce_per_sample, kl_per_sample
from trainables.config import load_config
from trainables.methods import Batch, MethodData
from trainables.methods.cfa import calibration_epoch, class_rates
from trainables.methods.wat import class_costs, hedge_weights
from trainables.trial import DirectoryReporter, load_state, run_trial

C, N, SIDE = 10, 40, 12
EPS, STEP, STEPS = 0.1, 0.025, 3
RTOL, ATOL = 1e-6, 1e-9


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL)


def problem(seed: int = 0):
    """A float64 small_cnn trained a little (BatchNorm statistics not trivial), a balanced
    batch and a balanced validation set."""
    torch.manual_seed(seed)
    model = models.build("small_cnn", C, 1, input_shape=(1, SIDE, SIDE)).double()
    warm = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.rand(N, 1, SIDE, SIDE), torch.arange(N) % C
    for _ in range(3):
        warm.zero_grad()
        F.cross_entropy(model(x), y).backward()
        warm.step()
    val_y = torch.arange(3 * C) % C
    return model, x, y, torch.rand(len(val_y), 1, SIDE, SIDE), val_y


def build(name: str, model: nn.Module, x, y, val_x=None, val_y=None, epochs: int = 20,
          **knobs):
    cfg = load_config({"dataset": {"name": "synthetic"}, "optim": {"epochs": epochs},
                       "method": {"name": name, "eps": EPS, "step_size": STEP,
                                  "steps": STEPS, **knobs},
                       "eval": {"eps": EPS, "steps": 2, "step_size": STEP}})
    data = MethodData(num_classes=C, train_labels=y, class_counts=torch.bincount(y, minlength=C),
                      meta_x=x[:C], meta_y=y[:C], device=x.device, train_x=x,
                      val_x=val_x, val_y=val_y)
    return methods.build(name, model, cfg, data), Batch(x=x, y=y, idx=torch.arange(len(y)))


def gaussian_start(x: torch.Tensor) -> torch.Tensor:
    """The project's TRADES start as it draws and clips it (see `test_fidelity.py`)."""
    start = 0.001 * torch.randn(x.shape, dtype=x.dtype)
    return torch.clamp(x + start, 0.0, 1.0) - x


def train_inputs(model: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    return seen


def assert_same_grads(loss_a, model_a, loss_b, model_b) -> None:
    ga = torch.autograd.grad(loss_a, list(model_a.parameters()))
    gb = torch.autograd.grad(loss_b, list(model_b.parameters()))
    for (name, _), a, b in zip(model_a.named_parameters(), ga, gb, strict=True):
        assert close(a, b), name


# ----------------------------------------------------------------------------------- CFA


@pytest.mark.parametrize("ccm, ccr", [(True, True), (True, False), (False, True)])
def test_cfa_class_eps_and_beta_equal_the_code(float64, ccm, ccr):
    model, x, y, _, _ = problem()
    method, _ = build("cfa", model, x, y, ccm=ccm, ccr=ccr, ccm_lambda=0.4, ccr_lambda=0.6,
                      beta=5.0)
    robust = torch.rand(C)
    method.class_robust = robust.clone()
    assert method.start == 1  # round(0.05 * 20) = 1
    for epoch in (0, 1, 7):
        method.epoch_start(epoch)
        eps_ref, beta_ref = ref.cfa_class_eps_beta(
            epoch, robust, eps=EPS, beta=5.0, lambda_1=0.4, lambda_2=0.6, begin=method.start,
            ccm=ccm, ccr=ccr)
        assert close(method.class_eps, eps_ref), epoch
        assert close(method.class_beta, beta_ref), epoch


def test_cfa_start_epoch_is_a_fraction_of_the_schedule():
    # CFA: --begin 10 of --epochs 200 (PreActResNet; 100 for WRN). At least 1: the first
    # calibration reads a finished epoch.
    assert calibration_epoch(0.05, 200) == 10
    assert calibration_epoch(0.05, 100) == 5
    assert calibration_epoch(0.05, 3) == 1
    assert calibration_epoch(0.0, 50) == 1


@pytest.mark.parametrize("loss_scale, factor", [("code", 1.0), ("trades", 7.0)])
def test_cfa_step_equals_cw_trades_loss(float64, loss_scale, factor):
    """``code``: the code's loss; ``trades`` (the default): it times 1 + beta."""
    model, x, y, _, _ = problem()
    ref_model = copy.deepcopy(model)
    method, batch = build("cfa", model, x, y, final_weights="model", beta=6.0,
                          loss_scale=loss_scale)
    method.class_robust = torch.rand(C)
    method.epoch_start(3)  # calibrated: class bounds from 0.5 eps to 1.5 eps
    assert method.class_eps.max() > method.class_eps.min()
    seen = train_inputs(model)
    model.train()
    torch.manual_seed(7)
    loss = method.step(batch, lr=0.1).loss
    torch.manual_seed(7)
    start = gaussian_start(x)
    ref_loss, robust_out, ref_x_adv = ref.cw_trades_loss(
        ref_model, x, y, start, method.class_eps, method.class_beta, step_size=STEP,
        perturb_steps=STEPS)
    ref_loss = factor * ref_loss
    assert close(loss, ref_loss)
    assert close(seen[1], ref_x_adv)
    assert_same_grads(loss, model, ref_loss, ref_model)
    # The next calibration's accuracies: train-mode outputs on the adversarial batch.
    assert close(class_rates(method.hits, method.counts),
                 ref.cw_log_robust([robust_out], [y], C))


def test_fawa_gate_update_and_final_weights_equal_the_code(float64, monkeypatch):
    """Six scripted epochs: the gate's worst-class accuracies and the averages' validation
    results are given; the model moves between epochs as training would move it."""
    model, x, y, val_x, val_y = problem()
    epochs = 6
    method, _ = build("cfa", model, x, y, val_x, val_y, epochs=epochs, fawa_threshold=0.3,
                      fawa_decay=0.8, final_weights="fawa_best", selection_start=0.5)
    gate = [0.1, 0.35, 0.2, 0.4, 0.5, 0.3]  # closed, first update, closed, open, open, ==
    averaged = {3: (0.5, 0.3), 4: (0.45, 0.2), 5: (0.52, 0.25)}  # (robust, worst class)
    now = {"epoch": 0}

    def validate(m):
        if m is method.model:
            return {"robust_acc": 0.5, "worst_class_robust_acc": gate[now["epoch"]]}
        robust, worst = averaged[now["epoch"]]
        return {"robust_acc": robust, "worst_class_robust_acc": worst}

    monkeypatch.setattr(method, "_validate", validate)
    torch.manual_seed(1)
    fawa_ref = models.build("small_cnn", C, 1, input_shape=(1, SIDE, SIDE)).double()
    seat_init, best, best_index = False, None, float("-inf")
    for epoch in range(epochs):
        now["epoch"] = epoch
        with torch.no_grad():  # "training": weights and BatchNorm statistics move
            for t in list(model.parameters()) + [b for b in model.buffers()
                                                 if b.is_floating_point()]:
                t.add_(0.1 * torch.randn_like(t))
        trained = copy.deepcopy(model)
        method.epoch_start(epoch)
        stats = method.epoch_end(epoch)
        seat_init = ref.fawa_epoch(fawa_ref, trained, torch.full((C,), gate[epoch]),
                                   threshold=0.3, decay_rate=0.8, seat_init=seat_init)
        assert stats["fawa_gate"] == float(gate[epoch] >= 0.3)
        if epoch >= 0.5 * epochs:  # the code's checkpoints, ranked here on validation
            robust, worst = averaged[epoch]
            index = ref.checkpoint_index(robust, torch.full((C,), worst))
            assert stats["fawa_val_index"] == pytest.approx(index)
            if index >= best_index:
                best_index, best = index, copy.deepcopy(fawa_ref.state_dict())
        if seat_init:
            for k, v in fawa_ref.state_dict().items():
                if v.is_floating_point():  # the code truncates averaged batch counters
                    assert close(method.average[k], v), (epoch, k)
        else:
            assert method.average is None
    assert stats["fawa_final_is_average"] == 1.0 and stats["fawa_updates"] == 4.0
    for k, v in best.items():  # the model the trial evaluates is the best average (epoch 3)
        if v.is_floating_point():
            assert close(model.state_dict()[k], v), k


# ----------------------------------------------------------------------------------- WAT


@pytest.mark.parametrize("eta", [0.1, 1.0])
def test_wat_hedge_weights_equal_the_code(float64, eta):
    torch.manual_seed(0)
    batch_size, n_batches, beta = 20, 3, 6.0
    nat_rows, bndy_rows, cumulative = [], [], torch.zeros(C + 1)
    for _ in range(4):
        batches = [(2 * torch.randn(batch_size, C), torch.randn(batch_size, C),
                    torch.randperm(batch_size) % C) for _ in range(n_batches)]
        nat, bndy = ref.validate_costs(batches, class_num=C, batch_size=batch_size)
        nat_rows.append(nat)
        bndy_rows.append(bndy)
        expected = ref.hedge_weights(torch.stack(nat_rows), torch.stack(bndy_rows), beta=beta,
                                     eta=eta, class_num=C)
        adv, natural, y = (torch.cat(t) for t in zip(*batches, strict=True))
        cumulative = cumulative + class_costs(ce_per_sample(natural, y),
                                              kl_per_sample(adv, natural), y, C, beta)
        assert close(hedge_weights(cumulative, eta), expected)


def test_wat_epoch_end_equals_validate_and_hedge(float64):
    model, x, y, val_x, val_y = problem()
    ref_model = copy.deepcopy(model)
    method, _ = build("wat", model, x, y, val_x, val_y, eta=0.2)  # one validation batch
    nat_rows, bndy_rows = [], []
    for epoch in range(2):
        torch.manual_seed(3 + epoch)
        stats = method.epoch_end(epoch)
        torch.manual_seed(3 + epoch)
        x_adv = ref.trades_attack(ref_model, val_x, gaussian_start(val_x), epsilon=EPS,
                                  step_size=STEP, num_steps=STEPS)
        ref_model.eval()
        with torch.no_grad():
            natural, adv = ref_model(val_x), ref_model(x_adv)
        nat, bndy = ref.validate_costs([(adv, natural, val_y)], class_num=C,
                                       batch_size=len(val_y))
        nat_rows.append(nat)
        bndy_rows.append(bndy)
        expected = ref.hedge_weights(torch.stack(nat_rows), torch.stack(bndy_rows), beta=6.0,
                                     eta=0.2, class_num=C)
        assert close(method.weights, expected), epoch
    assert stats["wat_class_weight"] == pytest.approx(expected[:C].tolist())


def test_wat_step_equals_the_code_s_weighted_trades_loss(float64):
    model, x, y, _, _ = problem()
    ref_model = copy.deepcopy(model)
    method, batch = build("wat", model, x, y)
    torch.manual_seed(4)
    method.weights = 0.5 + torch.rand(C + 1)
    seen = train_inputs(model)
    model.train()
    torch.manual_seed(5)
    loss = method.step(batch, lr=0.1).loss
    torch.manual_seed(5)
    x_adv = ref.trades_attack(ref_model, x, gaussian_start(x), epsilon=EPS, step_size=STEP,
                              num_steps=STEPS)
    ref_model.train()
    natural, adv = ref_model(x), ref_model(x_adv)
    ref_loss = ref.wat_train_loss(adv, natural, y, method.weights, method.weights, beta=6.0,
                                  class_num=C)
    assert close(seen[1], x_adv)
    assert close(loss, ref_loss)
    assert_same_grads(loss, model, ref_loss, ref_model)


# -------------------------------------------------------------------------------- resume


# CFA: the gate always open and every epoch a candidate, so the average, the best one and
# the class accuracies behind the calibrated bounds (from epoch 1) all cross the
# interruption; WAT: the cumulative losses and the weights.
@pytest.mark.parametrize("name, knobs, lists", [
    ("cfa", {"fawa_threshold": 0.0, "selection_start": 0.0}, ("cfa_class_eps",
                                                              "cfa_class_beta")),
    ("wat", {}, ("wat_class_weight", "wat_val_class_loss"))])
def test_resume_equals_an_uninterrupted_run(tmp_path, fmnist_small, name, knobs, lists):
    # Two epochs of 5 batches, validation only: the interruption after epoch 1 is what
    # counts, and the CPU budget is small.
    cfg = tiny_config(method={"name": name, **knobs}, optim={"epochs": 2},
                      dataset={"train_size": 320}, eval={"test": "none"})
    straight = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    with pytest.raises(Interrupt):
        run_trial(cfg, StopAfter(tmp_path / "b", 1), splits=fmnist_small)
    resumed = run_trial(cfg, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    def same(history):  # throughput is a timing, not a result
        return [{k: v for k, v in h.items() if k != "train_samples_per_s"} for h in history]

    assert same(resumed.history) == same(straight.history)
    for key in ("train_loss", "val_robust_acc", "val_worst_class_robust_acc", *lists):
        assert resumed.metrics[key] == straight.metrics[key], key
    a = flat_tensors(load_state(tmp_path / "a" / "checkpoint")["method"])
    b = flat_tensors(load_state(tmp_path / "b" / "checkpoint")["method"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    if name == "cfa":  # the model evaluated is the chosen average
        assert straight.metrics["fawa_final_is_average"] == 1.0
        assert straight.metrics["cfa_eps_max"] > straight.metrics["cfa_eps_min"]
        model = load_state(tmp_path / "a" / "checkpoint")["model"]
        best = load_state(tmp_path / "a" / "checkpoint")["method"]["best"]
        assert all(torch.equal(model[k], best[k]) for k in best if best[k].is_floating_point())
