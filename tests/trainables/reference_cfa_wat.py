"""Transcriptions of CFA's and WAT's official code, for `test_method_cfa_wat.py`.

Each function restates, formula for formula, what the cited lines compute; they live in the
tests, never in the project. As in `reference_code.py`: random draws become arguments
(``start``), hard-coded ten classes become ``num_classes``, `.cuda()` and `normalize_cifar`
go (the project's models normalise inside; the test models have no normalisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The commits read (`git log -1` of each fetched repository).
CFA = "PKU-ML/CFA@071f3334a59d144cedbe65b18019c9757bece6f2"
WAT = "boqili/WAT@62d1184f9b88909c9e782ab8234128324235ac84"


# --------------------------------------------------------------------------------- CFA
# PKU-ML/CFA, train.py (`CW_log`, the epoch loop's CCM / CCR / FAWA lines), attack.py
# (`cw_trades_loss`) and utils.py (`weight_average`).

def cw_log_robust(outputs: list[torch.Tensor], targets: list[torch.Tensor],
                  num_classes: int) -> torch.Tensor:
    """`CW_log.update_robust` over the epoch's batches, then `result()`'s m * cw_robust / N
    (train.py lines 49-80): the class-wise robust accuracy when the classes are balanced."""
    n = 0
    cw_robust = torch.zeros(num_classes, dtype=torch.float64)
    for output, y in zip(outputs, targets, strict=True):
        n += len(output)
        correct = output.max(1)[1] == y
        for i, c in enumerate(y):
            if correct[i]:
                cw_robust[c] += 1
    return num_classes * cw_robust / n


def cfa_class_eps_beta(epoch: int, train_robust: torch.Tensor, *, eps: float, beta: float,
                       lambda_1: float, lambda_2: float, begin: int, ccm: bool, ccr: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """train.py lines 146-147 and 195-208: class_eps and class_beta of an epoch, from the
    last epoch's class robust train accuracy (cw_tensor[-1, 1, :]). Without --ccm the
    training attack takes the scalar eps (line 234): the class eps is eps for all."""
    c = len(train_robust)
    class_beta = torch.ones(c, dtype=torch.float64) * (beta / (1 + beta))
    if epoch >= begin:
        class_eps = (torch.ones(c, dtype=torch.float64) * lambda_1 + train_robust) * eps
    else:
        class_eps = torch.ones(c, dtype=torch.float64) * eps
    if ccr and epoch >= begin:
        for i in range(c):
            class_beta[i] = ((lambda_2 + train_robust[i]) * beta
                             / (1 + (lambda_2 + train_robust[i]) * beta))
    else:
        class_beta = torch.ones(c, dtype=torch.float64) * (beta / (1 + beta))
    if not ccm:
        class_eps = torch.ones(c, dtype=torch.float64) * eps
    return class_eps, class_beta


def cw_trades_loss(model: nn.Module, x_natural: torch.Tensor, y: torch.Tensor,
                   start: torch.Tensor, cw_eps: torch.Tensor, cw_beta: torch.Tensor, *,
                   step_size: float, perturb_steps: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attack.py `cw_trades_loss` (``start`` is the 0.001 * randn draw): the KL attack at
    each sample's class eps in eval mode, then, in train mode,
    sum((1 - b_y) CE / B + b_y KL_rows / B). Returns (loss, robust_out, x_adv)."""
    batch_beta = cw_beta[y]
    batch_eps = cw_eps[y]
    base = torch.ones_like(x_natural)
    for sample in range(len(x_natural)):
        base[sample] *= batch_eps[sample]
    batch_eps = base.clone()
    criterion_kl = nn.KLDivLoss(reduction="sum")  # size_average=False
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + start.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                   F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - batch_eps), x_natural + batch_eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y, reduction="none") / batch_size
    cw_criterion = nn.KLDivLoss(reduction="none")
    robust_out = model(x_adv)
    loss_robust = (1.0 / batch_size) * cw_criterion(F.log_softmax(robust_out, dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    loss_robust = loss_robust.sum(1)
    loss = ((1 - batch_beta) * loss_natural + batch_beta * loss_robust).sum()
    return loss, robust_out.clone().detach(), x_adv


def weight_average(model: nn.Module, new_model: nn.Module, decay_rate: float,
                   init: bool = False) -> None:
    """utils.py `weight_average`: every state-dict entry of ``model`` becomes
    decay * its own + (1 - decay) * ``new_model``'s (decay 0 when ``init``)."""
    model.eval()
    new_model.eval()
    state_dict = model.state_dict()
    new_dict = new_model.state_dict()
    if init:
        decay_rate = 0
    for key in state_dict:
        new_dict[key] = (state_dict[key] * decay_rate
                         + new_dict[key] * (1 - decay_rate)).clone().detach()
    model.load_state_dict(new_dict)


def fawa_epoch(fawa_model: nn.Module, model: nn.Module, valid_class_robust: torch.Tensor, *,
               threshold: float, decay_rate: float, seat_init: bool) -> bool:
    """train.py lines 248-257: the gate on the validation split's worst class robust
    accuracy (valid_result[3].min()), and the update; returns SEAT_init."""
    r_min = valid_class_robust.min()
    if r_min >= threshold:
        if not seat_init:
            seat_init = True
            weight_average(fawa_model, model, decay_rate, True)
        else:
            weight_average(fawa_model, model, decay_rate, False)
    else:
        weight_average(fawa_model, model, 1.0, False)
    return seat_init


def checkpoint_index(robust_acc: float, class_robust: torch.Tensor) -> float:
    """train.py line 314: FAWA_data[-1, 1] + FAWA_data[-1, 3], robust accuracy plus the
    worst class's robust accuracy (the code's checkpoint criterion, on the test split)."""
    return float(robust_acc + class_robust.min())


# --------------------------------------------------------------------------------- WAT
# boqili/WAT, worst_class_adversarial_train.py (`TRADES_loss`, `TRADES_classwise_loss`,
# `train`, `validate`, the epoch loop's Hedge lines) and attack_generator.py (`trades`).

def trades_attack(model: nn.Module, data: torch.Tensor, start: torch.Tensor, *,
                  epsilon: float, step_size: float, num_steps: int) -> torch.Tensor:
    """attack_generator.py `trades` (category 'trades', loss_fn 'trades', rand_init):
    x + start, then sign steps on KL_sum(f(x_adv) || f(x)) in eval mode, projected."""
    model.eval()
    x_adv = data.detach().clone() + start
    for _ in range(num_steps):
        x_adv.requires_grad_()
        output = model(x_adv)
        with torch.enable_grad():
            loss_adv = nn.KLDivLoss(reduction="sum")(F.log_softmax(output, dim=1),
                                                     F.softmax(model(data.detach().clone()),
                                                               dim=1))
        (grad,) = torch.autograd.grad(loss_adv, [x_adv])
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, data - epsilon), data + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach()


def trades_loss(adv_logits, natural_logits, target, beta):
    """`TRADES_loss` (lines 53-61)."""
    batch_size = len(target)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    loss_natural = nn.CrossEntropyLoss(reduction="mean")(natural_logits, target)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(adv_logits, dim=1),
                                                    F.softmax(natural_logits, dim=1))
    return loss_natural + beta * loss_robust


