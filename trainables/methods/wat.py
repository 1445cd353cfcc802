"""WAT (Li and Liu, AAAI 2023, "Improve the Worst-class Robustness in Adversarial
Training"): TRADES with class weights set by Hedge on the validation split, as the official
code has it (boqili/WAT `worst_class_adversarial_train.py`).

There are C + 1 experts: one per class and one for the whole distribution (the code's
"expected training loss in the decision set"). A batch's loss is

    mean_i(w[y_i] * l_i) + w[C] * mean_i(l_i),    l_i = CE(x_i) + beta * KL(x_i, x_adv_i)

(TRADES' loss, its clean branch with gradient). After every epoch the model is attacked on
the validation split with the training attack (TRADES' KL attack, eval mode), each class's
mean TRADES loss and the overall mean are added to their running totals L, and the weights
become w = C * softmax(eta * L): Hedge on the cumulative losses, every epoch from the first,
at the code's fixed rate. Before the first update every weight is 1, as in the code.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from trainables.attacks import ce_per_sample, eval_mode, kl_per_sample
from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.trades_common import trades_examples, weighted_trades_loss


class WATKnobs(TradesKnobs):
    name: Literal["wat"] = "wat"
    eta: float = Field(default=0.1, ge=0.0, description=(
        "Hedge rate on the cumulative class-wise validation TRADES losses (WAT's --eta)"))


# ------------------------------------------------------------------------------ the maths


def hedge_weights(cumulative: torch.Tensor, eta: float) -> torch.Tensor:
    """The C + 1 weights C * exp(eta L_k) / sum_j exp(eta L_j) (pure); softmax keeps the
    exponentials finite when the totals grow."""
    num_classes = cumulative.numel() - 1
    return num_classes * torch.softmax(eta * cumulative, dim=0)


def class_costs(ce: torch.Tensor, kl: torch.Tensor, y: torch.Tensor, num_classes: int,
                beta: float) -> torch.Tensor:
    """Each class's mean CE + beta * KL and, last, the mean over all samples (C + 1,)
    (pure). A class absent from ``y`` costs 0 (no evidence, no push)."""
    loss = ce + beta * kl
    sums = torch.bincount(y, weights=loss, minlength=num_classes)
    counts = torch.bincount(y, minlength=num_classes).to(loss.dtype)
    per_class = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    return torch.cat([per_class, loss.mean().reshape(1)])


def wat_loss(ce: torch.Tensor, kl: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
             beta: float) -> torch.Tensor:
    """mean(w[y] * (CE + beta KL)) + w[C] * mean(CE + beta KL) (pure)."""
    ones = torch.ones_like(ce)
    return weighted_trades_loss(ce, kl, ones, ones, beta, w=weights[y] + weights[-1])


def trades_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                 step_size: float, steps: int, batch_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample CE(x) and KL(f(x) || f(x_adv)) of ``model`` in eval mode, x_adv from
    TRADES' attack, in batches (the attack draws its start from the global generator)."""
    ce, kl = [], []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        x_adv = trades_examples(model, xb, eps=eps, step_size=step_size, steps=steps)
        with eval_mode(model), torch.no_grad():
            logits, logits_adv = model(xb), model(x_adv)
        ce.append(ce_per_sample(logits, yb))
        kl.append(kl_per_sample(logits_adv, logits))
    return torch.cat(ce), torch.cat(kl)


# ---------------------------------------------------------------------------- the method


class WAT(Method):
    name = "wat"
    knobs = WATKnobs

    def __init__(self, model: nn.Module, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        c = data.num_classes
        self.cumulative = torch.zeros(c + 1, device=data.device)
        self.weights = torch.ones(c + 1, device=data.device)
        self.last_costs = torch.zeros(c + 1, device=data.device)

    def step(self, batch: Batch, lr: float) -> StepResult:
        x, y = batch.x, batch.y
        x_adv = trades_examples(self.model, x, eps=self.eps, step_size=self.step_size,
                                steps=self.cfg.method.steps)
        logits, logits_adv = self.model(x), self.model(x_adv)
        loss = wat_loss(ce_per_sample(logits, y),
                        kl_per_sample(logits_adv, logits, detach_clean=False), y,
                        self.weights, self.cfg.method.beta)
        return StepResult(loss)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        if self.data.val_x is None or self.data.val_y is None:
            raise ValueError("wat: the class weights read the validation split, and this "
                             "trial has none")
        m, y = self.cfg.method, self.data.val_y
        ce, kl = trades_terms(self.model, self.data.val_x, y, eps=self.eps,
                              step_size=self.step_size, steps=m.steps,
                              batch_size=self.cfg.eval.batch_size)
        self.last_costs = class_costs(ce, kl, y, self.data.num_classes, m.beta).to(
            self.cumulative.dtype)
        self.cumulative = self.cumulative + self.last_costs
        self.weights = hedge_weights(self.cumulative, m.eta)
        w = self.weights[:-1]
        return {"wat_class_weight": w.tolist(), "wat_val_class_loss": self.last_costs[:-1].tolist(),
                "wat_weight_max": float(w.max()), "wat_weight_min": float(w.min()),
                "wat_weight_overall": float(self.weights[-1]),
                "wat_val_worst_class_loss": float(self.last_costs[:-1].max())}

    def state_dict(self) -> dict[str, Any]:
        return {"cumulative": self.cumulative.clone(), "weights": self.weights.clone(),
                "last_costs": self.last_costs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("cumulative", "weights", "last_costs"):
            saved = state[key]
            if saved.shape != getattr(self, key).shape:
                raise ValueError(f"wat {key}: checkpoint has shape {tuple(saved.shape)}, "
                                 f"this trial {tuple(getattr(self, key).shape)}")
            setattr(self, key, saved.to(self.data.device))
