"""Meta-learning pieces shared by CAAT and Meta-Weight-Net.

A meta-net maps per-sample features to per-sample weights. It is trained by looking one
step ahead: a virtual SGD step of the model on the meta-weighted training loss (taken
functionally with `torch.func.functional_call`, graph kept, no in-place parameter
surgery), then a loss on a clean meta batch at the virtual weights, whose gradient flows
back through the virtual step into the meta-net only. The virtual step is whatever its
method's reference takes: CAAT's is the model optimiser's own next step (momentum, Nesterov
and weight decay included), Meta-Weight-Net's a plain theta - lr * grad.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from trainables.registry import unknown_name

Params = dict[str, torch.Tensor]


class RunningStandardize(nn.Module):
    """Standardise features by running mean and variance, updated only by ``observe``.

    Unlike train-mode BatchNorm, the output for one sample does not depend on the other
    samples of its batch, and the meta gradient sees the same map the choice was made with.
    """

    def __init__(self, num_features: int, momentum: float = 0.05, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        mean, var = x.mean(0), x.var(0, unbiased=False)
        if int(self.seen) == 0:  # the first batch sets the statistics outright
            self.mean.copy_(mean)
            self.var.copy_(var)
        else:
            self.mean.lerp_(mean, self.momentum)
            self.var.lerp_(var, self.momentum)
        self.seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.var + self.eps).sqrt()


NORMS = ("running", "batch", "none")


class MetaNet(nn.Module):
    """Feature standardisation -> MLP -> raw outputs; the caller decides what they mean.

    Standardised first because the features live on very different scales (losses, norms,
    priors) and drift during training: `running` statistics, train-mode BatchNorm (`batch`,
    as the original CAAT code) or nothing (`none`, as Meta-Weight-Net on its one loss).
    """

    def __init__(self, in_features: int, hidden: int, out_features: int, *,
                 norm: str = "batch") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(unknown_name("norm", norm, list(NORMS)))
        self.norm = norm
        layers: list[nn.Module] = {"running": [RunningStandardize(in_features)],
                                   "batch": [nn.BatchNorm1d(in_features)], "none": []}[norm]
        self.net = nn.Sequential(*layers, nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_features))

    @property
    def head(self) -> nn.Linear:
        return self.net[-1]

    def observe(self, features: torch.Tensor) -> None:
        """Fold a training batch's features into the running statistics (`running` only)."""
        if self.norm == "running":
            self.net[0].observe(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def model_params(model: nn.Module) -> Params:
    return dict(model.named_parameters())


@dataclass(frozen=True)
class SGDLookahead:
    """The next step of an SGD optimiser, as ``torch.optim.SGD`` would take it: its
    hyper-parameters and, per parameter name, its momentum buffer (None before the first
    step). ``plain()`` is theta - lr * grad, nothing else (Meta-Weight-Net's virtual step)."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    buffers: Mapping[str, torch.Tensor | None] = field(default_factory=dict)

    @classmethod
    def plain(cls) -> SGDLookahead:
        return cls()

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, model: nn.Module) -> SGDLookahead:
        """The look-ahead of ``optimizer`` (one SGD param group over ``model``'s parameters),
        read now: the buffers are those its next real step will use. CAAT's `MetaSGD` does
        the same by loading the model optimiser's state dict."""
        if not isinstance(optimizer, torch.optim.SGD) or len(optimizer.param_groups) != 1:
            raise TypeError("a virtual step follows one SGD param group; got "
                            f"{type(optimizer).__name__} with {len(optimizer.param_groups)}")
        group = optimizer.param_groups[0]
        buffers = {name: optimizer.state.get(p, {}).get("momentum_buffer")
                   for name, p in model.named_parameters()}
        return cls(momentum=group["momentum"], dampening=group["dampening"],
                   weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                   buffers=buffers)

    def direction(self, name: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """What SGD subtracts lr times (pure): torch.optim.SGD's update for one parameter."""
        d = g + self.weight_decay * p if self.weight_decay else g
        if not self.momentum:
            return d
        buf = self.buffers.get(name)
        # The first step's buffer is the gradient itself (torch.optim.SGD: no dampening).
        b = d if buf is None else self.momentum * buf + (1 - self.dampening) * d
        return d + self.momentum * b if self.nesterov else b


def virtual_step(loss: torch.Tensor, params: Params, *, lr: float,
                 sgd: SGDLookahead | None = None) -> Params:
    """theta' = theta - lr * (SGD's update direction), differentiable w.r.t. whatever
    ``loss`` depends on besides theta (the meta-net). The graph of ``loss`` is retained, so
    the caller may still backpropagate the same forward for the real update. The momentum
    buffers are constants: they hold past gradients, which the meta-net cannot change."""
    sgd = sgd or SGDLookahead.plain()
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True,
                                retain_graph=True, allow_unused=True)
    out = {}
    for name, g in zip(names, grads, strict=True):
        p = params[name]
        g = torch.zeros_like(p) if g is None else g
        out[name] = p - lr * sgd.direction(name, p, g)
    return out


def call_with(model: nn.Module, params: Mapping[str, torch.Tensor],
              x: torch.Tensor) -> torch.Tensor:
    """Forward at other parameters. Buffers are cloned: a train-mode BatchNorm updates its
    running statistics in place, and a virtual forward must leave the real model alone."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


class AtParams(nn.Module):
    """``model`` as a module at other (constant) parameters, e.g. the virtual weights, for
    code that takes a module (an attack). Its mode is the model's: putting it in eval mode
    puts the model's modules in eval mode (the attack's `eval_mode` restores them)."""

    def __init__(self, model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.params = model, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return call_with(self.model, self.params, x)


@dataclass
class MetaStepStats:
    loss: float  # the meta loss at the virtual weights
    grad_norm: float  # L2 norm of the meta-net's gradient, over all its parameters
    probe_grad: torch.Tensor | None  # d(meta loss)/d(probe), when a probe was given


def meta_update(meta_net: nn.Module, meta_optimizer: torch.optim.Optimizer,
                virtual_loss: torch.Tensor, params: Params,
                meta_loss_at: Callable[[Params], torch.Tensor], *, lr: float,
                sgd: SGDLookahead | None = None, probe: torch.Tensor | None = None
                ) -> MetaStepStats:
    """One meta step: virtual SGD step on ``virtual_loss`` (which must depend on the
    meta-net; ``sgd`` the step's rule, plain by default), ``meta_loss_at(virtual params)``,
    then an optimiser step of the meta-net only.

    ``probe`` is any tensor of the virtual loss's graph (e.g. the per-sample combination
    weights) whose meta gradient the caller wants to see; it costs no extra backward.
    The model's parameters' ``.grad`` fields are not touched (gradients are taken with
    `torch.autograd.grad` w.r.t. the meta-net's parameters).
    """
    virtual = virtual_step(virtual_loss, params, lr=lr, sgd=sgd)
    meta_loss = meta_loss_at(virtual)
    meta_params = [p for p in meta_net.parameters() if p.requires_grad]
    inputs = meta_params + ([probe] if probe is not None else [])
    # retain_graph: the virtual loss may share its forward with the real training loss,
    # which the trial loop backpropagates afterwards.
    grads = torch.autograd.grad(meta_loss, inputs, allow_unused=True, retain_graph=True)
    meta_optimizer.zero_grad(set_to_none=True)
    sq = 0.0
    for p, g in zip(meta_params, grads[:len(meta_params)], strict=True):
        p.grad = None if g is None else g.detach()
        if g is not None:
            sq += float(g.detach().pow(2).sum())
    meta_optimizer.step()
    probe_grad = grads[-1] if probe is not None else None
    return MetaStepStats(loss=meta_loss.item(), grad_norm=sq ** 0.5,
                         probe_grad=None if probe_grad is None else probe_grad.detach())
