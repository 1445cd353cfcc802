"""AT-BSL (Yue et al., CVPR 2024): PGD-AT trained on the balanced softmax loss.

Adversarial training under a long-tailed class distribution. The attack is PGD-AT's: plain
cross-entropy on the model's own logits, in eval mode, from a tiny Gaussian start (as the
official `at_bsl_loss.py`; the prior never enters the attack). The model is then trained on
the balanced softmax loss of Ren et al. (2020) on that example,

    CE(f(x_adv) + tau * log n, y),      n_c = training samples of (observed) class c,

which, at tau = 1 (the official code, which has no tau), trains the model as if the
classes were balanced: the prior the labels carry is added to the logits during training
and left out at test time, where the model is read as is. ``tau`` is Menon et al.'s logit
adjustment strength, for sweeps; tau = 0 with a uniform start is PGD-AT.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainables.attacks import pgd_ce
from trainables.knobs import AttackKnobs
from trainables.methods.base import Batch, Method, StepResult


class ATBSLKnobs(AttackKnobs):
    name: Literal["at_bsl"] = "at_bsl"
    tau: float = Field(default=1.0, ge=0.0, description=(
        "weight of log(class counts) added to the training logits; 1: balanced softmax "
        "(the official code), 0: plain cross-entropy"))
    random_start: Literal["normal", "uniform"] = Field(default="normal", description=(
        "attack start: 0.001 * N(0, 1) (the official code) or uniform in the eps ball "
        "(PGD-AT's)"))


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, class_counts: torch.Tensor,
                          tau: float = 1.0) -> torch.Tensor:
    """Batch-mean CE(logits + tau * log n_c, y) (pure).

    A class with no training sample is counted as one: it can be no sample's label, and a
    finite offset keeps tau = 0 and the softmax free of infinities.
    """
    log_counts = class_counts.clamp_min(1).to(logits.dtype).log()
    return F.cross_entropy(logits + tau * log_counts, y)


class ATBSL(Method):
    name = "at_bsl"
    knobs = ATBSLKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        m = self.cfg.method
        x_adv = pgd_ce(self.model, batch.x, batch.y, eps=self.eps, step_size=self.step_size,
                       steps=m.steps, random_start=m.random_start)
        return StepResult(balanced_softmax_loss(self.model(x_adv), batch.y,
                                                self.data.class_counts, m.tau))
