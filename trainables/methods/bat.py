"""BAT (Sun et al., AAAI 2023, "Improving Robust Fairness via Balance Adversarial
Training"), as its official code has it (silvercherry/Improving-Robust-Fairness-via-
Balance-Adversarial-Training: `train.py` `train`/`BAT_loss`, `train_mode/stop_to_lastclean.py`,
`train_mode/stop_to_firstadv.py`).

Two early-stopped TRADES attacks per batch (ascending KL(f(x) || f(x')), each from its own
0.001 * N(0, 1) start, stopping sample by sample in the manner of Friendly Adversarial
Training):
- last clean: a sample steps while the model classifies it correctly and keeps the last
  iterate it classified correctly (its start if that is already misclassified, the K-th
  iterate if none of the first K was misclassified): a point just short of the boundary;
- first adversarial: a sample steps until its (tau + 1)-th misclassified iterate, which it
  keeps (the code's tau = 1), else the K-th iterate: a point just past the boundary.
The loss, from three train-mode forwards (last clean, first adversarial, clean):

    CE(f(x_lc), y) + beta * KL(f(x) || f(x_fa)) + KL(f(x_lc) || u) + KL(f(x_fa) || u)

with u the uniform distribution: the natural term is taken at the last clean point (the
paper's source-class balance), and both examples' predictions are pulled towards uniform
(its target-class balance; `uniform_weight` scales them, 1 in the code). Gradients flow
through every distribution, as in the code's KLDivLoss terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainables.attacks import PerSample, kl_per_sample, pgd
from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, StepResult
from trainables.methods.trades_common import attack_target

KEEP = ("last_clean", "first_adv")


class BATKnobs(TradesKnobs):
    name: Literal["bat"] = "bat"
    tau: int = Field(default=1, ge=0, description=(
        "misclassified iterates the first-adversarial attack steps past before it stops "
        "(the code's stop_to_firstadv tau=1; 0 stops at the first)"))
    uniform_weight: float = Field(default=1.0, ge=0.0, description=(
        "weight of the two KL(f(x') || uniform) terms (the code adds them unweighted)"))


@dataclass
class EarlyStopped:
    examples: torch.Tensor  # (B, ...) the iterate each sample kept
    kept_at: torch.Tensor  # (B,) which iterate that is (0 = the start, K = the last)
    stopped: torch.Tensor  # (B,) bool: stopped before the last iterate


class _Iterates(nn.Module):
    """The model, remembering the input of its latest forward: the attack's iterate."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.latest: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.latest = x.detach()
        return self.model(x)


def early_stopped_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                         eps: PerSample, step_size: PerSample, steps: int, keep: str,
                         tau: int = 0, init_delta: torch.Tensor | None = None
                         ) -> EarlyStopped:
    """BAT's early-stopped KL attack (`keep`: ``last_clean`` or ``first_adv``), on
    `attacks.pgd` from TRADES' start (or ``init_delta``).

    At each iterate the samples that stop are judged from the very forward that gives
    the gradient; a stopped sample's objective is zeroed, so its gradient sign is 0 and it
    stays where it is while the others go on (samples do not interact: eval mode).
    """
    if keep not in KEEP:
        raise ValueError(f"keep: unknown {keep!r}; allowed: {', '.join(KEEP)}")
    target = attack_target(model, x)
    watch = _Iterates(model)
    n = len(y)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    misses = torch.zeros(n, dtype=torch.long, device=x.device)
    kept = torch.empty_like(x)
    kept_at = torch.full((n,), steps, dtype=torch.long, device=x.device)
    k, previous = 0, None

    def objective(logits: torch.Tensor) -> torch.Tensor:
        nonlocal k, previous
        current = watch.latest
        wrong = active & (logits.argmax(dim=1) != y)
        if keep == "last_clean":
            stop, source, at = wrong, (current if previous is None else previous), max(k - 1, 0)
        else:
            stop, source, at = wrong & (misses >= tau), current, k
            misses.add_((wrong & ~stop).long())
        kept[stop] = source[stop]
        kept_at[stop] = at
        active.logical_and_(~stop)
        previous, k = current, k + 1
        return kl_per_sample(logits, target) * active

    last = pgd(watch, x, objective, eps=eps, step_size=step_size, steps=steps,
               random_start="normal", init_delta=init_delta)
    kept[active] = last[active]
    return EarlyStopped(kept, kept_at, ~active)


def bat_loss(logits_lc: torch.Tensor, logits_fa: torch.Tensor, logits_clean: torch.Tensor,
             y: torch.Tensor, *, beta: float, uniform_weight: float = 1.0) -> torch.Tensor:
    """CE(last clean) + beta KL(clean || first adv) + w (KL(lc || u) + KL(fa || u)), each a
    batch mean (pure); the zero logits are the uniform distribution."""
    uniform = torch.zeros_like(logits_fa)
    to_uniform = (kl_per_sample(uniform, logits_lc, detach_clean=False).mean()
                  + kl_per_sample(uniform, logits_fa, detach_clean=False).mean())
    return (F.cross_entropy(logits_lc, y)
            + beta * kl_per_sample(logits_fa, logits_clean, detach_clean=False).mean()
            + uniform_weight * to_uniform)


class BAT(Method):
    name = "bat"
    knobs = BATKnobs

    def step(self, batch: Batch, lr: float) -> StepResult:
        x, y, m = batch.x, batch.y, self.cfg.method
        attack = {"eps": self.eps, "step_size": self.step_size, "steps": m.steps}
        # The code's order: last clean first, then first adversarial (their starts are
        # drawn in that order).
        lc = early_stopped_attack(self.model, x, y, keep="last_clean", **attack)
        fa = early_stopped_attack(self.model, x, y, keep="first_adv", tau=m.tau, **attack)
        logits_lc = self.model(lc.examples)
        logits_fa = self.model(fa.examples)
        logits = self.model(x)
        loss = bat_loss(logits_lc, logits_fa, logits, y, beta=m.beta,
                        uniform_weight=m.uniform_weight)
        sums = {"bat_lastclean_iterate": float(lc.kept_at.sum()),
                "bat_firstadv_iterate": float(fa.kept_at.sum()),
                "bat_firstadv_stopped": float(fa.stopped.sum())}
        return StepResult(loss, sums=sums)
