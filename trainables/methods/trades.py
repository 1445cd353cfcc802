"""TRADES (Zhang et al. 2019): CE on clean inputs + beta * KL(f(x) || f(x_adv))."""

from __future__ import annotations

from typing import Literal

from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, StepResult
from trainables.methods.trades_common import trades_examples, trades_loss


class TRADESKnobs(TradesKnobs):
    name: Literal["trades"] = "trades"


class TRADES(Method):
    name = "trades"
    knobs = TRADESKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        x_adv = trades_examples(self.model, batch.x, eps=self.eps, step_size=self.step_size,
                                steps=self.cfg.method.steps)
        # Two train-mode forwards, as in TRADES: clean and adversarial batches each get
        # their own BatchNorm statistics.
        logits_clean, logits_adv = self.model(batch.x), self.model(x_adv)
        return StepResult(trades_loss(logits_clean, logits_adv, batch.y, self.cfg.method.beta))
