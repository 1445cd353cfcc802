"""The interface every training method implements, built-in or from a plugin.

A method is a class with a ``name``, a ``knobs`` model and a ``step``; the trial loop
(`trainables.trial.train_epoch`) owns everything else: the model, the optimiser, the
batches, the learning-rate schedule, evaluation and checkpoints. Per trial:

    method = Cls(model, cfg, data)        # once; cfg.method is an instance of Cls.knobs
    for epoch in ...:
        method.epoch_start(epoch)         # before the first batch (e.g. FRL's multipliers)
        for batch in ...:
            out = method.step(batch, lr)  # model in train mode; returns the loss with graph
            # the loop: optimizer.zero_grad(); out.loss.backward(); optimizer.step()
        extra = method.epoch_end(epoch)   # -> extra per-epoch metrics, reported and logged
    state = method.state_dict()           # saved in every checkpoint; load_state_dict on resume

- ``knobs``: a pydantic model (subclass of `trainables.knobs.Knobs`, with
  ``name: Literal["<name>"]``) of the method's `method.*` keys. Configs and sweep spaces are
  validated against it, MLflow logs its fields as params, and `caat-sweep methods` lists
  them; compose the shared groups (`AttackKnobs`, `TradesKnobs`, ...) rather than copying.
- ``step(batch, lr)``: ``batch.x`` pixels in [0, 1] (N x C x H x W; the model normalises),
  ``batch.y`` the observed labels, ``batch.idx`` their positions in the training set; ``lr``
  the optimiser's current rate. Returns a `StepResult`: the scalar loss (with graph), sums
  over the batch to report as per-sample means (``sums``), and per-sample values for the
  epoch's diagnostics (``per_sample``). Attack with `trainables.attacks` (eval mode inside,
  modes restored) and leave the model's ``.grad`` alone: the loop owns the backward pass.
- State beyond the model and its optimiser (a meta-net, multipliers, running statistics)
  lives on the method and goes through ``state_dict``/``load_state_dict``, so a resumed
  trial continues exactly. Shared parts are components a method holds (`MetaLearner`,
  `ClassMultipliers`), each under its own key of that state.
- Randomness comes from torch's global generator, which the trial seeds and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from trainables.knobs import Knobs

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
    # The training images (N, C, H, W) in [0, 1], in the order of train_labels, for a
    # method that probes a fixed subset of them (catastrophic overfitting) or scores them
    # all at an epoch; and the validation split (clean labels, class-balanced) for a method
    # whose choices read validation (class weights, weight averaging). Never the test split.
    # None outside a trial.
    train_x: torch.Tensor | None = None
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

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
    """Base class: plain defaults for the hooks; subclasses set ``name`` and ``knobs`` and
    implement ``step``. ``self.eps`` and ``self.step_size`` are the training attack's bound
    and step with the dataset's defaults filled in (for methods whose knobs have them)."""

    name: ClassVar[str] = "base"
    knobs: ClassVar[type[Knobs]] = Knobs

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
