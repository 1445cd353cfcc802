"""FRL-style class multipliers (Xu et al. 2021), shared by `frl` and `caat`.

Once per epoch the model's per-class natural error and boundary error (natural minus
robust accuracy) are measured on the clean balanced meta set. Classes whose error exceeds
the average by more than a tolerance get larger Lagrange multipliers, which
- reweight: raise the class's weight in the natural (c0) and boundary (c1) loss terms;
- remargin: widen the class's perturbation bound, eps_c = eps * s_c.
The update rules are pure functions of tensors; `ClassMultipliers` holds the state, a
component a method owns as ``self.multipliers`` (its state under ``"multipliers"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainables.attacks import eval_mode, pgd_ce
from trainables.metrics import class_accuracy


def class_error_gaps(nat_correct: torch.Tensor, rob_correct: torch.Tensor, y: torch.Tensor,
                     num_classes: int, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (natural, boundary) error minus the overall one minus the tolerance (pure).

    Boundary error = natural accuracy - robust accuracy. Classes absent from ``y`` get a
    gap of -tolerance (no evidence, no push).
    """
    nat_c = class_accuracy(nat_correct, y, num_classes)
    rob_c = class_accuracy(rob_correct, y, num_classes)
    nat_err_c, bndy_c = 1 - nat_c, nat_c - rob_c
    nat_err = 1 - nat_correct.float().mean()
    bndy = nat_correct.float().mean() - rob_correct.float().mean()
    gap0 = torch.nan_to_num(nat_err_c - nat_err, nan=0.0) - tolerance
    gap1 = torch.nan_to_num(bndy_c - bndy, nan=0.0) - tolerance
    return gap0, gap1


def project_multipliers(lam: torch.Tensor, limit: float) -> torch.Tensor:
    """Multipliers are >= 0 and, as in FRL, their total is capped at ``limit`` (pure)."""
    lam = lam.clamp_min(0.0)
    total = lam.sum()
    return lam * (limit / total) if total > limit else lam


def class_weights(lam: torch.Tensor) -> torch.Tensor:
    """Loss weight per class: 1/C + lam_c - mean(lam) (pure); sums to 1, >= 0 when
    sum(lam) <= 1 (the cap keeps it there)."""
    return 1.0 / lam.numel() + lam - lam.mean()


def margin_scales(lam: torch.Tensor, limit: float) -> torch.Tensor:
    """Bound scale per class: exp(2 lam_c), at most ``limit`` (pure)."""
    return torch.exp(2.0 * lam).clamp(max=limit)


@dataclass
class MultiplierConfig:
    tolerance: float
    reweight_rate: float
    remargin_rate: float
    weight_limit: float
    margin_limit: float
    reweight: bool
    remargin: bool

    @classmethod
    def from_method(cls, m) -> MultiplierConfig:
        return cls(tolerance=m.tolerance, reweight_rate=m.reweight_rate,
                   remargin_rate=m.remargin_rate, weight_limit=m.weight_limit,
                   margin_limit=m.margin_limit, reweight=m.frl_mode in ("reweight", "both"),
                   remargin=m.frl_mode in ("remargin", "both"))


class ClassMultipliers:
    """Lagrange multipliers for natural error (lam0), boundary error (lam1) and bound (lam2)."""

    def __init__(self, num_classes: int, cfg: MultiplierConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.lam = torch.zeros(3, num_classes, device=device)
        self.stats: dict[str, float] = {}  # the last update's summary, for the epoch report

    @property
    def c0(self) -> torch.Tensor:
        return class_weights(self.lam[0])

    @property
    def c1(self) -> torch.Tensor:
        return class_weights(self.lam[1])

    @property
    def scale(self) -> torch.Tensor:
        return margin_scales(self.lam[2], self.cfg.margin_limit)

    def step(self, gap0: torch.Tensor, gap1: torch.Tensor) -> None:
        """Gradient ascent on the multipliers (pure arithmetic on the state)."""
        c = self.cfg
        lam = self.lam.clone()
        if c.reweight:
            lam[0] = project_multipliers(lam[0] + c.reweight_rate * gap0, c.weight_limit)
            lam[1] = project_multipliers(lam[1] + c.reweight_rate * gap1, c.weight_limit)
        if c.remargin:
            lam[2] = (lam[2] + c.remargin_rate * gap1).clamp_min(0.0)
        self.lam = lam

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
               step_size: float, steps: int) -> dict[str, float]:
        """Measure the class gaps on (x, y) (PGD-CE at each class's current bound) and step.

        Returns (and keeps as ``stats``) summary numbers for the epoch report.
        """
        eps_i = eps * self.scale[y]
        x_adv = pgd_ce(model, x, y, eps=eps_i, step_size=step_size, steps=steps)
        with eval_mode(model), torch.no_grad():
            nat = model(x).argmax(1) == y
            rob = model(x_adv).argmax(1) == y
        gap0, gap1 = class_error_gaps(nat, rob, y, self.lam.shape[1], self.cfg.tolerance)
        self.step(gap0, gap1)
        self.stats = {"class_weight_max": float(self.c0.max()),
                      "bound_scale_max": float(self.scale.max())}
        return self.stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lam": self.lam.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lam = state["lam"].to(self.lam.device)
