"""CAAT's pure pieces besides the method itself (`caat.py`): the direction ablations
(`method.direction_policy: random | loss_rank`: who else could pick each sample's side,
keeping everything else of CAAT), the meta objective's per-sample preference, and the
per-sample bounds of `bound_mode: sample`."""

from __future__ import annotations

import torch


def random_directions(n: int, fraction: float, *, device: torch.device | str = "cpu",
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(anti, score): each sample anti-adversarial with probability ``fraction``; the score
    is the draw itself, flipped so that a higher score means anti."""
    u = torch.rand(n, device=device, generator=generator)
    return u < fraction, -u


def loss_rank_directions(ce: torch.Tensor, y: torch.Tensor, fraction: float,
                         num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(anti, score): within each observed class of the batch, the round(fraction * n_c)
    samples of highest clean loss go anti-adversarial (pure; the paper's intuition that
    noisy labels have high loss). The score is the loss quantile within the class, in
    (0, 1); ranking within classes keeps a hard class from taking every anti slot."""
    n = len(y)
    order = torch.argsort(ce, stable=True)
    order = order[torch.argsort(y[order], stable=True)]  # by class, ascending loss within
    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(n, device=y.device) - starts[y[order]]
    n_c = counts[y].to(ce.dtype)
    anti = rank.to(ce.dtype) >= n_c - torch.round(fraction * n_c)
    return anti, (rank.to(ce.dtype) + 0.5) / n_c


def anti_preference(weight_grad: torch.Tensor) -> torch.Tensor:
    """Each sample's meta preference for the anti-adversarial side from the meta gradient
    of its (w_adv, w_anti): d(meta)/d(w_adv) - d(meta)/d(w_anti), > 0 where moving weight
    from the adversarial to the anti-adversarial term lowers the meta loss (pure). It shows
    what the meta objective rewards, whatever the meta-net makes of it."""
    return weight_grad[:, 0] - weight_grad[:, 1]


def sample_bound_scale(out: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-sample bound scale in [lo, hi] from the meta-net's third output (pure)."""
    return lo + (hi - lo) * torch.sigmoid(out[:, 2])


def rescale_perturbation(x: torch.Tensor, x_pert: torch.Tensor, eps_used: torch.Tensor,
                         eps_new: torch.Tensor) -> torch.Tensor:
    """x + (x_pert - x) * eps_new / eps_used, clipped to [0, 1]: the same perturbation
    stretched to another bound, differentiable in eps_new (how the meta-net learns bounds)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    unit = (x_pert - x) / eps_used.clamp_min(1e-12).view(shape)
    return (x + unit * eps_new.view(shape)).clamp(0.0, 1.0)
