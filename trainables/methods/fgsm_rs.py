"""FGSM-RS (Wong, Rice, Kolter, ICLR 2020, "Fast is better than free"): one FGSM step of
size alpha from a uniform start in the eps ball, projected back onto the ball and [0, 1];
cross-entropy on the result. Official code: locuslab/fast_adversarial (CIFAR10/
train_fgsm.py, `--delta-init random`; MNIST/train_mnist.py).

alpha = 1.25 eps is the code's default on both datasets (10/255 at 8/255; 0.375 at 0.3) and
the paper's recommendation; much larger steps overfit catastrophically, which the probe
(`trainables.methods.overfit`) reports each epoch. As the project's attacks do, the FGSM
gradient is taken in eval mode (the code took it in train mode, BatchNorm batch statistics
included).
"""

from __future__ import annotations

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


class FGSMRSKnobs(FastATKnobs):
    name: Literal["fgsm_rs"] = "fgsm_rs"
    step_mult: float = Field(default=1.25, gt=0.0, description=(
        "FGSM step alpha as a multiple of eps (Wong et al.: 1.25)"))


def fgsm_rs_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                     step_size: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_adv = Proj(x + delta + step_size * sign(grad CE at x + delta)), with delta
    uniform in the eps ball (or ``noise``, projected) and Proj onto the ball and [0, 1]:
    one step of `attacks.pgd`, in eval mode."""
    return pgd(model, x, lambda logits: ce_per_sample(logits, y), eps=eps,
               step_size=step_size, steps=1, random_start="uniform", init_delta=noise)


class FGSMRS(ProbedMethod):
    name = "fgsm_rs"
    knobs = FGSMRSKnobs

    def __init__(self, model: nn.Module, cfg: TrialConfig, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        self.step_size = cfg.method.step_mult * self.eps

    def step(self, batch: Batch, lr: float) -> StepResult:
        x_adv = fgsm_rs_examples(self.model, batch.x, batch.y, eps=self.eps,
                                 step_size=self.step_size)
        return StepResult(F.cross_entropy(self.model(x_adv), batch.y))
