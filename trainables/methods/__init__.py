"""Training methods behind one small interface (`trainables.methods.base`), by name.

`trainables.registry.METHODS` lists every method and where it lives; a method's module is
imported when its name is first used. An unknown name fails listing the valid ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.registry import METHODS

if TYPE_CHECKING:
    from torch import nn

    from trainables.config import TrialConfig


def register(cls: type[Method]) -> type[Method]:
    """Add a method under ``cls.name`` (the built-in ones are listed in the registry)."""
    return METHODS.register(cls.name)(cls)


def build(name: str, model: nn.Module, cfg: TrialConfig, data: MethodData) -> Method:
    return METHODS.get(name)(model, cfg, data)


__all__ = ["METHODS", "Batch", "Method", "MethodData", "StepResult", "build", "register"]
