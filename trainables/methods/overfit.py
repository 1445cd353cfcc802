"""Catastrophic overfitting: a PGD probe on a fixed training subset, and the rule that flags it.

Single-step adversarial training (FGSM-RS, N-FGSM) can collapse within an epoch or two:
FGSM accuracy stays high while PGD accuracy falls to about zero (Wong et al. 2020).
Wong et al.'s code (locuslab/fast_adversarial, CIFAR10/train_fgsm.py, `--early-stop`)
watches for it at each epoch's end with a 5-step PGD (step eps/4, one restart) on a training
batch and stops once the PGD accuracy is more than 0.2 below the previous epoch's. The
probe here runs that check, with the attack and the rule as knobs, and reports instead of
stopping (the trial loop owns the epochs):

    train_pgd_acc         PGD accuracy on the probe subset (observed labels)
    train_natural_acc     clean accuracy on the same subset
    catastrophic_overfit  1 from the first epoch the rule fired on, else 0

What differs from the code, on purpose: the subset is fixed (drawn once from the trial seed;
512 samples by default), not the epoch's first batch of 128, so epochs are compared on the
same images with less noise; the attack is `attacks.pgd_ce` in eval mode (the code attacked
in train mode, batch statistics and all) without the code's per-sample early exit; and its
random start comes from its own generator fixed by (seed, epoch), so the probe never moves
the training's random stream and a trial trains the same with or without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from trainables.attacks import eval_mode, pgd_ce
from trainables.knobs import Knobs
from trainables.methods.base import Method

if TYPE_CHECKING:
    from trainables.config import TrialConfig
    from trainables.methods.base import MethodData

# The trial's random streams are numbered in `trainables.trial` (0-4); the probe's attack
# takes one far from them.
PROBE_STREAM = 101
# fast_adversarial, train_fgsm.py, compares the first epoch with an accuracy of 0, so the
# first check never fires.
START_REFERENCE = 0.0


class FastATKnobs(Knobs):
    """What FGSM-RS and N-FGSM share: the training bound and the overfitting probe."""

    eps: float | None = Field(default=None, ge=0.0, le=1.0, description=(
        "L-inf training bound in pixel space; null: the dataset's (0.1 Fashion-MNIST, "
        "8/255 CIFAR)"))
    probe_size: int = Field(default=512, ge=0, description=(
        "training samples in the fixed catastrophic-overfitting probe; 0: no probe"))
    probe_steps: int = Field(default=5, ge=1, description=(
        "PGD steps of the probe (step eps/4, at the training eps; fast_adversarial: 5)"))
    overfit_drop: float = Field(default=0.2, gt=0.0, le=1.0, description=(
        "fall in probe PGD accuracy that flags catastrophic overfitting "
        "(fast_adversarial: 0.2)"))
    overfit_reference: Literal["previous", "best"] = Field(default="previous", description=(
        "the fall is measured from the previous epoch's accuracy (fast_adversarial) or "
        "from the best so far (also catches a collapse spread over several epochs)"))


# ------------------------------------------------------------------------------ the maths


def probe_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """``min(size, n)`` distinct positions in [0, n), sorted, fixed by ``seed`` alone."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, PROBE_STREAM])
                                          .generate_state(1)[0]))
    return torch.randperm(n, generator=g)[:min(size, n)].sort().values


def probe_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   step_size: float, steps: int, batch_size: int,
                   generator: torch.Generator | None = None) -> tuple[float, float]:
    """(natural, PGD) accuracy of ``model`` on (x, y): PGD-CE from a uniform start, in
    eval mode, modes restored. Batched by ``batch_size``; the model's ``.grad`` untouched."""
    natural = robust = 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        x_adv = pgd_ce(model, xb, yb, eps=eps, step_size=step_size, steps=steps,
                       random_start="uniform", generator=generator)
        with eval_mode(model), torch.no_grad():
            natural += int((model(xb).argmax(1) == yb).sum())
            robust += int((model(x_adv).argmax(1) == yb).sum())
    n = max(len(y), 1)
    return natural / n, robust / n


def collapsed(acc: float, reference: float, drop: float) -> bool:
    """fast_adversarial's rule: the accuracy is more than ``drop`` below the reference
    (strictly, as there; its drop is 0.2 and its reference the previous epoch's)."""
    return acc - reference < -drop


# ------------------------------------------------------------------------------ the probe


class OverfitProbe:
    """The probe a single-step method holds: run at each epoch's end, state checkpointed.

    ``data.train_x`` None (outside a trial) or ``probe_size`` 0: no probe, no metrics.
    """

    def __init__(self, knobs: FastATKnobs, data: MethodData, *, eps: float, seed: int,
                 batch_size: int) -> None:
        self.knobs, self.data = knobs, data
        self.eps, self.seed, self.batch_size = eps, seed, batch_size
        n = 0 if data.train_x is None else len(data.train_x)
        self.subset = probe_subset(n, knobs.probe_size, seed)
        self.previous = self.best = START_REFERENCE
        self.flag = False

    @property
    def active(self) -> bool:
        return len(self.subset) > 0

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        if not self.active:
            return {}
        assert self.data.train_x is not None
        pos = self.subset.to(self.data.train_x.device)
        gen = torch.Generator(device=self.data.device)
        gen.manual_seed(int(np.random.SeedSequence([self.seed, epoch, PROBE_STREAM])
                            .generate_state(1)[0]))
        natural, robust = probe_accuracy(
            model, self.data.train_x[pos], self.data.train_labels[pos], eps=self.eps,
            step_size=self.eps / 4, steps=self.knobs.probe_steps,
            batch_size=self.batch_size, generator=gen)
        reference = self.previous if self.knobs.overfit_reference == "previous" else self.best
        self.flag = self.flag or collapsed(robust, reference, self.knobs.overfit_drop)
        self.previous, self.best = robust, max(self.best, robust)
        return {"train_pgd_acc": robust, "train_natural_acc": natural,
                "catastrophic_overfit": float(self.flag)}

    def state_dict(self) -> dict[str, Any]:
        return {"subset": self.subset.clone(), "previous": self.previous, "best": self.best,
                "flag": self.flag}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.subset = state["subset"].clone()
        self.previous, self.best = float(state["previous"]), float(state["best"])
        self.flag = bool(state["flag"])


class ProbedMethod(Method):
    """A single-step method with the probe: its epoch end reports the probe, and its state
    is the probe's. Subclasses set `step_size` and implement `step`."""

    def __init__(self, model: nn.Module, cfg: TrialConfig, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.probe = OverfitProbe(cfg.method, data, eps=self.eps, seed=cfg.runtime.seed,
                                  batch_size=cfg.eval.batch_size)

    def epoch_end(self, epoch: int) -> dict[str, float]:
        return self.probe(self.model, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe.load_state_dict(state["probe"])
