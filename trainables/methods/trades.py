"""TRADES (Zhang et al. 2019): CE on clean inputs + beta * KL(f(x) || f(x_adv))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import eval_mode, kl_per_sample, pgd_trades
from trainables.methods import register
from trainables.methods.base import Batch, Method, StepResult


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> torch.Tensor:
    """Batch-mean CE(clean) + beta * batch-mean KL(p_clean || p_adv) (pure).

    As in Zhang et al., gradients flow through both the clean and the adversarial logits.
    """
    return F.cross_entropy(logits_clean, y) + beta * kl_per_sample(
        logits_adv, logits_clean, detach_clean=False).mean()


def attack_target(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The KL attack's target distribution (logits), in eval mode like the attack itself,
    so target and attacked logits agree at the start point."""
    with eval_mode(model), torch.no_grad():
        return model(x)


@register
class TRADES(Method):
    name = "trades"

    def step(self, batch: Batch, lr: float) -> StepResult:
        x_adv = pgd_trades(self.model, batch.x, attack_target(self.model, batch.x),
                           eps=self.eps, step_size=self.step_size, steps=self.cfg.method.steps)
        # Two train-mode forwards, as in TRADES: clean and adversarial batches each get
        # their own BatchNorm statistics.
        logits_clean, logits_adv = self.model(batch.x), self.model(x_adv)
        return StepResult(trades_loss(logits_clean, logits_adv, batch.y, self.cfg.method.beta))
