"""DAFA (Lee et al., ICLR 2024, "Distance-Aware Fair Adversarial Training"): TRADES whose
classes get their own loss weight, bound and step from how similar the classes are.

As the official code does it (rucy74/DAFA: `train.py`, `losses.py` `trades_loss`,
`utils.py` `calculate_class_weights`):
- Until the weight epoch every class weight is 1: plain TRADES.
- During the weight epoch (the code's 70th of 110, kept here as that fraction of
  `optim.epochs`, `warmup_fraction`) every batch's softmax of the adversarial train-mode
  forward is recorded. At the end of that epoch the class similarity p[i, j] (the mean
  probability of class j on the training samples labelled i) gives, once and for all,

      w_i = 1 + lam * sum_{j != i} ( p_ij * p_jj   if p_ii < p_jj  (i the harder class)
                                    -p_ji * p_ii   otherwise )

- From the next epoch on a sample of class c has its clean cross-entropy weighted by w_c
  (a batch mean, not renormalised) and is attacked at eps * w_c with step step_size * w_c;
  the KL term stays unweighted.
The weights and whether they are set are the method's state, so a resumed trial continues
with them; the recorded outputs live only within the weight epoch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainables.attacks import ce_per_sample, kl_per_sample
from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.trades_common import trades_examples, weighted_trades_loss

# The code's schedule: weights from epoch 70 (`--dafa_warmup`) of 110 (`--epochs`).
CODE_WARMUP, CODE_EPOCHS = 70, 110


class DAFAKnobs(TradesKnobs):
    name: Literal["dafa"] = "dafa"
    dafa_lambda: float = Field(default=1.0, ge=0.0, description=(
        "scale of the class-similarity weights (the code's --dafa_lambda: 1.0 CIFAR-10, "
        "1.5 CIFAR-100 and STL-10)"))
    warmup_fraction: float = Field(default=CODE_WARMUP / CODE_EPOCHS, gt=0.0, le=1.0,
                                   description=(
        "the weight epoch as a fraction of optim.epochs (the code's 70 of 110): its "
        "outputs give the class weights, used from the next epoch on"))


def weight_epoch(fraction: float, epochs: int) -> int:
    """The 1-based epoch whose outputs give the weights (pure): round(fraction * epochs),
    at least 1 and at most ``epochs`` (70/110 of 110 epochs is the code's 70)."""
    return min(epochs, max(1, round(fraction * epochs)))


def class_similarity(prob_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(C, C) mean predicted distribution per true class from per-class sums (pure); a
    class with no sample gets a row of zeros (weight 1, no effect on the others)."""
    sim = prob_sums / counts.to(prob_sums.dtype).unsqueeze(1)
    return torch.nan_to_num(sim, nan=0.0)


def dafa_weights(sim: torch.Tensor, lam: float) -> torch.Tensor:
    """DAFA's class weights from the class similarity ``sim`` (pure, the code's rule):
    a class gains lam * p_ij * p_jj from each class j it is harder than (p_ii < p_jj) and
    loses lam * p_ji * p_ii to each other one (ties count as not harder)."""
    own = sim.diagonal()
    harder = own.unsqueeze(1) < own.unsqueeze(0)  # [i, j]: p_ii < p_jj
    gain = sim * own.unsqueeze(0)  # p_ij * p_jj
    give = sim.T * own.unsqueeze(1)  # p_ji * p_ii
    off = 1.0 - torch.eye(len(own), dtype=sim.dtype, device=sim.device)
    return 1.0 + lam * (torch.where(harder, gain, -give) * off).sum(dim=1)


def bound_scales(weights: torch.Tensor) -> torch.Tensor:
    """The bound and step scale per class: the weight, floored at 0 (a negative weight,
    which only a large lambda gives, would invert the code's ball)."""
    return weights.clamp_min(0.0)


class DAFA(Method):
    name = "dafa"
    knobs = DAFAKnobs

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.weight_epoch = weight_epoch(cfg.method.warmup_fraction, cfg.optim.epochs)
        self.class_weights = torch.ones(data.num_classes, device=data.device)
        self.weights_set = False
        # Per-class sums of the recorded softmax outputs and sample counts; only during
        # the weight epoch (the checkpoint comes after its epoch_end, which consumes them).
        self._prob_sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def epoch_start(self, epoch: int) -> None:
        if not self.weights_set and epoch + 1 == self.weight_epoch:
            c = self.data.num_classes
            self._prob_sums = torch.zeros(c, c, device=self.data.device)
            self._counts = torch.zeros(c, dtype=torch.long, device=self.data.device)

    def step(self, batch: Batch, lr: float) -> StepResult:
        x, y = batch.x, batch.y
        w = self.class_weights[y]
        scale = bound_scales(w)
        x_adv = trades_examples(self.model, x, eps=self.eps * scale,
                                step_size=self.step_size * scale, steps=self.cfg.method.steps)
        # The code's order of the train-mode forwards (adversarial, then clean), which
        # BatchNorm's running statistics follow.
        logits_adv, logits = self.model(x_adv), self.model(x)
        if self._prob_sums is not None:
            probs = F.softmax(logits_adv.detach(), dim=1).to(self._prob_sums.dtype)
            self._prob_sums.index_add_(0, y, probs)
            self._counts += torch.bincount(y, minlength=self.data.num_classes)
        ones = torch.ones_like(w)
        loss = weighted_trades_loss(ce_per_sample(logits, y),
                                    kl_per_sample(logits_adv, logits, detach_clean=False),
                                    ones, ones, self.cfg.method.beta, w=w, w_kl=1.0)
        return StepResult(loss)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        if self._prob_sums is not None:
            sim = class_similarity(self._prob_sums, self._counts)
            self.class_weights = dafa_weights(sim, self.cfg.method.dafa_lambda).to(
                self.class_weights.dtype)
            self.weights_set = True
            self._prob_sums = self._counts = None
        w = self.class_weights
        # Every epoch, ones before the weights are set: the trial keeps each list's
        # history (`<name>_by_epoch`), aligned with the epochs.
        return {"class_weight_max": float(w.max()), "class_weight_min": float(w.min()),
                "dafa_weights_set": float(self.weights_set),
                "train_class_dafa_weight": w.tolist(),
                "train_class_dafa_eps": (self.eps * bound_scales(w)).tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {"class_weights": self.class_weights.clone(), "weights_set": self.weights_set}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.class_weights = state["class_weights"].to(self.class_weights.device)
        self.weights_set = bool(state["weights_set"])
