"""Anti-adversarial training: every sample perturbed to *lower* its loss, then CE on it.

The other end of CAAT's spectrum (CAAT with every sample choosing the anti direction).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from trainables.attacks import pgd_ce
from trainables.knobs import AttackKnobs
from trainables.methods.base import Batch, Method, StepResult


class AntiAdvKnobs(AttackKnobs):
    name: Literal["anti_adv"] = "anti_adv"


class AntiAdv(Method):
    name = "anti_adv"
    knobs = AntiAdvKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        # The tiny Gaussian start CAAT uses for its anti-adversarial examples.
        x_anti = pgd_ce(self.model, batch.x, batch.y, eps=self.eps, step_size=self.step_size,
                        steps=self.cfg.method.steps, sign=-1.0, random_start="normal")
        return StepResult(F.cross_entropy(self.model(x_anti), batch.y))
