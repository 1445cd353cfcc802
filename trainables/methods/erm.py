"""ERM: plain cross-entropy on the observed labels."""

from __future__ import annotations

import torch.nn.functional as F

from trainables.methods.base import Batch, Method, StepResult


class ERM(Method):
    name = "erm"

    def step(self, batch: Batch, lr: float) -> StepResult:
        return StepResult(F.cross_entropy(self.model(batch.x), batch.y))
