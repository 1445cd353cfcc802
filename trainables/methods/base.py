"""The method interface every training method implements.

A method owns whatever state it needs besides the model and the model's optimiser (a
meta-net and its optimiser, class multipliers, running class losses) and exposes it through
``state_dict``/``load_state_dict`` so a trial resumes exactly. Shared parts are components
a method holds (`MetaLearner`, `ClassMultipliers`), each under its own key of that state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from trainables.config import TrialConfig


@dataclass
class MethodData:
    """What a method may know about the training problem (all tensors on the trial device)."""

    num_classes: int
    train_labels: torch.Tensor  # (N,) observed (possibly noisy) training labels
    class_counts: torch.Tensor  # (C,) training samples per class (observed labels)
    meta_x: torch.Tensor  # clean balanced meta set, for meta-learning and FRL multipliers
    meta_y: torch.Tensor
    device: torch.device
    # The model's optimiser, to read (never to step): a look-ahead step takes its momentum
    # buffers and hyper-parameters (CAAT's virtual step). None outside a trial.
    optimizer: torch.optim.Optimizer | None = None

    @property
    def class_prior(self) -> torch.Tensor:
        return self.class_counts.float() / self.class_counts.sum()


@dataclass
class Batch:
    x: torch.Tensor  # (B, C, H, W) pixels in [0, 1]
    y: torch.Tensor  # (B,) observed labels
    idx: torch.Tensor  # (B,) positions in the training set


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, with graph: the trial loop calls backward() on it
    # Sums over the batch (the loop divides by samples seen), e.g. {"frac_anti": 37.0}.
    sums: dict[str, float] = field(default_factory=dict)
    # Per-sample values, each (B,) in the batch's order (e.g. CAAT's direction and bound),
    # which the loop gathers over the epoch for diagnostics (`trainables.diagnostics`).
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class: plain defaults for the hooks; subclasses implement ``step``."""

    name: str = "base"

    def __init__(self, model: nn.Module, cfg: TrialConfig, data: MethodData) -> None:
        self.model = model
        self.cfg = cfg
        self.data = data
        self.eps = cfg.train_eps
        self.step_size = cfg.train_step_size

    def step(self, batch: Batch, lr: float) -> StepResult:
        """Loss on one training batch; ``lr`` is the model optimiser's current rate."""
        raise NotImplementedError

    def epoch_start(self, epoch: int) -> None:
        """Called before the first batch of each epoch (0-based)."""

    def epoch_end(self, epoch: int) -> dict[str, float]:
        """Called after the last batch; returns extra per-epoch metrics to report."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
