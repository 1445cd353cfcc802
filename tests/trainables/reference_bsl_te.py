"""Transcriptions of AT-BSL's and TE's official code, for `test_method_bsl_te.py`.

Each function restates, formula for formula, what one function of the official repository
computes, citing the repository, the commit read (`git log -1`) and the file. They live in
the tests, never in the project. As in `reference_code.py`:
- Random draws become arguments (``start``): the test hands the project's own draw to both.
- `.cuda()`, `Variable` and the optimiser's `zero_grad` (the loop's business) go.
- The originals' attacks call ``model.eval()`` and the loss ``model.train()``; kept here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

AT_BSL = "NISPLab/AT-BSL@23f433e8eeec463f1ec40188966a64d240c33443"
MEMORIZATION_AT = "dongyp13/memorization-AT@5edda6cc135ebfe0785a05a4d08ebfce17e38116"


def _linf_step(x_adv: torch.Tensor, grad: torch.Tensor, x_natural: torch.Tensor,
               step_size: float, epsilon: float) -> torch.Tensor:
    # x_adv + step * sign(grad), then min/max onto the eps ball, then clamp to [0, 1]:
    # the l_inf update every attack below shares.
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
    return torch.clamp(x_adv, 0.0, 1.0)


# ---------------------------------------------------------------------------- AT-BSL
# NISPLab/AT-BSL, at_bsl_loss.py: `BSL` and `pgd_loss` (distance 'l_inf'); the training
# scripts call pgd_loss with epsilon 8/255, step_size 2/255, perturb_steps 10.

def bsl(labels: torch.Tensor, logits: torch.Tensor,
        sample_per_class: torch.Tensor) -> torch.Tensor:
    """CE(logits + log(samples per class), labels), batch mean (no temperature)."""
    spc = sample_per_class.type_as(logits).unsqueeze(0).expand(logits.shape[0], -1)
    return F.cross_entropy(input=logits + spc.log(), target=labels)


def at_bsl_pgd_loss(model: nn.Module, x_natural: torch.Tensor, y: torch.Tensor,
                    samples_per_cls: torch.Tensor, start: torch.Tensor, *,
                    step_size: float, epsilon: float, perturb_steps: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, x_adv): x + 0.001 * randn (``start``), then ``perturb_steps`` sign steps of
    the plain mean CE (the attack never sees the prior) in eval mode; BSL of the
    train-mode model on the result."""
    model.eval()
    x_adv = x_natural.detach() + start.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = _linf_step(x_adv, grad, x_natural, step_size, epsilon)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    return bsl(y, model(x_adv), samples_per_cls), x_adv


# -------------------------------------------------------------------------------- TE
# dongyp13/memorization-AT, train_te.py: `sigmoid_rampup`, and per epoch (1-based)
# weight = sigmoid_rampup(epoch, start_es, end_es) * reg_weight (defaults te_alpha 0.9,
# start_es 90, end_es 150, reg_weight 300, of 200 epochs).

def sigmoid_rampup(current: float, start_es: float, end_es: float) -> float:
    if current < start_es:
        return 0.0
    if current > end_es:
        return 1.0
    phase = 1.0 - (current - start_es) / (end_es - start_es)
    return math.exp(-5.0 * phase * phase)


class SoftLabels:
    """loss.py's `soft_labels` buffer (zeros of num_samples x num_classes) and the update
    both criteria make when ``epoch >= es``: EMA of the eval-mode clean softmax, then the
    batch's rows normalised to sum to one."""

    def __init__(self, num_samples: int, num_classes: int, momentum: float, es: float):
        self.soft_labels = torch.zeros(num_samples, num_classes)
        self.momentum = momentum
        self.es = es

    def update(self, index: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        prob = F.softmax(logits.detach(), dim=1)
        self.soft_labels[index] = (self.momentum * self.soft_labels[index]
                                   + (1 - self.momentum) * prob)
        return self.soft_labels[index] / self.soft_labels[index].sum(1, keepdim=True)


def _mse(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    # ((F.softmax(logits, dim=1) - soft_labels_batch) ** 2).mean(): over batch and classes.
    return ((F.softmax(logits, dim=1) - soft) ** 2).mean()


class PGDTE(SoftLabels):
    """loss.py, `PGD_TE.__call__` (norm 'linf'); ``start`` replaces its uniform draw."""

    def __call__(self, x_natural, y, index, epoch, model, weight, start, *, step_size,
                 epsilon, perturb_steps):
        model.eval()
        logits = model(x_natural)
        active = epoch >= self.es
        soft = self.update(index, logits) if active else None
        x_adv = x_natural.detach() + start
        for _ in range(perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                logits_adv = model(x_adv)
                loss = F.cross_entropy(logits_adv, y)
                if active:
                    loss = loss + weight * _mse(logits_adv, soft)
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = _linf_step(x_adv, grad, x_natural, step_size, epsilon)
        model.train()
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        if active:
            loss = loss + weight * _mse(logits, soft)
        return loss, x_adv


class TRADESTE(SoftLabels):
    """loss.py, `TRADES_TE.__call__` (norm 'linf'); ``start`` replaces 0.001 * randn."""

    def __call__(self, x_natural, y, index, epoch, model, weight, start, *, step_size,
                 epsilon, perturb_steps, beta):
        kl_sum = nn.KLDivLoss(reduction="sum")  # KLDivLoss(size_average=False)
        model.eval()
        batch_size = len(x_natural)
        logits = model(x_natural)
        active = epoch >= self.es
        soft = self.update(index, logits) if active else None
        x_adv = x_natural.detach() + start.detach()
        for _ in range(perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                logits_adv = model(x_adv)
                loss_kl = kl_sum(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1))
                if active:
                    loss = (beta / batch_size) * loss_kl + weight * _mse(logits_adv, soft)
                else:
                    loss = loss_kl
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = _linf_step(x_adv, grad, x_natural, step_size, epsilon)
        model.train()
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
        logits = model(x_natural)
        logits_adv = model(x_adv)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / batch_size) * kl_sum(F.log_softmax(logits_adv, dim=1),
                                                  F.softmax(logits, dim=1))
        loss = loss_natural + beta * loss_robust
        if active:
            loss = loss + weight * _mse(logits, soft)
        return loss, x_adv
