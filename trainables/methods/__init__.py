"""Method registry: name -> Method subclass. An unknown name fails listing the valid ones."""

from __future__ import annotations

from torch import nn

from trainables.methods.base import Batch, Method, MethodData, StepResult

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def build(name: str, model: nn.Module, cfg, data: MethodData) -> Method:
    try:
        cls = METHODS[name]
    except KeyError:
        allowed = ", ".join(sorted(METHODS))
        raise ValueError(f"method.name: unknown {name!r}; allowed: {allowed}") from None
    return cls(model, cfg, data)


# Importing the modules registers them.
from trainables.methods import anti_adv, caat, erm, frl, mwn, pgd_at, trades  # noqa: E402,F401

__all__ = ["METHODS", "Batch", "Method", "MethodData", "StepResult", "build", "register"]
