"""The TRADES pieces (Zhang et al. 2019) that `trades`, `frl` and `caat` share: the KL
attack's target and examples, and the loss, plain or with class and sample weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import PerSample, eval_mode, kl_per_sample, pgd_trades


def attack_target(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The KL attack's target distribution (logits), in eval mode like the attack itself,
    so target and attacked logits agree at the start point."""
    with eval_mode(model), torch.no_grad():
        return model(x)


def trades_examples(model: nn.Module, x: torch.Tensor, *, eps: PerSample,
                    step_size: PerSample, steps: int) -> torch.Tensor:
    """TRADES' adversarial examples: ascend KL(f(x) || f(x')) in the eps ball."""
    return pgd_trades(model, x, attack_target(model, x), eps=eps, step_size=step_size,
                      steps=steps)


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float) -> torch.Tensor:
    """Batch-mean CE(clean) + beta * batch-mean KL(p_clean || p_adv) (pure).

    As in Zhang et al., gradients flow through both the clean and the adversarial logits.
    """
    return F.cross_entropy(logits_clean, y) + beta * kl_per_sample(
        logits_adv, logits_clean, detach_clean=False).mean()


def weighted_trades_loss(ce: torch.Tensor, kl: torch.Tensor, c0_y: torch.Tensor,
                         c1_y: torch.Tensor, beta: float, w: torch.Tensor | float = 1.0,
                         w_kl: torch.Tensor | float | None = None) -> torch.Tensor:
    """sum(w*c0[y]*CE)/sum(c0[y]) + beta * sum(w_kl*c1[y]*KL)/sum(c1[y]) (pure); w_kl
    defaults to w (a separate one lets a probe take the two terms' gradients apart).

    With c0 = c1 = 1 and w = 1 this is TRADES' loss (as sums of per-sample terms).
    """
    w_kl = w if w_kl is None else w_kl
    return ((w * c0_y * ce).sum() / c0_y.sum()
            + beta * (w_kl * c1_y * kl).sum() / c1_y.sum())
