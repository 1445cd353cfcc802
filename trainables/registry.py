"""Name -> object tables for datasets, models and methods, with one-line errors that list
what is allowed (the CLI prints them as they are)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A table filled by a decorator at import time and read by config key.

    ``field`` is the config key that names an entry (``model.arch``); lookups of unknown
    names raise ``error`` with ``field: unknown 'x'; allowed: a, b``.
    """

    def __init__(self, field: str, error: type[Exception] = ValueError) -> None:
        self.field = field
        self.error = error
        self.table: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self.table:  # a second module claiming a name is a bug, not an override
                raise ValueError(f"{self.field} {name!r} registered twice")
            self.table[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self.table:
            raise self.error(self.unknown(name))
        return self.table[name]

    def unknown(self, name: str) -> str:
        return f"{self.field}: unknown {name!r}; allowed: {', '.join(self.names())}"

    def names(self) -> list[str]:
        return sorted(self.table)

    def __contains__(self, name: object) -> bool:
        return name in self.table

    def __iter__(self):
        return iter(self.names())
