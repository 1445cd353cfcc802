"""Transcriptions of FAAL's official code, for `test_method_faal.py` (see reference_code.py
for the habits: random draws become arguments, hard-coded 10 classes become num_classes,
`.cuda()` and the mean/std normalisation go since the project's models normalise inside).

Repository TrustAI/FAAL, commit below; files: `FAAL.py` (class `DAW`: the primal over the
class distribution, solved with CVXPY), `utils.py` (`cw`, `pgd_attack`, `attack_trade`)
and `ft_prn.py` (the fine-tuning loop's batch, lines 190-272; `ft_wrn.py` is the same).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FAAL = "TrustAI/FAAL@b20ee9dbe60c5ab700eaab3d41faa10e5295d39a"


# ---------------------------------------------------------------------------- FAAL.py

def daw_primal(y: torch.Tensor, class_margin: torch.Tensor, num_classes: int,
               r_choice: float) -> np.ndarray:
    """`DAW._initialise_FAAL_problem` + `solve_weight` (learning_approach 'kl', output
    'weights'): p = Variable(N, nonneg), N = num_classes (the code's train_batch_size=10),
    maximise sum(multiply(p[y], nn_loss[y])) s.t. sum(p) == 1, sum(kl_div(1/N, p)) <= r;
    r <= 0 returns uniform weights. The code solves with ECOS (MOSEK, SCS on failure); ECOS
    is no longer shipped with CVXPY 1.9, so CLARABEL with tight tolerances solves it here.
    """
    import cvxpy as cp

    n = num_classes
    if r_choice <= 0:
        return np.ones(n) / n
    pemp = 1 / n * np.ones(n)
    p = cp.Variable(shape=n, nonneg=True)
    nn_loss = cp.Parameter(shape=n)
    nn_loss.value = np.array(class_margin.detach().cpu().numpy(), dtype=np.float64)
    yy = y.cpu().numpy()
    objective = cp.Maximize(cp.sum(cp.multiply(p[0:n][yy], nn_loss[yy])))
    constraints = [cp.sum(p) == 1, cp.sum(cp.kl_div(pemp, p)) <= cp.Constant(r_choice)]
    cp.Problem(objective, constraints).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return p.value


# --------------------------------------------------------------------------- utils.py

def cw(outputs: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`cw`: per sample, max over the other classes of softmax minus the label's softmax."""
    outputs = F.softmax(outputs, 1)
    label_mask = F.one_hot(y, num_classes).to(torch.bool)
    label_logit = outputs[label_mask]
    others = outputs[~label_mask].reshape(-1, num_classes - 1)
    top_other_logit, _ = torch.max(others, dim=1)
    return top_other_logit - label_logit


def pgd_attack(model: nn.Module, X: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *,
               epsilon: float, alpha: float, attack_iters: int) -> torch.Tensor:
    """`pgd_attack` with restarts=1, use_CWloss=False: delta = U(-eps, eps) (``start``),
    clamped into [0, 1] - X; each step delta + alpha * sign(grad mean CE), clamped to
    [-eps, eps] then to [0, 1] - X. Returns the perturbation (the code keeps the restart's
    delta where its CE >= 0, i.e. always)."""
    delta = start.clone()
    delta.data = torch.max(torch.min(delta, 1 - X), 0 - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        loss = F.cross_entropy(model(X + delta), y)
        (grad,) = torch.autograd.grad(loss, [delta])  # loss.backward(); delta.grad
        d = torch.clamp(delta + alpha * torch.sign(grad), -epsilon, epsilon)
        d = torch.max(torch.min(d, 1 - X), 0 - X)
        delta = d.detach().requires_grad_(True)
    return delta.detach()


def attack_trade(model: nn.Module, x_natural: torch.Tensor, start: torch.Tensor, *,
                 epsilon: float, step_size: float, attack_iters: int) -> torch.Tensor:
    """`attack_trade`: x_adv = x + 0.001 * randn (``start``); each step the sign of the
    gradient of KL_sum(f(x_adv) || f(x)), projected onto the eps ball and [0, 1]."""
    x_adv = x_natural.detach() + start.detach()
    for _ in range(attack_iters):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1),
                               F.softmax(model(x_natural), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv - x_natural


# ------------------------------------------------------------------------- ft_prn.py

Solver = Callable[[torch.Tensor, float], torch.Tensor]


def linear_coefficients(y: torch.Tensor, nn_loss: torch.Tensor) -> torch.Tensor:
    """The primal's objective sum_i p[y_i] * nn_loss[y_i] as coefficients of p: coef_c =
    sum over the batch's samples of class c of nn_loss[c]."""
    coef = torch.zeros_like(nn_loss)
    for i in range(len(y)):
        coef[y[i]] += nn_loss[y[i]]
    return coef


def ft_batch_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                  solve: Solver, *, loss_kind: str, num_classes: int, epsilon: float,
                  alpha: float, steps: int, scale: float, beta: float = 6.0,
                  float32_weights: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of `ft_prn.py` (``--loss AT`` or ``TRADES``): (loss, X_adv, weights).

    Where the code calls `DAW.solve_weight(y, class_margin)` (CVXPY), ``solve(coef, r)``
    returns the maximiser of coef @ p over the simplex within KL(uniform || p) <= r (the
    test passes the project's closed form, itself checked against CVXPY on `daw_primal`).
    The code's weights are float32 (`.float()`; ``float32_weights=False`` keeps the
    solver's dtype, to compare at float64's precision); its TRADES loss hard-codes beta 6.
    """
    model.eval()
    if loss_kind == "AT":
        perturbation = pgd_attack(model, X, y, start, epsilon=epsilon, alpha=alpha,
                                  attack_iters=steps)
    else:
        perturbation = attack_trade(model, X, start, epsilon=epsilon, step_size=alpha,
                                    attack_iters=steps)
    X_adv = (X + perturbation.detach()).clamp(0, 1)
    model.train()
    output = model(X_adv)
    output_clean = model(X)
    loss_margin = cw(output, y, num_classes)
    loss_ce = F.cross_entropy(output, y, reduction="none")
    class_margin = torch.zeros(num_classes, dtype=output.dtype)
    for cc in range(num_classes):
        class_margin[cc] += (loss_margin[y == cc]).mean()
    class_margin = torch.where(torch.isnan(class_margin), -torch.ones_like(class_margin),
                               class_margin)
    valid_num = len(class_margin)
    if scale > 0:
        coef = linear_coefficients(y, class_margin.detach())
        weights = solve(coef, scale).detach()
        weights = weights.float() if float32_weights else weights
    else:
        weights = torch.ones(num_classes) / num_classes
    if loss_kind == "AT":
        loss = (loss_ce * weights[y]).sum() * valid_num / len(y)
    else:
        loss_kl = F.kl_div(F.log_softmax(output, dim=1), F.softmax(output_clean, dim=1),
                           reduction="none").sum(1) * beta + F.cross_entropy(
                               output_clean, y, reduction="none")
        loss = (loss_kl * weights[y]).sum() * valid_num / len(y)
    return loss, X_adv, weights
