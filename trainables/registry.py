"""Name -> object tables for datasets, models and methods, with one-line errors that list
what is allowed (the CLI prints them as they are).

As in Ray Tune's `search/__init__.py`, each table maps a name to where the object lives
("module:attr") and imports it only when the name is used. So the config can check
`dataset.name`, `model.arch` and `method.name` without importing torch, and the modules
that hold the objects do not import the table back to fill it (no import cycle).

Plugins: an installed distribution adds entries through Python entry points in the groups
`caat_sweeper.methods`, `caat_sweeper.datasets` and `caat_sweeper.models` (name = value
"module:attr", in its pyproject.toml's `[project.entry-points."caat_sweeper.methods"]`).
Every process reads them on first use (the CLI, the sweep's driver and each Ray worker,
wherever the plugin is installed) and imports a plugin only when its name is used. A plugin
that fails to import fails that name with one line naming the plugin and its error; the
other names keep working. A plugin name that a built-in already has is ignored, with a note
(`problems`). The core knows no plugin by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Generic, TypeVar

from trainables.errors import ConfigError, one_line

if TYPE_CHECKING:
    from torch import nn

    from trainables.data import DatasetSplits
    from trainables.methods.base import Method

T = TypeVar("T")


def unknown_name(field: str, name: object, allowed: list[str]) -> str:
    """The one error template of every registry: ``field: unknown 'x'; allowed: a, b``."""
    return f"{field}: unknown {name!r}; allowed: {', '.join(allowed)}"


@dataclass(frozen=True)
class Plugin:
    """An entry point of an installed distribution."""

    name: str
    value: str  # "module:attr"
    distribution: str  # "name version"
    entry_point: EntryPoint

    def describe(self) -> str:
        return f"plugin {self.name!r} ({self.distribution}, {self.value})"


class Registry(Generic[T]):
    """A table of names read by config key.

    ``locations`` maps each built-in name to ``"module:attr"``, imported on first use;
    ``group`` names the entry-point group plugins add to; ``register`` adds further entries
    at run time (tests, extensions). ``field`` is the config key that names an entry
    (``model.arch``); lookups of unknown names raise ``error`` with :func:`unknown_name`'s
    message.
    """

    def __init__(self, field: str, locations: Mapping[str, str],
                 error: type[Exception] = ValueError, group: str | None = None) -> None:
        self.field = field
        self.error = error
        self.group = group
        self.locations = dict(locations)
        self.table: dict[str, T] = {}  # the entries imported or registered so far
        self._plugins: dict[str, Plugin] | None = None  # read on first use
        self.problems: list[str] = []  # plugins ignored, one line each

    @property
    def plugins(self) -> dict[str, Plugin]:
        if self._plugins is None:
            self._plugins = {}
            for ep in entry_points(group=self.group) if self.group else ():
                dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
                plugin = Plugin(ep.name, ep.value, dist, ep)
                if ep.name in self.locations or ep.name in self._plugins:
                    self.problems.append(f"{self.field}: {plugin.describe()} ignored: the "
                                         f"name {ep.name!r} is taken")
                    continue
                self._plugins[ep.name] = plugin
        return self._plugins

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self:  # a second claim on a name is a bug, not an override
                raise ValueError(f"{self.field} {name!r} registered twice")
            self.table[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self.table:
            if name in self.locations:
                module, _, attr = self.locations[name].partition(":")
                self.table[name] = getattr(importlib.import_module(module), attr)
            elif name in self.plugins:
                self.table[name] = self._load_plugin(self.plugins[name])
            else:
                raise self.error(self.unknown(name))
        return self.table[name]

    def _load_plugin(self, plugin: Plugin) -> T:
        try:
            return plugin.entry_point.load()
        except Exception as exc:  # whatever the plugin's import raises: one line, ours
            raise PluginError(f"{self.field}: {plugin.describe()} failed to import: "
                              f"{type(exc).__name__}: {one_line(exc)}") from None

    def source(self, name: str) -> str:
        """Where an entry comes from: `built-in`, `plugin <distribution>` or `registered`."""
        if name in self.locations:
            return "built-in"
        if name in self.plugins:
            return f"plugin {self.plugins[name].distribution}"
        return "registered"

    def unknown(self, name: str) -> str:
        return unknown_name(self.field, name, self.names())

    def names(self) -> list[str]:
        return sorted(self.locations.keys() | self.table.keys() | self.plugins.keys())

    def __contains__(self, name: object) -> bool:
        return name in self.table or name in self.locations or name in self.plugins

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class PluginError(ConfigError):
    """A plugin that does not import: the same on every retry, so never retried."""


# The entry-point groups plugins add to.
GROUPS = {"methods": "caat_sweeper.methods", "datasets": "caat_sweeper.datasets",
          "models": "caat_sweeper.models"}

# The built-in entries. A new dataset, model or method is one line here (or a plugin).
# loader(cfg: DatasetConfig, seed: int) -> DatasetSplits
DATASETS: Registry[Callable[..., DatasetSplits]] = Registry(
    "dataset.name", group=GROUPS["datasets"], locations={
    "fashion_mnist": "trainables.data:load_fashion_mnist",
    "cifar10": "trainables.data:load_cifar10",
    "cifar100": "trainables.data:load_cifar100",
    "gmm": "trainables.synthetic_data:load_gmm",
    "synthetic": "trainables.synthetic_data:load_synthetic",
})

# factory(num_classes, in_channels, input_shape) -> the bare network
MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model.arch", group=GROUPS["models"], locations={
    "linear": "trainables.models:_linear",
    "mlp": "trainables.models:_mlp",
    "small_cnn": "trainables.models:_small_cnn",
    "preact_resnet18": "trainables.models:_preact_resnet18",
    "wrn28_10": "trainables.models:_wrn28_10",
    "resnet32": "trainables.models:_resnet32",
})

METHODS: Registry[type[Method]] = Registry(
    "method.name", group=GROUPS["methods"], locations={
    "erm": "trainables.methods.erm:ERM",
    "pgd_at": "trainables.methods.pgd_at:PGDAT",
    "trades": "trainables.methods.trades:TRADES",
    "frl": "trainables.methods.frl:FRL",
    "mwn": "trainables.methods.mwn:MWN",
    "anti_adv": "trainables.methods.anti_adv:AntiAdv",
    "caat": "trainables.methods.caat:CAAT",
    "faal": "trainables.methods.faal:FAAL",
    "cfa": "trainables.methods.cfa:CFA",
    "wat": "trainables.methods.wat:WAT",
    "dafa": "trainables.methods.dafa:DAFA",
    "bat": "trainables.methods.bat:BAT",
    "fgsm_rs": "trainables.methods.fgsm_rs:FGSMRS",
    "n_fgsm": "trainables.methods.n_fgsm:NFGSM",
    "at_bsl": "trainables.methods.at_bsl:ATBSL",
    "te": "trainables.methods.te:TE",
})
