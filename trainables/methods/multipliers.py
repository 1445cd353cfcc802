"""FRL's class multipliers (Xu et al. 2021), shared by `frl` and `caat`, as FRL's own code
has them (hannxu123/fair_robust `utils_frl2.py`, which CAAT's `utils.py` copies).

Once per epoch the model's per-class natural error and boundary error (natural minus
robust accuracy) are measured on the clean balanced meta set, at the evaluation attack
(`frl_measure: eval_bound`, the references) or at each class's own widened bound
(`class_bound`). Their gaps to the average, less a tolerance, move three Lagrange
multipliers per class:
- lam0 += rate * gap0 and lam1 += 2 * rate * gap1, each projected to >= 0 with its total
  capped (reweight: the class's weight in the natural (c0) and boundary (c1) loss terms);
- lam2 += remargin_rate * gap1, unprojected (remargin: the class's bound eps_c = eps * s_c
  with s_c = exp(2 lam2) clipped to [margin_floor, margin_limit], so a class whose boundary
  error stays below the average shrinks to margin_floor * eps).
The rules are pure functions of tensors; `ClassMultipliers` holds the state, a component a
method owns as ``self.multipliers`` (its state under ``"multipliers"``).
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
    nat_err = 1 - nat_correct.double().mean()
    bndy = nat_correct.double().mean() - rob_correct.double().mean()
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


def margin_scales(lam: torch.Tensor, floor: float, limit: float) -> torch.Tensor:
    """Bound scale per class: exp(2 lam_c) clipped to [floor, limit] (pure)."""
    return torch.exp(2.0 * lam).clamp(min=floor, max=limit)


def halved_rate(rate: float, epoch: int, every: int | None) -> float:
    """The reweight rate in 0-based ``epoch``: halved once per ``every`` epochs, as both
    references' scripts do (`if now_epoch % 40 == 0: rate1 /= 2`, now_epoch 1-based)."""
    return rate if every is None else rate * 0.5 ** ((epoch + 1) // every)


@dataclass(frozen=True)
class MultiplierConfig:
    tolerance: float
    reweight_rate: float
    remargin_rate: float
    weight_limit: float
    margin_limit: float
    reweight: bool
    remargin: bool
    margin_floor: float = 0.98
    reweight_halving: int | None = 40
    # Where the class errors are measured: "eval_bound" (the evaluation attack, unscaled,
    # as both references) or "class_bound" (each class at its own bound, training attack).
    measure: str = "eval_bound"

    @classmethod
    def from_config(cls, cfg) -> MultiplierConfig:
        """From a TrialConfig (its method block, with the method's own defaults)."""
        m = cfg.method
        return cls(tolerance=m.tolerance, reweight_rate=m.reweight_rate,
                   remargin_rate=m.remargin_rate, weight_limit=m.weight_limit,
                   margin_limit=m.margin_limit, reweight=m.frl_mode in ("reweight", "both"),
                   remargin=m.frl_mode in ("remargin", "both"), margin_floor=m.margin_floor,
                   reweight_halving=m.reweight_halving, measure=m.frl_measure)


def multiplier_step(lam: torch.Tensor, gap0: torch.Tensor, gap1: torch.Tensor,
                    cfg: MultiplierConfig, reweight_rate: float) -> torch.Tensor:
    """FRL's ascent on the (3, C) multipliers (pure). The references clamp the gaps at
    -1000 first, which no error gap in [-1, 1] reaches."""
    lam = lam.clone()
    if cfg.reweight:
        lam[0] = project_multipliers(lam[0] + reweight_rate * gap0, cfg.weight_limit)
        lam[1] = project_multipliers(lam[1] + 2.0 * reweight_rate * gap1, cfg.weight_limit)
    if cfg.remargin:
        lam[2] = lam[2] + cfg.remargin_rate * gap1
    return lam


@dataclass(frozen=True)
class MeasureAttack:
    """The attack the class errors are measured with; eps may be per sample."""

    eps: float | torch.Tensor
    step_size: float
    steps: int


def measure_attacks(cfg) -> dict[str, MeasureAttack]:
    """``train`` and ``evaluation`` attacks of a TrialConfig, for `ClassMultipliers.update`."""
    return {"train": MeasureAttack(eps=cfg.train_eps, step_size=cfg.train_step_size,
                                   steps=cfg.method.steps),
            "evaluation": MeasureAttack(eps=cfg.eval_eps, step_size=cfg.eval_step_size,
                                        steps=cfg.eval.steps)}


def bound_step_size(step_size: float, eps: float, eps_i: torch.Tensor,
                    rule: str) -> float | torch.Tensor:
    """The attack step at per-sample bounds eps_i (pure): ``fixed``, the configured step
    (CAAT's `caat_adv`); ``max_bound``, the step scaled by the batch's largest bound over
    eps (FRL's `trades_adv`: max_i(eps_i) / 4, with the default step eps / 4)."""
    if rule == "fixed" or eps == 0:
        return step_size
    return step_size * eps_i.max() / eps


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
        if not self.cfg.remargin:  # lam2 stays 0: exp(0) = 1, whatever the clip
            return torch.ones_like(self.lam[2])
        return margin_scales(self.lam[2], self.cfg.margin_floor, self.cfg.margin_limit)

    def step(self, gap0: torch.Tensor, gap1: torch.Tensor, epoch: int = 0) -> None:
        rate = halved_rate(self.cfg.reweight_rate, epoch, self.cfg.reweight_halving)
        self.lam = multiplier_step(self.lam, gap0, gap1, self.cfg, rate)

    def measure_attack(self, y: torch.Tensor, *, train: MeasureAttack,
                       evaluation: MeasureAttack) -> MeasureAttack:
        """The attack of this update: the evaluation one, or the training one at each
        sample's class bound (``class_bound``)."""
        if self.cfg.measure == "class_bound":
            return MeasureAttack(eps=train.eps * self.scale[y], step_size=train.step_size,
                                 steps=train.steps)
        return evaluation

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
               train: MeasureAttack, evaluation: MeasureAttack, epoch: int = 0
               ) -> dict[str, float]:
        """Measure the class gaps on (x, y) (PGD-CE with a uniform random start, as the
        references' `pgd_attack`) and step. Returns (and keeps as ``stats``) summary
        numbers for the epoch report."""
        attack = self.measure_attack(y, train=train, evaluation=evaluation)
        x_adv = pgd_ce(model, x, y, eps=attack.eps, step_size=attack.step_size,
                       steps=attack.steps)
        with eval_mode(model), torch.no_grad():
            nat = model(x).argmax(1) == y
            rob = model(x_adv).argmax(1) == y
        gap0, gap1 = class_error_gaps(nat, rob, y, self.lam.shape[1], self.cfg.tolerance)
        self.step(gap0, gap1, epoch)
        self.stats = {"class_weight_max": float(self.c0.max()),
                      "bound_scale_max": float(self.scale.max()),
                      "bound_scale_min": float(self.scale.min())}
        return self.stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"lam": self.lam.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.lam = state["lam"].to(self.lam.device)
