"""Best and last checkpoints: the weights of the best evaluated epoch, and their report.

Adversarial training overfits robustly (Rice et al., ICML 2020): robust test accuracy peaks
and then falls, most with noisy labels, so the field reports the checkpoint chosen on
validation beside the last one. A trial with `eval.keep_best` offers each evaluated epoch's
`eval.best_metric` (a validation scalar, on the same images every epoch) to a
`BestCheckpoint`, which keeps the weights of the best; after the last epoch `best_report`
evaluates those weights on the test split exactly as the last epoch's were evaluated, and
names the results `test_best_*` (`trainables.metric_names.best_name`).

Exactness: the best epoch's weights are attacked with that epoch's own evaluation stream, so
`test_best_*` equals the `test_*` a whole-test-split evaluation at that epoch would have
reported; when the best epoch is the last, the last epoch's results are copied, not re-run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from trainables.metric_names import (
    AUTOATTACK_RECORDS,
    BEST_EPOCH,
    LAST_PREFIX,
    LOWER_IS_BETTER_SCALARS,
    best_name,
)


def improves(value: float, best: float | None, lower_is_better: bool) -> bool:
    """Whether ``value`` beats ``best`` strictly (ties keep the earlier epoch); a NaN never
    wins, and any finite value beats none (pure)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if lower_is_better else value > best


class BestCheckpoint:
    """The best epoch so far by one validation metric, with a CPU copy of its weights."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.lower_is_better = metric.removeprefix("val_") in LOWER_IS_BETTER_SCALARS
        self.epoch: int | None = None  # 1-based, as `epoch` in a report
        self.value: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def offer(self, value: float, epoch: int, model: nn.Module) -> bool:
        """Keep ``model``'s weights if ``value`` (its `metric` at 1-based ``epoch``) is the
        best so far; True if kept."""
        if not improves(float(value), self.value, self.lower_is_better):
            return False
        self.epoch, self.value = epoch, float(value)
        # A copy on the CPU: the live weights move on, and GPU memory is the scarcer.
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def model(self, like: nn.Module) -> nn.Module:
        """A copy of ``like`` holding the best weights (``like`` itself untouched)."""
        assert self.weights is not None, "no epoch was offered"
        best = copy.deepcopy(like)
        best.load_state_dict(self.weights)
        return best

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "epoch": self.epoch, "value": self.value,
                "weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.value, self.weights = state["epoch"], state["value"], state["weights"]


def best_report(best: BestCheckpoint, last_epoch: int, last_test: Mapping[str, Any],
                evaluate_at: Callable[[nn.Module, int], dict[str, Any]],
                model: nn.Module) -> dict[str, Any]:
    """`best_epoch` and the best checkpoint's `test_best_*` metrics.

    ``last_test`` holds the last epoch's `test_*` results that the best checkpoint should
    have too (AutoAttack's only when asked); when the best epoch is the last they are copied.
    Otherwise ``evaluate_at(best model, 0-based best epoch)`` produces them afresh; it must
    return the same keys. AutoAttack's records (flags, image positions) stay the last's.
    """
    if best.epoch is None:
        return {}
    out: dict[str, Any] = {BEST_EPOCH: best.epoch}
    if best.epoch == last_epoch:
        results = dict(last_test)
    else:
        results = evaluate_at(best.model(model), best.epoch - 1)
    out.update({best_name(k): v for k, v in results.items()
                if k.startswith(LAST_PREFIX) and k not in AUTOATTACK_RECORDS})
    return out
