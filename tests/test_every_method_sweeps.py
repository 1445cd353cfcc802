"""Every built-in method can be swept in every shipped space: added to the space's methods,
it gets its cells (in every scenario that does not name its own methods), they validate, and
the shared keys (`base`, `search.all`) reach it wherever it has the knob."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sweeper.spaces import parse_space
from trainables.config import validate
from trainables.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
BUILT_IN = sorted(name for name, where in METHODS.locations.items()
                  if where.startswith("trainables."))


@pytest.mark.parametrize("space", SPACES)
def test_every_built_in_method_sweeps_in_every_shipped_space(space):
    raw = yaml.safe_load((ROOT / "search_spaces" / space).read_text())
    for method in BUILT_IN:
        added = {**raw, "methods": list(dict.fromkeys([*raw["methods"], method]))}
        plan = parse_space(added, source=f"{space} + {method}")
        cells = [c for c in plan.cells if c.method == method]
        assert cells, (space, method)
        for cell in cells:
            assert validate(cell.config).method.name == method
