"""Signed L-inf PGD in pixel space, with per-sample bounds, step sizes and directions.

CAAT sends some samples adversarial (ascend the loss) and others anti-adversarial (descend
it), each with its own bound eps_i. One signed PGD handles both at once: a per-sample
``sign`` of +1 or -1 and per-sample ``eps``/``step_size`` tensors, so a mixed batch costs
the same as a plain PGD (one forward and one backward per step).

Models normalise inside ``forward``, so the ball is taken around the pixels x and clipped
to [0, 1] (the original implementation clamped normalised images, which distorts the ball).

All functions are pure: the device comes from the inputs, no optimiser, no globals. The
model runs in eval mode during the attack (BatchNorm uses and keeps its running statistics,
and samples do not interact through batch statistics), and every module's mode is restored
afterwards; the original CAAT code left BatchNorm in eval mode after attacking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

Objective = Callable[[torch.Tensor], torch.Tensor]
PerSample = float | torch.Tensor

RANDOM_STARTS = ("uniform", "normal", "none")


def ce_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample, shape (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def kl_per_sample(logits_adv: torch.Tensor, logits_clean: torch.Tensor, *,
                  detach_clean: bool = True) -> torch.Tensor:
    """TRADES' KL(p_clean || p_adv) per sample, summed over classes, shape (B,).

    The clean distribution is a constant target by default (as in the TRADES attack). Zhang
    et al.'s training loss lets the gradient flow through the clean branch too; pass
    ``detach_clean=False`` for that. Computed from log-softmaxes for numerical stability.
    """
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    log_p_clean = F.log_softmax(logits_clean.detach() if detach_clean else logits_clean, dim=1)
    return F.kl_div(log_p_adv, log_p_clean, reduction="none", log_target=True).sum(dim=1)


def _per_sample(name: str, value: PerSample, x: torch.Tensor) -> torch.Tensor:
    """A float or a (B,) tensor as a tensor broadcastable over x's (C, H, W)."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name}: expected a float or a tensor of shape ({x.shape[0]},), "
                         f"got shape {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.dim() - 1)))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own mode on exit, even on error.

    Restoring per module (not ``model.train(was_training)``) keeps deliberately frozen parts,
    e.g. a BatchNorm kept in eval inside a training model, as the caller left them.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _random_start(x: torch.Tensor, eps: torch.Tensor, kind: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    if kind == "none":
        return torch.zeros_like(x)
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    dev = generator.device if generator is not None else x.device
    if kind == "uniform":
        u = torch.rand(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
        return (2 * u - 1) * eps
    # TRADES' training start: a tiny Gaussian, just enough to make the KL gradient non-zero.
    return 0.001 * torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Onto the eps ball around x, then onto [0, 1]; eps_i = 0 gives x_i exactly."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)


def pgd(model: nn.Module, x: torch.Tensor, objective: Objective, *,
        eps: PerSample, step_size: PerSample, steps: int, sign: PerSample = 1.0,
        random_start: str = "uniform", generator: torch.Generator | None = None,
        init_delta: torch.Tensor | None = None) -> torch.Tensor:
    """Signed L-inf PGD on ``objective(model(x'))`` in the pixel ball ||x' - x||_inf <= eps.

    Args:
        model: maps pixels in [0, 1] to logits; run in eval mode here, modes restored after.
        x: clean pixels in [0, 1], shape (B, ...).
        objective: logits -> per-sample loss (B,). Samples must not interact through it,
            since the gradient of the summed objective is used for all samples at once.
        eps, step_size, sign: floats or per-sample (B,) tensors. sign=+1 ascends the
            objective (adversarial), -1 descends it (anti-adversarial); a sign tensor mixes
            both in one run.
        steps: number of gradient steps (one forward and one backward each).
        random_start: "uniform" in the eps ball, "normal" (0.001 * N(0, 1), TRADES' training
            start) or "none".
        generator: optional torch.Generator for the random start.
        init_delta: an explicit start perturbation (projected), replacing random_start;
            lets callers give several attacks the very same start.

    Returns:
        x_adv, detached, with |x_adv - x| <= eps per sample and x_adv in [0, 1]. The model's
        parameters' ``.grad`` fields are left untouched (gradients via torch.autograd.grad).
    """
    if random_start not in RANDOM_STARTS:
        raise ValueError(f"random_start: unknown '{random_start}'; allowed: "
                         f"{', '.join(RANDOM_STARTS)}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps: must be a non-negative integer, got {steps}")
    x = x.detach()
    eps_t = _per_sample("eps", eps, x)
    if bool((eps_t < 0).any()):
        raise ValueError("eps: must be >= 0 for every sample")
    step_t = _per_sample("step_size", step_size, x) * _per_sample("sign", sign, x)

    delta = (init_delta if init_delta is not None
             else _random_start(x, eps_t, random_start, generator))
    x_adv = _project(x + delta, x, eps_t)
    with eval_mode(model), torch.enable_grad():
        for _ in range(int(steps)):
            x_adv.requires_grad_(True)
            loss = objective(model(x_adv))
            if loss.shape != (x.shape[0],):
                raise ValueError(f"objective: must return a per-sample loss of shape "
                                 f"({x.shape[0]},), got {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            x_adv = _project(x_adv.detach() + step_t * grad.sign(), x, eps_t)
    return x_adv.detach()


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
           eps: PerSample, step_size: PerSample, steps: int, sign: PerSample = 1.0,
           random_start: str = "uniform", generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """PGD on cross-entropy: Madry's attack (sign=+1), anti-adversarial (-1), or mixed."""
    return pgd(model, x, lambda logits: ce_per_sample(logits, y), eps=eps,
               step_size=step_size, steps=steps, sign=sign, random_start=random_start,
               generator=generator)


def pgd_trades(model: nn.Module, x: torch.Tensor, logits_clean: torch.Tensor, *,
               eps: PerSample, step_size: PerSample, steps: int,
               random_start: str = "normal", generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """TRADES' inner maximisation: ascend KL(p_clean || p_adv) from a tiny Gaussian start.

    ``logits_clean`` is a constant target (detached); compute it however the method wants
    (TRADES uses the model's clean logits).
    """
    target = logits_clean.detach()
    return pgd(model, x, lambda logits: kl_per_sample(logits, target), eps=eps,
               step_size=step_size, steps=steps, sign=1.0, random_start=random_start,
               generator=generator)
