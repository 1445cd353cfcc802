"""Transcriptions of the single-step methods' official code, for `test_method_fast_at.py`.

Each function restates, formula for formula, what the cited lines compute; they live in the
tests, never in the project. What a transcription changes, it says here:
- Random draws become arguments (``start``): the test hands the project's own draw to both.
- Normalised space becomes pixel space: the originals scale eps, alpha and the [0, 1]
  limits by 1/std per channel (mean mu: limits (0 - mu)/std, (1 - mu)/std), which is the
  same arithmetic as pixel space with mu = 0, std = 1; the project's models normalise inside.
- `.cuda()`, apex's loss scaling and the optimiser step go; the perturbation's gradient is
  taken with `torch.autograd.grad` instead of `loss.backward()` then `delta.grad` (the
  same gradient; the originals zero the parameters' gradients before their training step).
- The originals run the attack's forward in the model's train mode; ``attack_mode`` keeps
  that ("train", the default) or follows the project's eval-mode attacks ("eval").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The commits read (`git log -1` of each stored repository).
FAST_ADVERSARIAL = "locuslab/fast_adversarial@54f728755e71857b632882ba6d6cef22f56e2172"
N_FGSM = "pdejorge/N-FGSM@0a9e4f040b89a4bcd85763a34dea7866416927a2"

LOWER, UPPER = 0.0, 1.0  # the image limits in pixel space


def _clamp(x: torch.Tensor, lower, upper) -> torch.Tensor:
    # utils.py `clamp` (both repositories): torch.max(torch.min(X, upper), lower)
    return torch.max(torch.min(x, torch.as_tensor(upper, dtype=x.dtype)),
                     torch.as_tensor(lower, dtype=x.dtype))


def _sign_grad(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor,
               attack_mode: str) -> torch.Tensor:
    was = model.training
    model.train(attack_mode == "train")
    delta = delta.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x + delta), y)  # the mean over the batch, as there
    grad = torch.autograd.grad(loss, delta)[0].detach()
    model.train(was)
    return torch.sign(grad)


# --------------------------------------------------------------------------- FGSM-RS
# locuslab/fast_adversarial, CIFAR10/train_fgsm.py, main(), lines 105-121
# (`--delta-init random`; defaults: epsilon 8, alpha 10, lines 30-31).

def fgsm_rs_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *,
                 epsilon: float, alpha: float, attack_mode: str = "train"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, x + delta). ``start`` is the draw delta ~ U(-epsilon, epsilon) (line 109)."""
    delta = _clamp(start, LOWER - x, UPPER - x)  # line 110
    sign = _sign_grad(model, x, delta, y, attack_mode)  # lines 111-116
    delta = _clamp(delta + alpha * sign, -epsilon, epsilon)  # line 117
    delta = _clamp(delta, LOWER - x, UPPER - x)  # line 118
    delta = delta.detach()
    output = model(x + delta)  # line 120, in train mode
    return F.cross_entropy(output, y), x + delta


# ---------------------------------------------------------------------------- N-FGSM
# pdejorge/N-FGSM, train.py, main(), lines 216-240 (defaults: epsilon 8, alpha 8,
# unif 2.0, clip -1, lines 45-62; no SVHN warm-up).

def n_fgsm_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *,
                epsilon: float, alpha: float, clip: float = -1.0,
                attack_mode: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, x + delta). ``start`` is the draw eta ~ U(-unif * eps, unif * eps) (line
    220); ``clip`` relative to epsilon, -1 (the default): none."""
    eta = _clamp(start, LOWER - x, UPPER - x)  # line 221
    sign = _sign_grad(model, x, eta, y, attack_mode)  # lines 222-227
    delta = eta + alpha * sign  # line 229
    delta = _clamp(delta, LOWER - x, UPPER - x)  # line 231
    if clip > 0:  # lines 232-233 (clip = args.clip * epsilon, line 147)
        delta = _clamp(delta, -clip * epsilon, clip * epsilon)
    delta = delta.detach()
    output = model(x + delta)  # line 237, in train mode
    return F.cross_entropy(output, y), x + delta


# ------------------------------------------------------------- the early-stopping rule
# locuslab/fast_adversarial, CIFAR10/train_fgsm.py, main(), lines 93 and 130-140.

def early_stop_epoch(robust_accs: list[float]) -> int | None:
    """The epoch (0-based) at whose end the loop breaks, given each epoch's PGD accuracy
    on the probe batch; None: it never does."""
    prev_robust_acc = 0.0  # line 93
    for epoch, robust_acc in enumerate(robust_accs):
        if robust_acc - prev_robust_acc < -0.2:  # line 137
            return epoch
        prev_robust_acc = robust_acc  # line 139
    return None


# locuslab/fast_adversarial, CIFAR10/utils.py, attack_pgd, lines 55-85 (restarts 1: the
# early-stop check's call, train_fgsm.py line 133), then the accuracy of lines 134-136.

def attack_pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       start: torch.Tensor, *, epsilon: float, alpha: float,
                       attack_iters: int) -> torch.Tensor:
    """Per sample, whether the model is right at attack_pgd's result. A sample the model
    gets wrong is frozen where it is (only the still-correct ones step, line 66)."""
    delta = _clamp(start, LOWER - x, UPPER - x)  # line 62
    for _ in range(attack_iters):
        output = model(x + delta)
        index = torch.where(output.max(1)[1] == y)  # line 66
        if len(index[0]) == 0:
            break
        d = delta.clone().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x + d), y), d)[0].detach()
        dd = _clamp(delta[index[0]] + alpha * torch.sign(grad[index[0]]), -epsilon, epsilon)
        dd = _clamp(dd, LOWER - x[index[0]], UPPER - x[index[0]])  # line 79
        delta = delta.clone()
        delta[index[0]] = dd
    with torch.no_grad():
        output = model(_clamp(x + delta, LOWER, UPPER))  # train_fgsm.py line 135
    return output.max(1)[1] == y
