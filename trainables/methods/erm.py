"""ERM: plain cross-entropy on the observed labels."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F

from trainables.knobs import Knobs
from trainables.methods.base import Batch, Method, StepResult


class ERMKnobs(Knobs):
    """None: natural training has nothing to set besides the optimiser."""

    name: Literal["erm"] = "erm"


class ERM(Method):
    name = "erm"
    knobs = ERMKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        return StepResult(F.cross_entropy(self.model(batch.x), batch.y))
