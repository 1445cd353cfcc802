"""TE, temporal ensembling (Dong et al., ICLR 2022): PGD-AT or TRADES held to a running
average of the model's own past predictions, against memorising noisy labels.

Every training sample i keeps an exponential moving average of the model's clean
predictions (eval mode, before the attack) over the batches it was in:

    s_i <- m * s_i + (1 - m) * softmax(f(x_i)),      target t_i = s_i / sum_c s_ic,

s_i starting at zero, so the normalisation undoes the start's bias. From `te_start` of the
run on, the base loss gains  w(epoch) * mean_(i,c) (softmax(f(.))_ic - t_ic)^2 , on the
adversarial example for PGD-AT and on the clean one for TRADES, and the attack ascends the
base attack's loss plus the same term (as the official `loss.py`). Once a sample's labels
are being memorised, its target still carries what the model predicted before, so the
penalty pulls against fitting a wrong label. The weight ramps up with Laine and Aila's
sigmoid schedule, exp(-5 (1 - t)^2), from `te_start` to `te_end`; the official epochs 90
and 150 of 200 are here fractions of the run (0.45, 0.75), so any length keeps its shape.

The averages, one row per training sample (indexed by `Batch.idx`), are the method's state:
a resumed trial continues with the very targets it had.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from trainables.attacks import ce_per_sample, eval_mode, kl_per_sample, pgd
from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.trades_common import trades_loss

if TYPE_CHECKING:
    from trainables.config import TrialConfig


class TEKnobs(TradesKnobs):
    """TE's knobs; the defaults are `train_te.py`'s (beta is TRADES', read with base: trades)."""

    name: Literal["te"] = "te"
    base: Literal["pgd_at", "trades"] = Field(default="pgd_at", description=(
        "the loss TE extends: PGD-AT (the official default) or TRADES"))
    te_momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description=(
        "momentum of the per-sample average of predictions"))
    te_weight: float = Field(default=300.0, ge=0.0, description=(
        "weight of the squared error to the target (a mean over samples and classes) once "
        "ramped up"))
    te_start: float = Field(default=0.45, ge=0.0, le=1.0, description=(
        "fraction of the epochs after which the averages and the penalty start (90 of 200)"))
    te_end: float = Field(default=0.75, ge=0.0, le=1.0, description=(
        "fraction of the epochs by which the weight has ramped up (150 of 200)"))

    @model_validator(mode="after")
    def _ramp_ordered(self) -> TEKnobs:
        if self.te_end < self.te_start:
            raise ValueError("te_end must be >= te_start")
        return self


def rampup(epoch: int, epochs: int, start: float, end: float) -> float | None:
    """The ramp of 0-based ``epoch`` of ``epochs``: None before ``start`` (no averages, no
    penalty), then exp(-5 (1 - t)^2), t going 0 -> 1 from ``start`` to ``end``, then 1
    (pure). As the official schedule, on the 1-based epoch and bounds start/end * epochs."""
    current, lo, hi = epoch + 1, start * epochs, end * epochs
    if current < lo:
        return None
    if current >= hi:  # also lo == hi, where the official formula would divide by zero
        return 1.0
    return math.exp(-5.0 * (1.0 - (current - lo) / (hi - lo)) ** 2)


def update_targets(averages: torch.Tensor, idx: torch.Tensor, logits: torch.Tensor,
                   momentum: float) -> torch.Tensor:
    """Fold softmax(logits) into rows ``idx`` of ``averages`` (in place) and return those
    rows normalised to sum to one: the batch's targets."""
    rows = momentum * averages[idx] + (1.0 - momentum) * F.softmax(logits.detach(), dim=1)
    averages[idx] = rows
    return rows / rows.sum(dim=1, keepdim=True)


def te_penalty(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean over classes of (softmax(logits) - targets)^2, shape (B,); its
    batch mean is the official `((softmax - soft_labels) ** 2).mean()`."""
    return ((F.softmax(logits, dim=1) - targets) ** 2).mean(dim=1)


class TE(Method):
    name = "te"
    knobs = TEKnobs

    def __init__(self, model: nn.Module, cfg: TrialConfig, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.averages = torch.zeros(len(data.train_labels), data.num_classes,
                                    device=data.device)
        self.epoch_start(0)

    def epoch_start(self, epoch: int) -> None:
        m = self.cfg.method
        ramp = rampup(epoch, self.cfg.optim.epochs, m.te_start, m.te_end)
        self.active = ramp is not None
        self.weight = m.te_weight * ramp if self.active else 0.0

    def step(self, batch: Batch, lr: float) -> StepResult:
        m, x, y = self.cfg.method, batch.x, batch.y
        with eval_mode(self.model), torch.no_grad():
            logits_eval = self.model(x)  # the averages' input, and TRADES' attack target
        targets = (update_targets(self.averages, batch.idx, logits_eval, m.te_momentum)
                   if self.active else None)
        w = self.weight

        def penalised(base: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            return base if targets is None else base + w * te_penalty(logits, targets)

        if m.base == "pgd_at":
            x_adv = pgd(self.model, x, lambda z: penalised(ce_per_sample(z, y), z),
                        eps=self.eps, step_size=self.step_size, steps=m.steps,
                        random_start="uniform")
            logits = self.model(x_adv)
            loss, held = F.cross_entropy(logits, y), logits
        else:
            # beta scales the KL only once the penalty joins it (the official attack).
            scale = 1.0 if targets is None else m.beta
            x_adv = pgd(self.model, x,
                        lambda z: penalised(scale * kl_per_sample(z, logits_eval), z),
                        eps=self.eps, step_size=self.step_size, steps=m.steps,
                        random_start="normal")
            logits_clean, logits_adv = self.model(x), self.model(x_adv)
            loss, held = trades_loss(logits_clean, logits_adv, y, m.beta), logits_clean
        if targets is None:
            return StepResult(loss)
        penalty = te_penalty(held, targets)
        return StepResult(loss + w * penalty.mean(), sums={"te_mse": penalty.detach().sum()})

    def epoch_end(self, epoch: int) -> dict[str, float]:
        out = {"te_weight": self.weight}
        seen = self.averages.sum(dim=1) > 0
        if bool(seen.any()):  # how often the target's top class is the observed label
            agree = self.averages[seen].argmax(dim=1) == self.data.train_labels[seen]
            out["te_label_agree"] = float(agree.float().mean())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"averages": self.averages.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["averages"]
        if saved.shape != self.averages.shape:
            raise ValueError(f"te averages: checkpoint has shape {tuple(saved.shape)}, this "
                             f"trial {tuple(self.averages.shape)}")
        self.averages.copy_(saved)
