"""Independent transcriptions of each method's official code, for the fidelity tests.

Each function restates, formula for formula, what one function of a method's official
repository computes, and cites the repository, the commit read and the file. They live
here, in the tests, never in the project: the project's code is checked against them
(`test_fidelity.py`), float64, from the same tensors.

What a transcription changes, it says where it does it:
- Random draws become arguments (``start``): the test hands the project's own draw to both.
- Ten classes hard-coded in the originals become ``num_classes``; `.cuda()` goes.
- Mode bookkeeping follows the project's documented fixes (the originals' attacks call
  ``model.eval()`` and never switch back); those fixes are tested on their own.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# The commits read (`git log -1` of each stored repository).
TRADES = "yaodongyu/TRADES@6e8e11b7c281371c2f027ffadfbaea80361f09de"
FAIR_ROBUST = "hannxu123/fair_robust@a80547def881cb4ca99b50e7544f997f9a0210a7"
CAAT = "xiaolingzhou98/CAAT@9186f6de976d95567db34193c163ee9ac69f0405"
MWN = "xjtushujun/meta-weight-net@3f1800ff26bc66ceda6075f3fa25f3a7e0665a4d"


def _kl_sum(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    # nn.KLDivLoss(size_average=False)(F.log_softmax(adv), F.softmax(clean)): a sum over
    # the batch and the classes of p_clean * (log p_clean - log p_adv).
    return nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, dim=1),
                                         F.softmax(logits_clean, dim=1))


def _kl_rows(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    # torch.sum(nn.KLDivLoss(reduction='none')(log_softmax(adv), softmax(clean)), 1)
    return torch.sum(nn.KLDivLoss(reduction="none")(F.log_softmax(logits_adv, dim=1),
                                                    F.softmax(logits_clean, dim=1)), 1)


# ------------------------------------------------------------------------------ TRADES
# yaodongyu/TRADES, trades.py, `trades_loss` (distance 'l_inf').

def trades_adv_example(model: nn.Module, x_natural: torch.Tensor, start: torch.Tensor, *,
                       step_size: float | torch.Tensor, epsilon: float | torch.Tensor,
                       perturb_steps: int) -> torch.Tensor:
    """x_adv = x + 0.001 * randn (``start`` is that draw), then ``perturb_steps`` of
    sign(grad KL) in eval mode, each projected onto the eps ball and [0, 1]. ``epsilon``
    may be per sample, shaped (B, 1, 1, 1) (fair_robust's and CAAT's `trades_adv`)."""
    model.eval()
    x_adv = x_natural.detach() + start.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = _kl_sum(model(x_adv), model(x_natural))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def trades_loss(model: nn.Module, x_natural: torch.Tensor, y: torch.Tensor,
                start: torch.Tensor, *, step_size: float, epsilon: float,
                perturb_steps: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, x_adv): CE(f(x), y) + beta / B * KL_sum(f(x_adv) || f(x)), in train mode."""
    x_adv = trades_adv_example(model, x_natural, start, step_size=step_size,
                               epsilon=epsilon, perturb_steps=perturb_steps)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    batch_size = len(x_natural)
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * _kl_sum(model(x_adv), model(x_natural))
    return loss_natural + beta * loss_robust, x_adv


# ------------------------------------------------------------------ PGD (Madry et al.)
# hannxu123/fair_robust, utils_frl2.py, `pgd_attack` (CAAT's utils.py has the same): the
# L-inf PGD both references evaluate with and measure FRL's class errors with.

def pgd_attack(model: nn.Module, X: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *,
               epsilon: float, num_steps: int, step_size: float,
               clip_min: float = 0.0, clip_max: float = 1.0) -> torch.Tensor:
    """X_pgd = clip(X + U(-eps, eps), 0, 1) (``start`` is the uniform draw); each step
    X_pgd + step * sign(grad mean CE), then X + clamp(X_pgd - X, -eps, eps), clipped."""
    X_pgd = torch.clamp(X + start, 0.0, 1.0).detach().requires_grad_(True)
    for _ in range(num_steps):
        loss = nn.CrossEntropyLoss()(model(X_pgd), y)
        (grad,) = torch.autograd.grad(loss, [X_pgd])  # loss.backward(); X_pgd.grad
        X_pgd = X_pgd + step_size * grad.sign()
        eta = torch.clamp(X_pgd.data - X.data, -epsilon, epsilon)
        X_pgd = torch.clamp(X.data + eta, clip_min, clip_max).detach().requires_grad_(True)
    return X_pgd.detach()


