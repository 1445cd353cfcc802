"""CAAT's direction ablations (`method.direction_policy: random | loss_rank`): who else
could pick each sample's side, keeping everything else of CAAT (bounds, multipliers, loss).
They isolate what the meta-net's choice adds; pure functions of the batch."""

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
