"""TRADES with label smoothing: CE against smoothed labels on the clean input, plus TRADES'
beta * KL(f(x) || f(x_adv)). `method.smoothing` is this method's own knob."""

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from trainables.knobs import TradesKnobs
from trainables.methods import Batch, Method, StepResult
from trainables.methods.trades_common import trades_examples


class TradesLSKnobs(TradesKnobs):  # eps, step_size, steps and beta, composed
    name: Literal["trades_ls"] = "trades_ls"
    smoothing: float = Field(default=0.1, ge=0.0, lt=1.0,
                             description="label smoothing of the clean cross-entropy")


class TradesLS(Method):
    name = "trades_ls"
    knobs = TradesLSKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        m = self.cfg.method
        x_adv = trades_examples(self.model, batch.x, eps=self.eps, step_size=self.step_size,
                                steps=m.steps)
        logits, logits_adv = self.model(batch.x), self.model(x_adv)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits, 1),
                      reduction="batchmean", log_target=True)
        ce = F.cross_entropy(logits, batch.y, label_smoothing=m.smoothing)
        return StepResult(ce + m.beta * kl)
