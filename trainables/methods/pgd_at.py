"""PGD-AT (Madry et al. 2018): cross-entropy on L-inf PGD examples with a random start."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from trainables.attacks import pgd_ce
from trainables.knobs import AttackKnobs
from trainables.methods.base import Batch, Method, StepResult


class PGDATKnobs(AttackKnobs):
    name: Literal["pgd_at"] = "pgd_at"


class PGDAT(Method):
    name = "pgd_at"
    knobs = PGDATKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        x_adv = pgd_ce(self.model, batch.x, batch.y, eps=self.eps, step_size=self.step_size,
                       steps=self.cfg.method.steps, random_start="uniform")
        return StepResult(F.cross_entropy(self.model(x_adv), batch.y))
