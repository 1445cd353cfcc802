"""Method registry: name -> Method subclass. An unknown name fails listing the valid ones."""

from __future__ import annotations

from torch import nn

from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.registry import Registry

METHODS: Registry[type[Method]] = Registry("method.name")


def register(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name)(cls)


def build(name: str, model: nn.Module, cfg, data: MethodData) -> Method:
    return METHODS.get(name)(model, cfg, data)


# Importing the modules registers them.
from trainables.methods import anti_adv, caat, erm, frl, mwn, pgd_at, trades  # noqa: E402,F401

__all__ = ["METHODS", "Batch", "Method", "MethodData", "StepResult", "build", "register"]
