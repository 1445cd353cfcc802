"""What every trial of a sweep shares: its place in the sweep (the `_sweep` key), the
datasets in Ray's object store, and the ERM warm starts of each (scenario, seed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sweeper import storage as st
from sweeper.spaces import Cell, SweepPlan
from trainables.config import validate

SWEEP_KEY = "_sweep"  # reserved key in a Ray trial config: the trial's place in the sweep
TUNE, CONFIRM = "tune", "confirm"


def sweep_entry(cell: Cell, phase: str, cfg: Mapping[str, Any],
                tuned_by: str | None = None) -> dict[str, Any]:
    """What a trial's `_sweep` key holds: its place in the sweep and its shared inputs."""
    tc = validate(cfg)
    return {"cell": cell.id, "scenario": cell.scenario, "method": cell.method, "phase": phase,
            "seed": tc.runtime.seed, "epochs": tc.optim.epochs, "data": data_key(tc),
            "warm_start": warm_start_for(cell, tc.runtime.seed), "tuned_by": tuned_by}


def data_key(cfg) -> str:
    """Identifies a loaded dataset: its config section and the seed (generated data)."""
    blob = json.dumps({"dataset": cfg.dataset.model_dump(mode="json"),
                       "seed": cfg.runtime.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def warm_start_for(cell: Cell, seed: int) -> str | None:
    """The ERM warm start a cell's trials with this seed share, or None when not used.

    It is trained from the cell's unsampled config: the knobs a space samples (e.g.
    optim.lr) tune the method's training, not the shared starting point, so every trial
    of a scenario and seed starts from the same weights."""
    from trainables.trial import warm_start_key

    cfg = validate(cell.config)
    if cfg.init.erm_epochs == 0 or cfg.init.checkpoint:
        return None
    cfg.runtime.seed = seed
    return warm_start_key(cfg)


@dataclass
class SharedSplits:
    """DatasetSplits with numpy arrays: Ray's object store hands these out zero-copy."""

    fields: dict[str, Any]

    @classmethod
    def from_splits(cls, splits) -> SharedSplits:
        out = {}
        for f in dataclasses.fields(splits):
            value = getattr(splits, f.name)
            out[f.name] = value.numpy() if hasattr(value, "numpy") else value
        return cls(out)

    def to_splits(self):
        import torch

        from trainables.data import DatasetSplits

        with warnings.catch_warnings():
            # Read-only shared memory: trials never write into their dataset.
            warnings.simplefilter("ignore", UserWarning)
            kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                  for k, v in self.fields.items()}
        return DatasetSplits(**kw)


def sweep_configs(plan: SweepPlan) -> list[dict]:
    """One trial config per (cell, seed) the sweep can run, without sampled values."""
    seeds = [None, *plan.space.confirm.seeds]
    return [plan.trial_config(c, {}, s) for c in plan.cells for s in seeds]


def load_datasets(plan: SweepPlan) -> dict[str, SharedSplits]:
    """Each distinct dataset of the sweep, loaded once (missing data fails here, exit 2)."""
    from trainables import data

    out: dict[str, SharedSplits] = {}
    loaded: list[tuple[dict, Any, SharedSplits]] = []
    for raw in sweep_configs(plan):
        cfg = validate(raw)
        key = data_key(cfg)
        if key in out:
            continue
        splits = data.load(cfg.dataset, seed=cfg.runtime.seed)
        section = cfg.dataset.model_dump()
        # Real datasets ignore the seed: share one copy when the content is the same.
        same = next((s for sec, sp, s in loaded if sec == section and _same(sp, splits)), None)
        if same is None:
            same = SharedSplits.from_splits(splits)
            loaded.append((section, splits, same))
        out[key] = same
    return out


def _same(a, b) -> bool:
    import torch

    return all(torch.equal(getattr(a, n), getattr(b, n))
               for n in ("train_x", "train_y", "test_x", "test_y"))


def _train_warm_start(cfg_raw: dict, shared: SharedSplits) -> dict:
    """A Ray task: ERM warm start of one (scenario, seed), set up as `run_trial` sets up."""
    from trainables.trial import prepare, train_warm_start

    cfg = validate(cfg_raw)
    device, problem = prepare(cfg, shared.to_splits())
    return train_warm_start(cfg, problem, device)


def prepare_warm_starts(plan: SweepPlan, datasets: Mapping[str, SharedSplits],
                        sweep_dir: str) -> dict[str, dict]:
    """The warm starts the sweep needs: from the cache in storage, else trained as Ray
    tasks (in parallel, with the trials' resources) and cached."""
    import ray

    needed: dict[str, dict] = {}
    for cell in plan.cells:
        for seed in [validate(cell.config).runtime.seed, *plan.space.confirm.seeds]:
            key = warm_start_for(cell, seed)
            if key is not None and key not in needed:
                needed[key] = plan.trial_config(cell, {}, seed)
    out, pending = {}, {}
    res = plan.space.resources
    task = ray.remote(_train_warm_start).options(num_cpus=res.cpu, num_gpus=res.gpu)
    for key, raw in needed.items():
        path = st.join(sweep_dir, st.WARM_STARTS, f"erm-{key}.pt")
        if st.exists(path):
            out[key] = st.load_tensors(path)
        else:
            pending[key] = task.remote(raw, datasets[data_key(validate(raw))])
    if pending:
        print(f"training {len(pending)} ERM warm start(s)", file=sys.stderr)
    for key, ref in pending.items():
        out[key] = ray.get(ref)
        st.save_tensors(st.join(sweep_dir, st.WARM_STARTS, f"erm-{key}.pt"), out[key])
    return out
