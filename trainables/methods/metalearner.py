"""The plumbing meta-learned methods (`mwn`, `caat`) share: meta-net, Adam, meta batches."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainables.meta import MetaNet, MetaStepStats, Params, meta_update, model_params
from trainables.methods.base import Method, MethodData


class MetaLearner(Method):
    """A method with a meta-net of `meta_in` features and `meta_out` outputs."""

    meta_in: int = 1
    meta_out: int = 1

    def meta_norm(self) -> str:
        """How the meta-net standardises its features (see `MetaNet`)."""
        return self.cfg.method.meta_norm

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        m = cfg.method
        self.meta_net = MetaNet(self.meta_in, m.meta_hidden, self.meta_out,
                                norm=self.meta_norm()).to(data.device)
        self.meta_optimizer = torch.optim.Adam(self.meta_net.parameters(), lr=cfg.meta_lr,
                                               weight_decay=1e-4)
        self.batches = 0
        self._grad_norms: list[float] = []

    def meta_due(self) -> bool:
        """Counts batches; a meta step follows every `meta_interval`-th one."""
        self.batches += 1
        return self.batches % self.cfg.meta_interval == 0

    def meta_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of the clean meta set (global RNG: seeded and checkpointed)."""
        n = len(self.data.meta_y)
        idx = torch.randperm(n, device=self.data.meta_y.device)[:self.cfg.method.meta_batch_size]
        return self.data.meta_x[idx], self.data.meta_y[idx]

    def meta_step(self, virtual_loss: torch.Tensor,
                  meta_loss_at: Callable[[Params], torch.Tensor], lr: float,
                  probe: torch.Tensor | None = None) -> MetaStepStats:
        stats = meta_update(self.meta_net, self.meta_optimizer, virtual_loss,
                            model_params(self.model), meta_loss_at, lr=lr,
                            weight_decay=self.cfg.optim.weight_decay, probe=probe)
        self._grad_norms.append(stats.grad_norm)
        return stats

    def meta_epoch_start(self) -> None:
        self._grad_norms = []

    def meta_epoch_stats(self) -> dict[str, float]:
        """`meta_grad_norm`: the mean over this epoch's meta steps (absent without any)."""
        if not self._grad_norms:
            return {}
        return {"meta_grad_norm": sum(self._grad_norms) / len(self._grad_norms)}

    def epoch_start(self, epoch: int) -> None:
        self.meta_epoch_start()

    def epoch_end(self, epoch: int) -> dict[str, float]:
        return self.meta_epoch_stats()

    def state_dict(self) -> dict:
        return {"meta_net": self.meta_net.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.meta_net.load_state_dict(state["meta_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.batches = int(state["batches"])
