"""A trial's checkpoints and where they go: the state file, the RNGs, and the reporters.

A checkpoint holds everything a trial needs to continue bit for bit (`trainables.trial`
writes it after every epoch); a reporter keeps the latest one, in a directory for `caat-sweep
train` or in Ray Tune's session for a sweep (the only Ray import in `trainables`).
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainables.errors import ConfigError, one_line

CHECKPOINT_FILE = "state.pt"


class Reporter(Protocol):
    """Where a trial sends its per-epoch results (a directory, or Ray Tune)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None: ...

    def latest_checkpoint(self) -> Path | None: ...


# ------------------------------------------------------------------------- the state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: Path, **state: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # Write then rename: a crash mid-write never leaves a truncated checkpoint behind.
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / CHECKPOINT_FILE)
    return directory


def load_state(directory: Path) -> dict[str, Any]:
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def restore_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                  method: Any) -> dict[str, Any]:
    """Load a trial's checkpoint into its model, optimiser, method and RNGs.

    A checkpoint of another format (another model, method or version of this code) fails
    the same way on every retry: a ConfigError naming it, so a sweep fails the trial at
    once instead of retrying it max_failures times."""
    try:
        state = load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        if missing := {"epoch", "history"} - state.keys():
            raise KeyError(", ".join(sorted(missing)))
    except (KeyError, TypeError, ValueError, RuntimeError, EOFError,
            pickle.UnpicklingError) as err:
        raise ConfigError(f"checkpoint {Path(directory) / CHECKPOINT_FILE}: not a checkpoint "
                          f"of this trial ({type(err).__name__}: {one_line(err, 160)}); start "
                          "the trial afresh (train: a new --out, or --force)") from None
    return state


# ------------------------------------------------------------------------- reporters


class DirectoryReporter:
    """Keeps the latest checkpoint and the metric history in a directory (no Ray)."""

    def __init__(self, out_dir: Path, on_report: Callable[[dict[str, Any]], None] | None = None):
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoint"
        self.on_report = on_report

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        tmp = self.out_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        tmp.rename(self.checkpoint_dir)
        if self.on_report:
            self.on_report(metrics)

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoint_dir if (self.checkpoint_dir / CHECKPOINT_FILE).is_file() else None


class RayReporter:
    """The adapter between `run_trial` and Ray Tune's session API."""

    def __init__(self) -> None:
        from ray import tune

        self._tune = tune
        self._restored: tempfile.TemporaryDirectory | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        (checkpoint_dir / "classwise.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if isinstance(v, list)}))
        self._tune.report(scalars, checkpoint=self._tune.Checkpoint.from_directory(
            str(checkpoint_dir)))

    def latest_checkpoint(self) -> Path | None:
        ckpt = self._tune.get_checkpoint()
        if ckpt is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="caat-restore-")
        return Path(ckpt.to_directory(self._restored.name))
