"""A trial's problem: the scenario's train/meta/val/test tensors on the trial's device.

`build_problem` is the one way from a config (and a dataset, loaded or handed over) to the
tensors a trial trains and evaluates on; `trainables.trial` builds everything else on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainables import data as data_mod
from trainables.autoattack import check_classes as check_autoattack_classes
from trainables.config import TrialConfig
from trainables.errors import ConfigError
from trainables.scenarios import Scenario, pick_test_subset, scenario_from_config


@dataclass
class Problem:
    """The tensors of one scenario on the trial's device."""

    train_x: torch.Tensor
    train_y: torch.Tensor  # observed labels
    meta_x: torch.Tensor
    meta_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # Positions of test_x's images in the dataset's test split (all of it, or the fixed
    # subset `dataset.test_size` asks for), so results can name the images they used.
    test_idx: np.ndarray
    num_classes: int
    augment: bool
    scenario: Scenario
    splits: data_mod.DatasetSplits = field(repr=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' asked for but no CUDA device is available; "
                         "allowed here: auto, cpu")
    return torch.device(name)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last: 1.6x faster training steps for small_cnn on CPU (oneDNN), and the
    # layout cuDNN prefers on GPUs; the model is converted to match in build_model.
    return images.to(device).contiguous(memory_format=torch.channels_last)


def evaluated_test_positions(cfg: TrialConfig, splits: data_mod.DatasetSplits) -> np.ndarray:
    """Ascending positions in the dataset's test split of the images a trial evaluates on:
    all of them, or the fixed subset `dataset.test_size` asks for."""
    if cfg.dataset.test_size is None:
        return np.arange(len(splits.test_y))
    return pick_test_subset(splits.test_y.numpy(), splits.num_classes, cfg.dataset.test_size)


def evaluated_test_split(cfg: TrialConfig, splits: data_mod.DatasetSplits
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images and labels a trial evaluates on (CPU)."""
    if cfg.dataset.test_size is None:
        return splits.test_x, splits.test_y
    keep = torch.as_tensor(evaluated_test_positions(cfg, splits))
    return splits.test_x[keep], splits.test_y[keep]


def build_problem(cfg: TrialConfig, device: torch.device,
                  splits: data_mod.DatasetSplits | None = None) -> Problem:
    """Load (or take) the dataset, build the seeded scenario, move its splits to ``device``."""
    if splits is None:
        splits = data_mod.load(cfg.dataset, seed=cfg.runtime.seed)
    # Before any training: an AutoAttack the class count rules out fails now, not at the end.
    check_autoattack_classes(cfg.eval, splits.num_classes)
    scenario = scenario_from_config(splits.train_y.numpy(), splits.num_classes, cfg)

    def take(idx: np.ndarray) -> torch.Tensor:
        return to_device(splits.train_x[torch.as_tensor(idx)], device)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.int64, device=device)

    test_x, test_y = evaluated_test_split(cfg, splits)
    return Problem(
        train_x=take(scenario.train_idx), train_y=labels(scenario.train_labels),
        meta_x=take(scenario.meta_idx), meta_y=labels(splits.train_y.numpy()[scenario.meta_idx]),
        val_x=take(scenario.val_idx), val_y=labels(splits.train_y.numpy()[scenario.val_idx]),
        test_x=to_device(test_x, device), test_y=test_y.to(device),
        test_idx=evaluated_test_positions(cfg, splits),
        num_classes=splits.num_classes, augment=data_mod.augment_flag(cfg.dataset, splits.augment),
        scenario=scenario, splits=splits)
