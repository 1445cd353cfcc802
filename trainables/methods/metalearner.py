"""The meta-learner a meta-learned method (`mwn`, `caat`) holds: its meta-net, the net's
Adam, the batch count that schedules meta steps, and random batches of the meta set.

A component, not a base class: the method owns it as ``self.meta`` and its state sits
under ``"meta"`` in the method's state dict.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainables.meta import (
    MetaNet,
    MetaStepStats,
    Params,
    SGDLookahead,
    meta_update,
    model_params,
)

if TYPE_CHECKING:
    from trainables.config import TrialConfig
    from trainables.methods.base import MethodData

# Where checkpoints written before the state was namespaced keep the meta-learner's part:
# flat at the top of the method's state (old key -> key under "meta").
_FLAT_KEYS = {"meta_net": "net", "meta_optimizer": "optimizer", "batches": "batches"}


def meta_state_of(method_state: Mapping[str, Any]) -> dict[str, Any]:
    """The meta-learner's part of a method's saved state, from either layout."""
    if "meta" in method_state:
        return dict(method_state["meta"])
    return {new: method_state[old] for old, new in _FLAT_KEYS.items()}


VIRTUAL_STEPS = ("optimizer", "plain")


class MetaLearner:
    """A meta-net of ``in_features`` features and ``out_features`` outputs, and its Adam.

    ``norm`` is how the net standardises its features (see `MetaNet`). ``virtual`` is the
    virtual step: ``optimizer``, the model optimiser's next step (its momentum buffers,
    Nesterov and weight decay; `data.optimizer`, else the config's SGD before its first
    step), or ``plain``, theta - lr * grad.
    """

    def __init__(self, model: nn.Module, cfg: TrialConfig, data: MethodData, *,
                 in_features: int, out_features: int, norm: str, virtual: str) -> None:
        if virtual not in VIRTUAL_STEPS:
            raise ValueError(f"virtual: unknown '{virtual}'; allowed: {', '.join(VIRTUAL_STEPS)}")
        self.model, self.cfg, self.data, self.virtual = model, cfg, data, virtual
        self.net = MetaNet(in_features, cfg.method.meta_hidden, out_features,
                           norm=norm).to(data.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.method.meta_lr,
                                          weight_decay=cfg.method.meta_weight_decay)
        self.batches = 0
        self._grad_norms: list[float] = []

    def due(self) -> bool:
        """Counts batches; a meta step follows every `meta_interval`-th one."""
        self.batches += 1
        return self.batches % self.cfg.method.meta_interval == 0

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of the clean meta set (global RNG: seeded and checkpointed)."""
        n = len(self.data.meta_y)
        idx = torch.randperm(n, device=self.data.meta_y.device)[:self.cfg.method.meta_batch_size]
        return self.data.meta_x[idx], self.data.meta_y[idx]

    def lookahead(self) -> SGDLookahead:
        """The rule of the virtual step, read now (the optimiser's buffers change)."""
        if self.virtual == "plain":
            return SGDLookahead.plain()
        if self.data.optimizer is not None:
            return SGDLookahead.of(self.data.optimizer, self.model)
        o = self.cfg.optim  # no optimiser handed over: the config's, before its first step
        return SGDLookahead(momentum=o.momentum, weight_decay=o.weight_decay,
                            nesterov=o.nesterov and o.momentum > 0)

    def step(self, virtual_loss: torch.Tensor, meta_loss_at: Callable[[Params], torch.Tensor],
             lr: float, probe: torch.Tensor | None = None) -> MetaStepStats:
        """One meta step of the net (`trainables.meta.meta_update`) at the model's weights."""
        stats = meta_update(self.net, self.optimizer, virtual_loss, model_params(self.model),
                            meta_loss_at, lr=lr, sgd=self.lookahead(), probe=probe)
        self._grad_norms.append(stats.grad_norm)
        return stats

    def epoch_start(self) -> None:
        self._grad_norms = []

    def epoch_stats(self) -> dict[str, float]:
        """`meta_grad_norm`: the mean over this epoch's meta steps (absent without any)."""
        if not self._grad_norms:
            return {}
        return {"meta_grad_norm": sum(self._grad_norms) / len(self._grad_norms)}

    def state_dict(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches = int(state["batches"])
