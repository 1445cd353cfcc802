"""Generated datasets, `gmm` and `synthetic`: drawn from the seed, no files to find.

Same contract as the datasets on disk (`trainables.data`): float32 images in [0, 1],
N x C x H x W, int64 labels, on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from trainables.config import DatasetConfig
from trainables.data import DatasetSplits, augment_flag


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    # Class counts differ by at most one; shuffled so no batch sees a single class.
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-6).tolist())


def gmm_class_stds(cfg: DatasetConfig) -> np.ndarray:
    """Per-class std before clipping: geometric from gmm_spread, class 0 tightest."""
    ranks = np.arange(cfg.num_classes) / (cfg.num_classes - 1)
    return cfg.gmm_spread * cfg.gmm_spread_ratio ** ranks


def load_gmm(cfg: DatasetConfig, seed: int = 0) -> DatasetSplits:
    """Isotropic Gaussian classes around random means in [0.2, 0.8]^D, clipped to [0, 1].

    Classes differ only in spread, which is what the paper's theory is about: wide classes
    are harder and suffer most from a single perturbation bound.
    """
    rng = np.random.default_rng(seed)
    dim = math.prod(cfg.shape)
    means = rng.uniform(0.2, 0.8, size=(cfg.num_classes, dim)).astype(np.float32)
    stds = gmm_class_stds(cfg).astype(np.float32)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = _balanced_labels(n, cfg.num_classes, rng)
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        x = np.clip(means[y] + stds[y, None] * noise, 0.0, 1.0)
        return torch.from_numpy(x.reshape(n, *cfg.shape)), torch.from_numpy(y)

    train_x, train_y = draw(cfg.n_train)
    test_x, test_y = draw(cfg.n_test)
    mean, std = _channel_stats(train_x)
    return DatasetSplits("gmm", train_x, train_y, test_x, test_y, cfg.num_classes, mean, std,
                         augment_flag(cfg, False))


def load_synthetic(cfg: DatasetConfig, seed: int = 0) -> DatasetSplits:
    """Uniform noise images with random labels: only for timing, nothing to learn."""
    g = torch.Generator().manual_seed(seed)
    c = cfg.shape[0]
    train_x = torch.rand(cfg.n_train, *cfg.shape, generator=g)
    train_y = torch.randint(cfg.num_classes, (cfg.n_train,), generator=g)
    test_x = torch.rand(cfg.n_test, *cfg.shape, generator=g)
    test_y = torch.randint(cfg.num_classes, (cfg.n_test,), generator=g)
    # Moments of U(0, 1), so normalisation does not depend on the draw.
    return DatasetSplits("synthetic", train_x, train_y, test_x, test_y, cfg.num_classes,
                         (0.5,) * c, (1 / math.sqrt(12),) * c, augment_flag(cfg, False))
