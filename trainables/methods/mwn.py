"""Meta-Weight-Net (Shu et al. 2019): a per-sample loss weight from a small net of the loss.

Every `method.meta_interval` batches the weight net takes a meta step: a virtual SGD step
of the model on the weighted loss, then plain CE on a clean meta batch at the virtual
weights. Natural training (no attack): the label-noise baseline CAAT builds on.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from trainables.attacks import ce_per_sample
from trainables.knobs import MetaKnobs
from trainables.meta import call_with
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.metalearner import MetaLearner, meta_state_of


class MWNKnobs(MetaKnobs):
    """Meta-Weight-Net's meta-learning; Adam 1e-3 with weight decay 1e-4 as MW-Net.py, a
    meta step every 50 batches (MW-Net.py: every batch) for cost."""

    name: Literal["mwn"] = "mwn"


class MWN(Method):
    name = "mwn"
    knobs = MWNKnobs

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        # As in Shu et al.: the loss goes straight into the MLP (one feature, no BatchNorm),
        # and the virtual step is theta - lr * grad (MW-Net.py's `update_params`: no
        # momentum, no weight decay).
        self.meta = MetaLearner(model, cfg, data, in_features=1, out_features=1, norm="none",
                                virtual="plain")

    def weights(self, ce: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.meta.net(ce.detach().unsqueeze(1))).squeeze(1)

    def step(self, batch: Batch, lr: float) -> StepResult:
        ce = ce_per_sample(self.model(batch.x), batch.y)
        if self.meta.due():
            xm, ym = self.meta.batch()
            self.meta.step((self.weights(ce) * ce).mean(),
                           lambda params: F.cross_entropy(call_with(self.model, params, xm), ym),
                           lr)
        with torch.no_grad():
            w = self.weights(ce)
        return StepResult((w * ce).mean(), sums={"mean_weight": float(w.sum())})

    def epoch_start(self, epoch: int) -> None:
        self.meta.epoch_start()

    def epoch_end(self, epoch: int) -> dict[str, float]:
        return self.meta.epoch_stats()

    def state_dict(self) -> dict:
        return {"meta": self.meta.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.meta.load_state_dict(meta_state_of(state))
