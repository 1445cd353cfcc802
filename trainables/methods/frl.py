"""FRL (Xu et al. 2021, "To be robust or to be fair"): TRADES with class multipliers.

Reweight raises the natural (c0) and boundary (c1) loss weights of classes whose errors on
the meta set exceed the average; remargin widens their perturbation bound (eps * s_c).
`method.frl_mode` picks reweight, remargin or both.
"""

from __future__ import annotations

import torch

from trainables.attacks import ce_per_sample, kl_per_sample, pgd_trades
from trainables.methods import register
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.multipliers import ClassMultipliers, MultiplierConfig
from trainables.methods.trades import attack_target


def weighted_trades_loss(ce: torch.Tensor, kl: torch.Tensor, c0_y: torch.Tensor,
                         c1_y: torch.Tensor, beta: float, w: torch.Tensor | float = 1.0,
                         w_kl: torch.Tensor | float | None = None) -> torch.Tensor:
    """sum(w*c0[y]*CE)/sum(c0[y]) + beta * sum(w_kl*c1[y]*KL)/sum(c1[y]) (pure); w_kl
    defaults to w (a separate one lets a probe take the two terms' gradients apart).

    With c0 = c1 = 1 and w = 1 this is TRADES' loss.
    """
    w_kl = w if w_kl is None else w_kl
    return ((w * c0_y * ce).sum() / c0_y.sum()
            + beta * (w_kl * c1_y * kl).sum() / c1_y.sum())


class MultiplierMethod(Method):
    """A method with FRL multipliers updated on the meta set at the start of every epoch."""

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.multipliers = ClassMultipliers(data.num_classes,
                                            MultiplierConfig.from_method(cfg.method),
                                            data.device)
        self._multiplier_stats: dict[str, float] = {}

    def epoch_start(self, epoch: int) -> None:
        self._multiplier_stats = self.multipliers.update(
            self.model, self.data.meta_x, self.data.meta_y, eps=self.eps,
            step_size=self.step_size, steps=self.cfg.method.steps)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        return dict(self._multiplier_stats)

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers.load_state_dict(state["multipliers"])


@register
class FRL(MultiplierMethod):
    name = "frl"

    def step(self, batch: Batch, lr: float) -> StepResult:
        x, y, m = batch.x, batch.y, self.multipliers
        x_adv = pgd_trades(self.model, x, attack_target(self.model, x), eps=self.eps * m.scale[y],
                           step_size=self.step_size, steps=self.cfg.method.steps)
        logits, logits_adv = self.model(x), self.model(x_adv)
        loss = weighted_trades_loss(ce_per_sample(logits, y),
                                    kl_per_sample(logits_adv, logits, detach_clean=False),
                                    m.c0[y], m.c1[y], self.cfg.method.beta)
        return StepResult(loss)
