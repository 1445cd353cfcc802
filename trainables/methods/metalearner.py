"""The plumbing meta-learned methods (`mwn`, `caat`) share: meta-net, Adam, meta batches."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainables.meta import MetaNet, Params, meta_update, model_params
from trainables.methods.base import Method, MethodData


class MetaLearner(Method):
    """A method with a meta-net of `meta_in` features and `meta_out` outputs."""

    meta_in: int = 1
    meta_out: int = 1
    meta_batch_norm: bool = True

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        m = cfg.method
        self.meta_net = MetaNet(self.meta_in, m.meta_hidden, self.meta_out,
                                batch_norm=self.meta_batch_norm).to(data.device)
        self.meta_optimizer = torch.optim.Adam(self.meta_net.parameters(), lr=m.meta_lr,
                                               weight_decay=1e-4)
        self.batches = 0

    def meta_due(self) -> bool:
        """Counts batches; a meta step follows every `meta_interval`-th one."""
        self.batches += 1
        return self.batches % self.cfg.method.meta_interval == 0

    def meta_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of the clean meta set (global RNG: seeded and checkpointed)."""
        n = len(self.data.meta_y)
        idx = torch.randperm(n, device=self.data.meta_y.device)[:self.cfg.method.meta_batch_size]
        return self.data.meta_x[idx], self.data.meta_y[idx]

    def meta_step(self, virtual_loss: torch.Tensor,
                  meta_loss_at: Callable[[Params], torch.Tensor], lr: float) -> float:
        return meta_update(self.meta_net, self.meta_optimizer, virtual_loss,
                           model_params(self.model), meta_loss_at, lr=lr,
                           weight_decay=self.cfg.optim.weight_decay)

    def state_dict(self) -> dict:
        return {"meta_net": self.meta_net.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.meta_net.load_state_dict(state["meta_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.batches = int(state["batches"])
