"""`caat-sweep methods`: every method, built-in or from a plugin, with its knobs.

Each entry: the method's name, where it comes from (`built-in` or `plugin <distribution>`)
and its knobs (name, type, default, bounds, what it does), read from its knob model; a
method that cannot be loaded (a plugin that does not import) is listed with that one line
instead, and the others are listed as usual.
"""

from __future__ import annotations

from typing import Any

from trainables.errors import ConfigError
from trainables.knobs import describe
from trainables.registry import METHODS


def catalog() -> list[dict[str, Any]]:
    """One entry per registered method, in name order (JSON-ready)."""
    entries = []
    for name in METHODS.names():
        entry: dict[str, Any] = {"name": name, "source": METHODS.source(name)}
        try:
            entry["knobs"] = describe(METHODS.get(name).knobs)
        except ConfigError as err:
            entry["error"] = str(err)
        entries.append(entry)
    return entries


def _bounds(bounds: dict[str, float]) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{signs[k]} {v:g}" for k, v in bounds.items())


def format_catalog(entries: list[dict[str, Any]]) -> str:
    """The catalogue as text: a block per method, a line per knob."""
    lines = []
    for entry in entries:
        lines.append(f"{entry['name']}  ({entry['source']})")
        if "error" in entry:
            lines.append(f"  cannot be loaded: {entry['error']}")
        elif not entry["knobs"]:
            lines.append("  no knobs")
        else:
            width = max(len(k["name"]) for k in entry["knobs"])
            for k in entry["knobs"]:
                spec = f"{k['type']} = {k['default']!r}"
                if k["bounds"]:
                    spec += f" ({_bounds(k['bounds'])})"
                lines.append(f"  method.{k['name']:<{width}}  {spec}"
                             + (f"  {k['description']}" if k["description"] else ""))
        lines.append("")
    for problem in METHODS.problems:
        lines.append(f"note: {problem}")
    return "\n".join(lines).rstrip()
