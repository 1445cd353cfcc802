"""Transcriptions of DAFA's and BAT's official code, for `test_method_dafa_bat.py`.

As in `reference_code.py`: each function restates, formula for formula, what one function
of the official repository computes; random draws become arguments (``start``, ``index``),
`.cuda()` goes, hard-coded image shapes (3, 32, 32) become the input's, and the attacks'
gradients come from `torch.autograd.grad` instead of `.backward()` then `.grad` (the same
numbers; the originals' parameter gradients from it are zeroed before the training step).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The commits read (`git log -1` of each stored repository).
DAFA = "rucy74/DAFA@c60ba8352d712c6108480a2ce7e7fa7abf30b48a"
BAT = ("silvercherry/Improving-Robust-Fairness-via-Balance-Adversarial-Training"
       "@9bcee67aedeea64cd5c3790e88d292f7dafe8a8f")


def _kl_sum(log_p: torch.Tensor, logits_target: torch.Tensor) -> torch.Tensor:
    # nn.KLDivLoss(reduction='sum') (size_average=False): sum over batch and classes.
    return nn.KLDivLoss(reduction="sum")(log_p, F.softmax(logits_target, dim=1))


# -------------------------------------------------------------------------------- DAFA
# rucy74/DAFA, utils.py, `calculate_class_weights`.

def calculate_class_weights(probs: np.ndarray, labels: np.ndarray, lamb: float = 1.0
                            ) -> np.ndarray:
    """``probs`` (N, C) and ``labels`` (N,) are memory_dict's 'probs' and 'labels'."""
    num_classes = len(np.unique(labels))
    class_similarity = np.zeros((num_classes, num_classes))
    class_weights = np.ones(num_classes)
    for i in range(num_classes):
        cur_indices = np.where(labels == i)[0]
        class_similarity[i] = np.mean(probs[cur_indices], axis=0)
    for i in range(num_classes):
        for j in range(num_classes):
            if i == j:
                continue
            if class_similarity[i, i] < class_similarity[j, j]:
                class_weights[i] += lamb * class_similarity[i, j] * class_similarity[j, j]
            else:
                class_weights[i] -= lamb * class_similarity[j, i] * class_similarity[i, i]
    return class_weights


# rucy74/DAFA, losses.py, `trades_loss` (the code's default --loss trades).

