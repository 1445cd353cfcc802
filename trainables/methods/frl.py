"""FRL (Xu et al. 2021, "To be robust or to be fair"): TRADES with class multipliers.

Reweight raises the natural (c0) and boundary (c1) loss weights of classes whose errors on
the meta set exceed the average; remargin widens their perturbation bound (eps * s_c).
`method.frl_mode` picks reweight, remargin or both. The multipliers are updated on the
meta set at the start of every epoch, by FRL's own rule (`multipliers.py`); the attack at
the class bounds steps by max_i(eps_i) / 4 (`method.bound_step: max_bound`), as FRL's
`trades_adv` (hannxu123/fair_robust `utils_frl2.py`).
"""

from __future__ import annotations

from typing import Literal

from trainables.attacks import ce_per_sample, kl_per_sample
from trainables.knobs import BoundStep, MarginLimit, MultiplierKnobs, TradesKnobs
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.multipliers import (
    ClassMultipliers,
    MultiplierConfig,
    bound_step_size,
    measure_attacks,
)
from trainables.methods.trades_common import trades_examples, weighted_trades_loss


class FRLKnobs(MultiplierKnobs, TradesKnobs):
    name: Literal["frl"] = "frl"
    # fair_robust's `cost_sensitive` clips the scales at 3 and `trades_adv` steps by
    # max_i(eps_i) / 4.
    margin_limit: MarginLimit = 3.0
    bound_step: BoundStep = "max_bound"


class FRL(Method):
    name = "frl"
    knobs = FRLKnobs

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.multipliers = ClassMultipliers(data.num_classes, MultiplierConfig.from_config(cfg),
                                            data.device)

    def epoch_start(self, epoch: int) -> None:
        self.multipliers.update(self.model, self.data.meta_x, self.data.meta_y,
                                **measure_attacks(self.cfg), epoch=epoch)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        return dict(self.multipliers.stats)

    def step(self, batch: Batch, lr: float) -> StepResult:
        x, y, m = batch.x, batch.y, self.multipliers
        eps_i = self.eps * m.scale[y]
        x_adv = trades_examples(self.model, x, eps=eps_i, steps=self.cfg.method.steps,
                                step_size=bound_step_size(self.step_size, self.eps, eps_i,
                                                          self.cfg.method.bound_step))
        logits, logits_adv = self.model(x), self.model(x_adv)
        loss = weighted_trades_loss(ce_per_sample(logits, y),
                                    kl_per_sample(logits_adv, logits, detach_clean=False),
                                    m.c0[y], m.c1[y], self.cfg.method.beta)
        return StepResult(loss)

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers.load_state_dict(state["multipliers"])
