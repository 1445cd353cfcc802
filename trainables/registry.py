"""Name -> object tables for datasets, models and methods, with one-line errors that list
what is allowed (the CLI prints them as they are).

As in Ray Tune's `search/__init__.py`, each table maps a name to where the object lives
("module:attr") and imports it only when the name is used. So the config can check
`dataset.name`, `model.arch` and `method.name` without importing torch, and the modules
that hold the objects do not import the table back to fill it (no import cycle).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from torch import nn

    from trainables.data import DatasetSplits
    from trainables.methods.base import Method

T = TypeVar("T")


def unknown_name(field: str, name: object, allowed: list[str]) -> str:
    """The one error template of every registry: ``field: unknown 'x'; allowed: a, b``."""
    return f"{field}: unknown {name!r}; allowed: {', '.join(allowed)}"


class Registry(Generic[T]):
    """A table of names read by config key.

    ``locations`` maps each built-in name to ``"module:attr"``, imported on first use;
    ``register`` adds further entries at run time (tests, extensions). ``field`` is the
    config key that names an entry (``model.arch``); lookups of unknown names raise
    ``error`` with :func:`unknown_name`'s message.
    """

    def __init__(self, field: str, locations: Mapping[str, str],
                 error: type[Exception] = ValueError) -> None:
        self.field = field
        self.error = error
        self.locations = dict(locations)
        self.table: dict[str, T] = {}  # the entries imported or registered so far

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self:  # a second claim on a name is a bug, not an override
                raise ValueError(f"{self.field} {name!r} registered twice")
            self.table[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self.table:
            if name not in self.locations:
                raise self.error(self.unknown(name))
            module, _, attr = self.locations[name].partition(":")
            self.table[name] = getattr(importlib.import_module(module), attr)
        return self.table[name]

    def unknown(self, name: str) -> str:
        return unknown_name(self.field, name, self.names())

    def names(self) -> list[str]:
        return sorted(self.locations.keys() | self.table.keys())

    def __contains__(self, name: object) -> bool:
        return name in self.table or name in self.locations

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The built-in entries. A new dataset, model or method is one line here.
# loader(cfg: DatasetConfig, seed: int) -> DatasetSplits
DATASETS: Registry[Callable[..., DatasetSplits]] = Registry("dataset.name", {
    "fashion_mnist": "trainables.data:load_fashion_mnist",
    "cifar10": "trainables.data:load_cifar10",
    "cifar100": "trainables.data:load_cifar100",
    "gmm": "trainables.synthetic_data:load_gmm",
    "synthetic": "trainables.synthetic_data:load_synthetic",
})

# factory(num_classes, in_channels, input_shape) -> the bare network
MODELS: Registry[Callable[..., nn.Module]] = Registry("model.arch", {
    "linear": "trainables.models:_linear",
    "mlp": "trainables.models:_mlp",
    "small_cnn": "trainables.models:_small_cnn",
    "preact_resnet18": "trainables.models:_preact_resnet18",
    "wrn28_10": "trainables.models:_wrn28_10",
    "resnet32": "trainables.models:_resnet32",
})

METHODS: Registry[type[Method]] = Registry("method.name", {
    "erm": "trainables.methods.erm:ERM",
    "pgd_at": "trainables.methods.pgd_at:PGDAT",
    "trades": "trainables.methods.trades:TRADES",
    "frl": "trainables.methods.frl:FRL",
    "mwn": "trainables.methods.mwn:MWN",
    "anti_adv": "trainables.methods.anti_adv:AntiAdv",
    "caat": "trainables.methods.caat:CAAT",
})
