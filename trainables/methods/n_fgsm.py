"""N-FGSM (de Jorge et al., NeurIPS 2022, "Make some noise"): one FGSM step of size alpha
from a uniform start in the *k eps* ball, clipped to [0, 1] only, never back to the eps
ball; cross-entropy on the result. Official code: pdejorge/N-FGSM (train.py).

The code's defaults: k = 2 (noise U(-2 eps, 2 eps)), alpha = eps (8/255 at 8/255), and no
clipping to an eps ball (its `--clip` is off by default), so the training perturbation
reaches (k + 1) eps. The start and the result are both clipped to [0, 1], as there. As the
project's attacks do, the gradient is taken in eval mode (the code: train mode).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainables.attacks import ce_per_sample, pgd
from trainables.methods.base import Batch, MethodData, StepResult
from trainables.methods.overfit import FastATKnobs, ProbedMethod

if TYPE_CHECKING:
    from trainables.config import TrialConfig


class NFGSMKnobs(FastATKnobs):
    name: Literal["n_fgsm"] = "n_fgsm"
    noise_mult: float = Field(default=2.0, ge=0.0, description=(
        "k: the start is uniform in the k * eps ball (de Jorge et al.: 2)"))
    step_mult: float = Field(default=1.0, gt=0.0, description=(
        "FGSM step alpha as a multiple of eps (de Jorge et al.: 1)"))


def uniform_noise(x: torch.Tensor, radius: float) -> torch.Tensor:
    """U(-radius, radius) per pixel, from torch's global generator."""
    return (2 * torch.rand_like(x) - 1) * radius


def n_fgsm_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, noise: torch.Tensor,
                    step_size: float) -> torch.Tensor:
    """clip01(x + eta + step_size * sign(grad CE at x + eta)), eta = ``noise`` clipped so
    x + eta is in [0, 1]: one step of `attacks.pgd`, in eval mode, with an unbounded ball
    (eps = inf), so that both of its projections are the clip to [0, 1] alone."""
    return pgd(model, x, lambda logits: ce_per_sample(logits, y), eps=math.inf,
               step_size=step_size, steps=1, init_delta=noise)


class NFGSM(ProbedMethod):
    name = "n_fgsm"
    knobs = NFGSMKnobs

    def __init__(self, model: nn.Module, cfg: TrialConfig, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.step_size = cfg.method.step_mult * self.eps
        self.noise_radius = cfg.method.noise_mult * self.eps

    def step(self, batch: Batch, lr: float) -> StepResult:
        noise = uniform_noise(batch.x, self.noise_radius)
        x_adv = n_fgsm_examples(self.model, batch.x, batch.y, noise=noise,
                                step_size=self.step_size)
        return StepResult(F.cross_entropy(self.model(x_adv), batch.y))
