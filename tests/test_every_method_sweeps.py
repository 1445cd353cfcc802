"""Every built-in method can be swept in every shipped space: added to the space's methods,
it gets its cells (in every scenario that does not name its own methods), they validate, and
the shared keys (`base`, `search.all`) reach it wherever it has the knob; and every method
with knobs of its own beyond the attack's and TRADES' has them searched in a shipped space."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

from sweeper.spaces import method_keys, parse_space
from trainables.config import validate
from trainables.knobs import TradesKnobs
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


# Methods whose only knobs are the shared attack / TRADES ones, or that the harness ran before
# the baselines (their spaces search what their rows needed).
SHARED_ONLY = {"erm", "pgd_at", "trades", "frl", "mwn", "anti_adv", "caat"}


@functools.cache
def searched_keys() -> dict[str, set[str]]:
    """Per method, the `method.*` keys some shipped space searches for it (its own block)."""
    keys: dict[str, set[str]] = {}
    for space in SPACES:
        raw = yaml.safe_load((ROOT / "search_spaces" / space).read_text())
        for method, block in (raw.get("search") or {}).items():
            if method in raw["methods"]:
                keys.setdefault(method, set()).update(k for k in block if k.startswith("method."))
    return keys


@pytest.mark.parametrize("method", sorted(set(BUILT_IN) - SHARED_ONLY))
def test_every_baseline_has_its_own_knobs_searched_in_a_shipped_space(method):
    own = set(method_keys(method)) - {f"method.{k}" for k in TradesKnobs.knob_names()}
    searched = searched_keys().get(method, set())
    assert searched & own, f"{method}: no shipped space searches any of {sorted(own)}"
    assert searched <= set(method_keys(method))