def dafa_trades_loss(model: nn.Module, x_natural: torch.Tensor, y: torch.Tensor,
                     start: torch.Tensor, class_weights: torch.Tensor, *, step_size: float,
                     epsilon: float, perturb_steps: int, beta: float, n_class: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, x_adv, probs): the class-weighted TRADES step and the softmax of the
    adversarial train-mode forward that memory_dict records in the weight epoch."""
    model.eval()
    batch_size = len(x_natural)
    class_weights_mask = torch.zeros(len(y))
    for i in range(n_class):
        cur_indices = np.where(y.detach().cpu().numpy() == i)[0]
        class_weights_mask[cur_indices] = class_weights[i]
    x_adv = x_natural.detach() + 0.0
    x_adv += start.detach()
    logits_nat = model(x_natural)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            logits = model(x_adv)
            loss_kl = _kl_sum(F.log_softmax(logits, dim=1), logits_nat)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + (class_weights_mask * step_size).view(-1, 1, 1, 1) * \
            torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - (class_weights_mask * epsilon).view(
            -1, 1, 1, 1)), x_natural + (class_weights_mask * epsilon).view(-1, 1, 1, 1))
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    x_adv = x_adv.detach()
    model.train()
    logits = model(x_adv)
    logits_nat = model(x_natural)
    loss_natural = (nn.CrossEntropyLoss(reduction="none")(logits_nat, y)
                    * class_weights_mask).mean()
    p_natural = F.softmax(logits_nat, dim=1)
    loss_robust = nn.KLDivLoss(reduction="sum")(F.log_softmax(logits, dim=1),
                                                p_natural) / batch_size
    probs = F.softmax(logits, dim=1).detach()
    return loss_natural + beta * loss_robust, x_adv, probs


# --------------------------------------------------------------------------------- BAT
# BAT, train_mode/stop_to_lastclean.py, `stop_to_lastclean` (loss_fn 'kl', omega 0, the
# 'normal_distribution_randominit' start: clamp(x + 0.001 randn, 0, 1), ``start`` the draw).

def stop_to_lastclean(model: nn.Module, data: torch.Tensor, target: torch.Tensor,
                      start: torch.Tensor, *, step_size: float, epsilon: float,
                      perturb_steps: int):
    """(output_adv, output_target, output_natural, output_index_flag), in stopping order."""
    model.eval()
    shape = data.shape[1:]
    K = perturb_steps
    output_target, output_adv, output_natural = [], [], []
    iter_adv = torch.clamp(data.detach() + start.detach(), 0.0, 1.0)
    iter_clean_data = data.detach()
    iter_index_flag = torch.tensor(list(range(len(iter_clean_data))))
    iter_target = target.detach()
    output_iter_clean_data = model(data)
    tmp_adv = iter_adv
    while K > 0:
        iter_adv.requires_grad_()
        output = model(iter_adv)
        pred = output.max(1, keepdim=True)[1]
        output_index, iter_index = [], []
        for idx in range(len(pred)):
            if pred[idx] != iter_target[idx]:
                output_index.append(idx)
            else:
                iter_index.append(idx)
        if len(output_index) != 0:
            if len(output_target) == 0:
                output_adv = tmp_adv[output_index].reshape(-1, *shape)
                output_natural = iter_clean_data[output_index].reshape(-1, *shape)
                output_target = iter_target[output_index].reshape(-1)
                output_index_flag = iter_index_flag[output_index].reshape(-1)
            else:
                output_adv = torch.cat((output_adv, tmp_adv[output_index].reshape(-1, *shape)))
                output_natural = torch.cat((output_natural,
                                            iter_clean_data[output_index].reshape(-1, *shape)))
                output_index_flag = torch.cat((output_index_flag,
                                               iter_index_flag[output_index].reshape(-1)))
                output_target = torch.cat((output_target,
                                           iter_target[output_index].reshape(-1)))
        with torch.enable_grad():
            loss_adv = _kl_sum(F.log_softmax(output, dim=1), output_iter_clean_data)
        grad = torch.autograd.grad(loss_adv, [iter_adv], retain_graph=True)[0]
        if len(iter_index) != 0:
            iter_adv = iter_adv[iter_index]
            tmp_adv = iter_adv
            iter_clean_data = iter_clean_data[iter_index]
            iter_index_flag = iter_index_flag[iter_index]
            iter_target = iter_target[iter_index]
            output_iter_clean_data = output_iter_clean_data[iter_index]
            grad = grad[iter_index]
            eta = step_size * grad.sign()
            iter_adv = iter_adv.detach() + eta
            iter_adv = torch.min(torch.max(iter_adv, iter_clean_data - epsilon),
                                 iter_clean_data + epsilon)
            iter_adv = torch.clamp(iter_adv, 0, 1)
        else:
            return output_adv.detach(), output_target, output_natural, output_index_flag
        K = K - 1
    if len(output_target) == 0:
        output_target = iter_target.reshape(-1).squeeze()
        output_adv = iter_adv.reshape(-1, *shape)
        output_natural = iter_clean_data.reshape(-1, *shape)
        output_index_flag = iter_index_flag.reshape(-1).squeeze()
    else:
        output_adv = torch.cat((output_adv, iter_adv.reshape(-1, *shape)), dim=0)
        output_target = torch.cat((output_target, iter_target.reshape(-1)), dim=0).squeeze()
        output_natural = torch.cat((output_natural, iter_clean_data.reshape(-1, *shape)))
        output_index_flag = torch.cat((output_index_flag, iter_index_flag.reshape(-1)))
    return output_adv.detach(), output_target, output_natural, output_index_flag


# BAT, train_mode/stop_to_firstadv.py, `stop_to_firstadv` (loss_fn 'kl', omega 0, the
# normal start; ``index`` is its `random.shuffle`d order of the outputs).

def stop_to_firstadv(model: nn.Module, data: torch.Tensor, target: torch.Tensor,
                     start: torch.Tensor, index: list[int], *, step_size: float,
                     epsilon: float, perturb_steps: int, tau: int = 1):
    """(output_adv[index], output_target[index], output_natural[index], output_index_flag):
    the index flags, unshuffled, give the original position of output k as flag[index[k]]."""
    model.eval()
    shape = data.shape[1:]
    K = perturb_steps
    output_target, output_adv, output_natural = [], [], []
    control = torch.ones(len(target)) * tau
    iter_adv = torch.clamp(data.detach() + start.detach(), 0.0, 1.0)
    iter_clean_data = data.detach()
    iter_index_flag = torch.tensor(list(range(len(iter_clean_data))))
    iter_target = target.detach()
    output_iter_clean_data = model(data)
    while K > 0:
        iter_adv.requires_grad_()
        output = model(iter_adv)
        pred = output.max(1, keepdim=True)[1]
        output_index, iter_index = [], []
        for idx in range(len(pred)):
            if pred[idx] != iter_target[idx]:
                if control[idx] == 0:
                    output_index.append(idx)
                else:
                    control[idx] -= 1
                    iter_index.append(idx)
            else:
                iter_index.append(idx)
        if len(output_index) != 0:
            if len(output_target) == 0:
                output_adv = iter_adv[output_index].reshape(-1, *shape)
                output_natural = iter_clean_data[output_index].reshape(-1, *shape)
                output_target = iter_target[output_index].reshape(-1)
                output_index_flag = iter_index_flag[output_index].reshape(-1)
            else:
                output_adv = torch.cat((output_adv, iter_adv[output_index].reshape(-1, *shape)))
                output_natural = torch.cat((output_natural,
                                            iter_clean_data[output_index].reshape(-1, *shape)))
                output_index_flag = torch.cat((output_index_flag,
                                               iter_index_flag[output_index].reshape(-1)))
                output_target = torch.cat((output_target,
                                           iter_target[output_index].reshape(-1)))
        with torch.enable_grad():
            loss_adv = _kl_sum(F.log_softmax(output, dim=1), output_iter_clean_data)
        grad = torch.autograd.grad(loss_adv, [iter_adv], retain_graph=True)[0]
        if len(iter_index) != 0:
            control = control[iter_index]
            iter_adv = iter_adv[iter_index]
            iter_clean_data = iter_clean_data[iter_index]
            iter_index_flag = iter_index_flag[iter_index]
            iter_target = iter_target[iter_index]
            output_iter_clean_data = output_iter_clean_data[iter_index]
            grad = grad[iter_index]
            eta = step_size * grad.sign()
            iter_adv = iter_adv.detach() + eta
            iter_adv = torch.min(torch.max(iter_adv, iter_clean_data - epsilon),
                                 iter_clean_data + epsilon)
            iter_adv = torch.clamp(iter_adv, 0, 1)
        else:
            output_adv = output_adv.detach()
            return (output_adv[index], output_target[index], output_natural[index],
                    output_index_flag)
        K = K - 1
    if len(output_target) == 0:
        output_target = iter_target.reshape(-1).squeeze()
        output_adv = iter_adv.reshape(-1, *shape)
        output_natural = iter_clean_data.reshape(-1, *shape)
        output_index_flag = iter_index_flag.reshape(-1).squeeze()
    else:
        output_adv = torch.cat((output_adv, iter_adv.reshape(-1, *shape)), dim=0)
        output_target = torch.cat((output_target, iter_target.reshape(-1)), dim=0).squeeze()
        output_natural = torch.cat((output_natural, iter_clean_data.reshape(-1, *shape)))
        output_index_flag = torch.cat((output_index_flag, iter_index_flag.reshape(-1)))
    output_adv = output_adv.detach()
    return output_adv[index], output_target[index], output_natural[index], output_index_flag


# BAT, train.py, `BAT_loss` and one step of `train` (beta 6.0 there; the 0.1 logits are
# uniform; nn.KLDivLoss lets the gradient flow into its target distribution too).

def bat_loss(firstadv_logits, lastclean_logits, target, beta, clean_logits):
    batch_size = len(target)
    loss_natural = nn.CrossEntropyLoss(reduction="mean")(lastclean_logits, target)
    uniform_logits = torch.ones_like(firstadv_logits) * 0.1
    loss_uniform_robust = (1.0 / batch_size) * _kl_sum(F.log_softmax(uniform_logits, dim=1),
                                                       lastclean_logits)
    loss_uniform_robust2 = (1.0 / batch_size) * _kl_sum(F.log_softmax(uniform_logits, dim=1),
                                                        firstadv_logits)
    loss_robust = (1.0 / batch_size) * _kl_sum(F.log_softmax(firstadv_logits, dim=1),
                                               clean_logits)
    return loss_natural, beta * loss_robust, loss_uniform_robust + loss_uniform_robust2


def bat_train_loss(model: nn.Module, data: torch.Tensor, target: torch.Tensor,
                   start_lc: torch.Tensor, start_fa: torch.Tensor, index: list[int], *,
                   step_size: float, epsilon: float, num_steps: int, beta: float,
                   tau: int = 1):
    """(loss, last_clean, lastclean_flags, first_adv, firstadv_order): the step's loss from
    the train-mode forwards in the code's order, with each attack's outputs and where each
    came from in the batch."""
    last_clean, lastclean_target, _, lc_flag = stop_to_lastclean(
        model, data, target, start_lc, step_size=step_size, epsilon=epsilon,
        perturb_steps=num_steps)
    first_adv, _, output_natural, fa_flag = stop_to_firstadv(
        model, data, target, start_fa, index, step_size=step_size, epsilon=epsilon,
        perturb_steps=num_steps, tau=tau)
    model.train()
    lastclean_logits = model(last_clean)
    firstadv_logits = model(first_adv)
    clean_logits = model(output_natural)
    loss_natural, loss_robust, loss_uniform = bat_loss(firstadv_logits, lastclean_logits,
                                                       lastclean_target, beta, clean_logits)
    return (loss_robust + loss_natural + loss_uniform, last_clean, lc_flag, first_adv,
            fa_flag[torch.tensor(index)])