def madry_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, *,
               epsilon: float, num_steps: int, step_size: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD-AT's training loss: CE of the train-mode model on the PGD example (attacked in
    eval mode, as every reference here attacks)."""
    model.eval()
    x_adv = pgd_attack(model, x, y, start, epsilon=epsilon, num_steps=num_steps,
                       step_size=step_size)
    model.train()
    return F.cross_entropy(model(x_adv), y), x_adv


def erm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Natural training: -mean log softmax(f(x))_y, the definition of cross-entropy."""
    log_p = F.log_softmax(model(x), dim=1)
    return -log_p[torch.arange(len(y)), y].mean()


# -------------------------------------------------------------------------------- FRL
# hannxu123/fair_robust, utils_frl2.py (FRL reweight + remargin, run by frlrmrw.py).

def in_class(predict: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class accuracy (`in_class`; the original's is a float32 tensor of 10)."""
    probs = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(num_classes):
        in_class_id = (label == i).double()
        correct_predict = (predict == label).double()
        probs[i] = torch.sum(correct_predict * in_class_id).item() / torch.sum(in_class_id).item()
    return probs


def frl_evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
                 num_classes: int, **configs) -> tuple[torch.Tensor, ...]:
    """`evaluate`: (class clean error, class boundary error, total clean, total boundary),
    in eval mode, robust predictions from `pgd_attack` with ``configs``."""
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    x_adv = pgd_attack(model, x, y, start, **configs)
    with torch.no_grad():
        pred1 = model(x_adv).argmax(dim=1)
    acc, acc_adv = in_class(pred, y, num_classes), in_class(pred1, y, num_classes)
    n = len(y)
    correct, correct_adv = (pred == y).sum().item(), (pred1 == y).sum().item()
    total_clean_error = 1 - correct / n
    total_bndy_error = correct / n - correct_adv / n
    return 1 - acc, acc - acc_adv, total_clean_error, total_bndy_error


def normalize_lambda(lmb: torch.Tensor, lim: float = 0.8) -> torch.Tensor:
    lmb = torch.clamp(lmb, min=0)
    if torch.sum(lmb) > lim:
        lmb = lim * lmb / torch.sum(lmb)
    return lmb


def cost_sensitive(lam0: torch.Tensor, lam1: torch.Tensor, lam2: torch.Tensor, *,
                   scale_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diff0_i = 1/C + (C-1)/C lam0_i - 1/C sum_{j != i} lam0_j (and diff1 alike);
    diff2 = clamp(exp(2 lam2), 0.98, scale_max): fair_robust's utils_frl2.py has max 3,
    CAAT's utils.py max 2.5."""
    c = len(lam0)

    def weights(ll: torch.Tensor) -> torch.Tensor:
        diff = torch.ones(c, dtype=ll.dtype) * 1 / c
        for i in range(c):
            for j in range(c):
                diff[i] = diff[i] + ((c - 1) / c * ll[i] if j == i else -1 / c * ll[j])
        return diff

    return weights(lam0.clone()), weights(lam1.clone()), torch.clamp(
        torch.exp(2 * lam2), min=0.98, max=scale_max)


def frl_multiplier_update(lmbda: torch.Tensor, gamma0: torch.Tensor, gamma1: torch.Tensor,
                          *, rate1: float, rate2: float, lim: float) -> torch.Tensor:
    """`frl_train`'s update of the 3C multipliers (CAAT's utils.py: the same lines)."""
    c = len(gamma0)
    lmbda0 = lmbda[0:c] + rate1 * torch.clamp(gamma0, min=-1000)
    lmbda1 = lmbda[c:2 * c] + rate1 * 2 * torch.clamp(gamma1, min=-1000)
    lmbda2 = lmbda[2 * c:3 * c] + rate2 * gamma1
    lmbda0 = normalize_lambda(lmbda0, lim)
    lmbda1 = normalize_lambda(lmbda1, lim)
    return torch.cat([lmbda0, lmbda1, lmbda2])


def frl_rate1(rate1: float, now_epoch: int, every: int = 40) -> float:
    """frlrmrw.py's (and CAAT.py's) loop: `if now_epoch % 40 == 0: rate1 = rate1 / 2`
    before each epoch's `frl_train`, now_epoch counting from 1."""
    for e in range(1, now_epoch + 1):
        if e % every == 0:
            rate1 = rate1 / 2
    return rate1


def match_weight(label: torch.Tensor, diff0, diff1, diff2):
    num_classes = len(diff0)
    w = [torch.zeros(label.shape[0], dtype=diff0.dtype) for _ in range(3)]
    for i in range(num_classes):
        for k, diff in enumerate((diff0, diff1, diff2)):
            w[k] = w[k] + diff[i] * (label == i).to(diff0.dtype)
    return w


def frl_train_loss(model: nn.Module, data: torch.Tensor, target: torch.Tensor,
                   start: torch.Tensor, diff0, diff1, diff2, *, epsilon: float,
                   num_steps: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`train_model`'s batch: `trades_adv` at new_eps = eps * weight2 with step
    max(new_eps) / 4, then sum(CE * w0)/sum(w0) + beta * sum(KL * w1)/sum(w1)."""
    weight0, weight1, weight2 = match_weight(target, diff0, diff1, diff2)
    new_eps = (epsilon * weight2).view(weight2.shape[0], 1, 1, 1)
    x_adv = trades_adv_example(model, data, start, step_size=torch.max(new_eps) / 4,
                               epsilon=new_eps, perturb_steps=num_steps)
    model.train()
    loss_natural = nn.CrossEntropyLoss(reduction="none")(model(data), target)
    loss_bndy = _kl_rows(model(x_adv), model(data))
    loss = (torch.sum(loss_natural * weight0) / torch.sum(weight0)
            + beta * torch.sum(loss_bndy * weight1) / torch.sum(weight1))
    return loss, x_adv


# ------------------------------------------------------------------------------- CAAT
# xiaolingzhou98/CAAT, utils.py (`adv_feature`, `caat_adv`, `train_model`) and meta.py
# (`MetaSGD`), MLP.py (`MLP`).

def adv_feature(logits_vector, loss_vector, labels, loss_tensor_last, class_rate):
    num_classes = logits_vector.shape[1]
    labels_one_hot = F.one_hot(labels, num_classes=num_classes).to(logits_vector.dtype)
    class_rate = torch.mm(labels_one_hot, class_rate.to(labels_one_hot.dtype).unsqueeze(1))
    last_epoch_ave_loss = torch.mm(labels_one_hot, loss_tensor_last.unsqueeze(1))
    p = F.softmax(logits_vector, dim=1)
    logits_labels = torch.sum(p * labels_one_hot, dim=1)
    logits_vector_grad = torch.norm((labels_one_hot - p), dim=1)
    logits_others_max = (p[labels_one_hot != 1].reshape(p.size(0), -1)).max(dim=1).values
    logits_margin = logits_labels - logits_others_max
    entropy = torch.sum(p * F.log_softmax(logits_vector, dim=1), dim=1)
    return torch.cat([loss_vector.unsqueeze(1), last_epoch_ave_loss,
                      logits_vector_grad.unsqueeze(1), logits_margin.unsqueeze(1),
                      entropy.unsqueeze(1), class_rate], dim=1)


def caat_adv(model, x_natural, y_natural, weight, start_adv, start_anti, *, epsilon,
             num_steps, step_size):
    """Both examples of every sample, each from its own 0.001 * randn start: ascend
    KL_sum, descend the mean CE (of log_softmax outputs: CE's own log_softmax leaves them
    unchanged), each projected onto eps * weight and [0, 1]."""
    new_eps = (epsilon * weight).view(weight.shape[0], 1, 1, 1)
    model.eval()
    x_adv = x_natural.detach() + start_adv.detach()
    x_anti_adv = x_natural.detach() + start_anti.detach()
    for _ in range(num_steps):
        x_adv.requires_grad_()
        x_anti_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = _kl_sum(model(x_adv), model(x_natural))
            anti_loss = nn.CrossEntropyLoss()(F.log_softmax(model(x_anti_adv), dim=1),
                                              y_natural)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        anti_grad = torch.autograd.grad(anti_loss, [x_anti_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_anti_adv = x_anti_adv.detach() - step_size * torch.sign(anti_grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - new_eps), x_natural + new_eps)
        x_anti_adv = torch.min(torch.max(x_anti_adv, x_natural - new_eps), x_natural + new_eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
        x_anti_adv = torch.clamp(x_anti_adv, 0.0, 1.0)
    return x_adv, x_anti_adv


def caat_mlp_weights(meta_net_layers, feature, temperature=0.001):
    """MLP.py's `MLP.forward`: BatchNorm1d, Linear, ReLU, Linear, softmax(x / 0.001) (the
    temperature an argument here). ``meta_net_layers`` = (bn, first linear, output linear)."""
    bn, first, out = meta_net_layers
    return F.softmax(out(F.relu(first(bn(feature)))) / temperature, dim=1)


def caat_loss(w, loss_natural, loss_bndy, loss_anti, weight0, weight1, beta):
    """`train_model`'s loss (and `pseudo_loss`'s): the adversarial side weighted by w[:, 0]
    and the class weights, plus mean(w[:, 1] * CE of the anti-adversarial example)."""
    return (torch.sum(w[:, 0] * loss_natural * weight0) / torch.sum(weight0)
            + beta * torch.sum(w[:, 0] * loss_bndy * weight1) / torch.sum(weight1)
            + torch.mean(w[:, 1] * loss_anti))


def meta_sgd_step(named_params, grads, group, state):
    """meta.py's `MetaSGD.meta_step`, loaded with the model optimiser's state dict:
    ``group`` its param group, ``state`` {name: {'momentum_buffer': ...}}."""
    weight_decay, momentum = group["weight_decay"], group["momentum"]
    dampening, nesterov, lr = group["dampening"], group["nesterov"], group["lr"]
    out = {}
    for (name, parameter), grad in zip(named_params, grads, strict=True):
        parameter = parameter.detach()  # parameter.detach_()
        grad_wd = grad.add(parameter, alpha=weight_decay) if weight_decay != 0 else grad
        if momentum != 0 and "momentum_buffer" in state.get(name, {}):
            buffer = state[name]["momentum_buffer"]
            grad_b = buffer.mul(momentum).add(grad_wd, alpha=1 - dampening)
        else:
            grad_b = grad_wd
        grad_n = grad_wd.add(grad_b, alpha=momentum) if nesterov else grad_b
        out[name] = parameter.add(grad_n, alpha=-lr)
    return out


# ------------------------------------------------------------------------ Meta-Weight-Net
# xjtushujun/meta-weight-net, MW-Net.py (`train`) and resnet.py (`MetaModule.update_params`,
# `VNet`).

def mwn_virtual_params(named_params, grads, lr_inner):
    """`update_params(lr_inner, source_params=grads)`: param - lr_inner * grad, nothing
    else (no momentum, no weight decay)."""
    return {name: p - lr_inner * g for (name, p), g in zip(named_params, grads, strict=True)}


def vnet_weights(vnet_layers, cost_v):
    """`VNet.forward`: Linear, ReLU, Linear, sigmoid (``vnet_layers`` = the two Linears)."""
    first, out = vnet_layers
    return torch.sigmoid(out(F.relu(first(cost_v))))


def functional(model: nn.Module, params):
    """A copy of ``model`` that runs at ``params`` (the originals' `meta_model` / pseudo
    model, loaded with the model's state and then given new parameter tensors)."""
    clone = copy.deepcopy(model)

    def forward(x):
        return torch.func.functional_call(clone, params, (x,))

    return clone, forward