def trades_classwise_loss(adv_logits, natural_logits, target):
    """`TRADES_classwise_loss` (lines 63-68): per-sample CE and KL row sums."""
    criterion_kl = nn.KLDivLoss(reduction="none")
    loss_natural = nn.CrossEntropyLoss(reduction="none")(natural_logits, target)
    loss_robust = criterion_kl(F.log_softmax(adv_logits, dim=1),
                               F.softmax(natural_logits, dim=1))
    return loss_natural, loss_robust.sum(dim=1)


def wat_train_loss(adv_logits, natural_logits, target, nat_class_weights,
                   bndy_class_weights, *, beta: float, class_num: int) -> torch.Tensor:
    """`train`'s batch loss (lines 89-105, --alg wat)."""
    iter_nat_loss, iter_bndy_loss = trades_classwise_loss(adv_logits, natural_logits, target)
    for i in range(class_num):
        if i == 0:
            nat_loss = iter_nat_loss[target == i].sum() * nat_class_weights[i]
            bndy_loss = iter_bndy_loss[target == i].sum() * bndy_class_weights[i]
        else:
            nat_loss += iter_nat_loss[target == i].sum() * nat_class_weights[i]
            bndy_loss += iter_bndy_loss[target == i].sum() * bndy_class_weights[i]
    loss = (nat_loss + beta * bndy_loss) / target.shape[0]
    loss += trades_loss(adv_logits, natural_logits, target, beta) * bndy_class_weights[class_num]
    return loss


def validate_costs(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *,
                   class_num: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`validate`'s cost lines (131-157) from each batch's (adv_logits, natural_logits,
    target): the epoch's nat and bndy costs, (class_num + 1,) each."""
    epoch_val_bndy_loss = torch.zeros(class_num + 1, dtype=torch.float64)
    epoch_val_nat_loss = torch.zeros(class_num + 1, dtype=torch.float64)
    val_iter = 0
    for adv_logits, natural_logits, target in batches:
        val_iter += 1
        iter_nat_loss, iter_bndy_loss = trades_classwise_loss(adv_logits, natural_logits,
                                                              target)
        for i in range(class_num):
            epoch_val_nat_loss[i] += iter_nat_loss[target == i].sum()
            epoch_val_bndy_loss[i] += iter_bndy_loss[target == i].sum()
        epoch_val_nat_loss[class_num] += iter_nat_loss.sum() / class_num
        epoch_val_bndy_loss[class_num] += iter_bndy_loss.sum() / class_num
    nat = epoch_val_nat_loss / (val_iter * batch_size) * class_num
    bndy = epoch_val_bndy_loss / (val_iter * batch_size) * class_num
    return nat, bndy


def hedge_weights(valid_nat_cost: torch.Tensor, valid_bndy_cost: torch.Tensor, *,
                  beta: float, eta: float, class_num: int) -> torch.Tensor:
    """The epoch loop's lines 244-248 after the last epoch's `validate`: the (epochs so
    far, class_num + 1) cost rows summed over epochs, exp(eta * sum), normalised to sum
    class_num (nat and bndy weights are the same)."""
    wat_valid_cost = valid_nat_cost + beta * valid_bndy_cost
    class_factor = (torch.sum(wat_valid_cost, dim=0) * eta).exp()
    return class_num * class_factor / class_factor.sum()
