"""Every shipped trial config and every cell of every shipped space resolves to the same
values as before methods owned their knobs.

`data/resolved_before_knobs.json` was written by the code just before that change (one flat
`method` block for all methods): each config's `resolved()` and each cell's searched keys.
Now a config holds only its method's knobs: those must have the values they had, every other
section must be equal, and the cells and their searched keys must be the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweeper.spaces import load_space
from trainables.config import load_config, validate

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests/data/resolved_before_knobs.json").read_text())


def differences(now: dict, before: dict, path: str = "") -> list[str]:
    """What `now` says differently from `before`; `before` may have more method knobs."""
    out = []
    for key, value in now.items():
        if key not in before:
            if ADDED_SINCE.get(f"{path}{key}", object()) != value:
                out.append(f"{path}{key}: new")
        elif isinstance(value, dict):
            out += differences(value, before[key], f"{path}{key}.")
        elif value != before[key]:
            out.append(f"{path}{key}: {value!r}, was {before[key]!r}")
    if path != "method.":
        out += [f"{path}{key}: gone" for key in before if key not in now]
    return out


# Keys added to the config after the record was written, at their defaults (best and last
# checkpoints): a shipped config that leaves them at these values resolves as before.
ADDED_SINCE = {"eval.keep_best": True, "eval.best_metric": "val_robust_acc",
               "eval.autoattack_best": False}
# Spaces shipped after the record was written (their methods' knobs did not exist before).
NEWER_SPACES = {"baselines.yaml"}


def test_the_record_covers_what_is_shipped():
    trials = {p.name for p in (ROOT / "search_spaces/trials").glob("*.yaml")}
    spaces = {p.name for p in (ROOT / "search_spaces").glob("*.yaml")}
    assert set(BEFORE["trials"]) == trials | {"<empty>"}
    assert set(BEFORE["spaces"]) == spaces - NEWER_SPACES


@pytest.mark.parametrize("name", sorted(BEFORE["trials"]))
def test_shipped_trial_configs_resolve_as_before(name):
    source = None if name == "<empty>" else ROOT / "search_spaces/trials" / name
    assert differences(load_config(source).resolved(), BEFORE["trials"][name]) == []


@pytest.mark.parametrize("name", sorted(BEFORE["spaces"]))
def test_shipped_space_cells_resolve_as_before(name):
    plan = load_space(ROOT / "search_spaces" / name)
    before = BEFORE["spaces"][name]
    assert sorted(c.id for c in plan.cells) == sorted(before)
    for cell in plan.cells:
        assert differences(validate(cell.config).resolved(), before[cell.id]["config"]) == [], \
            cell.id
        assert sorted(cell.space) == before[cell.id]["space"], cell.id


def test_the_comparison_is_not_blind():
    before = BEFORE["trials"]["<empty>"]
    now = load_config({"method": {"beta": 3.0}}).resolved()
    assert differences(now, before) == ["method.beta: 3.0, was 6.0"]
