"""A trial whose recorded checkpoint is gone or broken continues from one that is intact.

Ray Tune restores a trial from the checkpoint its saved experiment state names. Two things
break that, and neither should cost the trial:

- The checkpoint is gone. Ray deletes a trial's older checkpoints as new ones arrive
  (`keep_checkpoints`) and uploads its experiment state only every few checkpoints, so a
  driver killed between the two leaves a state naming a deleted checkpoint. Ray's own
  restore then raises, and every retry raises the same.
- The checkpoint is corrupt (a truncated or 0-byte state file): loading it raises a bare
  `EOFError`, again on every retry, while intact neighbours sit beside it.

`resilient(trainable)` wraps the sweep's trainable so that its restore checks the recorded
checkpoint first. When it is missing or does not load, the trial continues from the
trial's intact checkpoint with the most epochs, or, when none is intact, from scratch
under the same trial id (so the same MLflow run), and logs one line with the path and the
reason. The choice depends only on the files, so the driver's tracking callback makes
the same one when the trial starts (`choose_fallback`) and records it as MLflow tags
(`restore`; `error` for a corrupt checkpoint): the trial's actor is not always the
process that ran its restore, so nothing is handed over in memory.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"


@dataclass(frozen=True)
class Fallback:
    """What restore does instead: continue from `path` (None: from scratch), and why."""

    path: str | None
    epoch: int
    note: str
    corrupt: bool  # the recorded checkpoint exists but does not load (an `error` tag)


def checkpoint_epoch(fs: pafs.FileSystem, path: str) -> int | None:
    """The epoch a checkpoint directory holds, or None when it is missing or does not load."""
    import torch

    from trainables.trial import CHECKPOINT_FILE

    try:
        with fs.open_input_stream(f"{path}/{CHECKPOINT_FILE}") as f:
            state = torch.load(io.BytesIO(f.readall()), map_location="cpu", weights_only=True)
        return int(state["epoch"])
    except Exception:  # missing, truncated, not a state: all mean "not usable"
        return None


def problem_with(fs: pafs.FileSystem, path: str) -> str | None:
    """Why the checkpoint at `path` cannot be restored (None: it can)."""
    from trainables.trial import CHECKPOINT_FILE

    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return "missing"
    if checkpoint_epoch(fs, path) is None:
        info = fs.get_file_info(f"{path}/{CHECKPOINT_FILE}")
        if info.type == pafs.FileType.NotFound:
            return f"corrupt: no {CHECKPOINT_FILE}"
        return f"corrupt: {CHECKPOINT_FILE} ({info.size} bytes) does not load"
    return None


def choose_fallback(fs: pafs.FileSystem, recorded: str,
                    epochs: int | None = None) -> Fallback | None:
    """None when the recorded checkpoint restores; else the trial's intact checkpoint with
    the most epochs (ties: the newest name), or from scratch when none is intact.

    A checkpoint of the trial's last epoch (`epochs`) is passed over: restored from it, the
    trial would have no epoch left to run and report, and would end without the result
    that says it completed (Ray's saved state knows only an earlier one)."""
    why = problem_with(fs, recorded)
    if why is None:
        return None
    trial_dir, name = recorded.rstrip("/").rsplit("/", 1)
    best: tuple[int, str, str] | None = None
    if fs.get_file_info(trial_dir).type == pafs.FileType.Directory:
        for info in fs.get_file_info(pafs.FileSelector(trial_dir)):
            if (info.type != pafs.FileType.Directory or info.path.rstrip("/") == recorded
                    or not info.base_name.startswith(CHECKPOINT_PREFIX)):
                continue
            epoch = checkpoint_epoch(fs, info.path)
            if epoch is None or (epochs is not None and epoch >= epochs):
                continue
            if best is None or (epoch, info.base_name) > best[:2]:
                best = (epoch, info.base_name, info.path)
    corrupt = why.startswith("corrupt")
    where = f"{recorded} {why}"
    if best is None:
        return Fallback(None, 0, f"restarted from scratch ({where}; no intact checkpoint)",
                        corrupt)
    epoch, base, path = best
    return Fallback(path, epoch, f"resumed from {base} at epoch {epoch} ({where})", corrupt)


def resilient(trainable_cls: type, epochs_of: Callable[[dict], int | None]) -> type:
    """`trainable_cls` (a Ray Tune Trainable class) with the fallback restore above;
    `epochs_of(config)` is a trial's number of epochs."""
    from ray.train._internal.checkpoint_manager import _TrainingResult
    from ray.tune import Checkpoint

    class Resilient(trainable_cls):
        def restore(self, checkpoint_path: Any):
            result = checkpoint_path
            checkpoint = getattr(result, "checkpoint", None)
            if checkpoint is None:  # a plain path or Checkpoint: Ray's own handling
                return super().restore(checkpoint_path)
            fallback = choose_fallback(checkpoint.filesystem, checkpoint.path,
                                       epochs_of(self.config))
            if fallback is None:
                return super().restore(checkpoint_path)
            logger.warning("trial %s: %s", self.trial_id, fallback.note)
            if fallback.path is None:
                return None  # nothing restored: the training function starts afresh
            intact = Checkpoint(fallback.path, filesystem=checkpoint.filesystem)
            return super().restore(_TrainingResult(
                checkpoint=intact, metrics={"training_iteration": fallback.epoch}))

    Resilient.__name__ = trainable_cls.__name__
    return Resilient


class DeletedCheckpointFilter(logging.Filter):
    """Ray's controller logs `Error handling checkpoint` with a FileNotFoundError traceback
    when it prunes a checkpoint that a killed driver already deleted. The checkpoint is
    gone either way, and resume handles that (above): one quiet line instead of a
    traceback after every kill."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if (isinstance(exc, FileNotFoundError)
                and str(record.msg).startswith("Trial %s: Error handling checkpoint")):
            logger.info("a checkpoint pruned by Ray was already gone (%s)", exc)
            return False
        return True


def quiet_deleted_checkpoints() -> None:
    """Install DeletedCheckpointFilter on Ray Tune's controller logger (once)."""
    target = logging.getLogger("ray.tune.execution.tune_controller")
    if not any(isinstance(f, DeletedCheckpointFilter) for f in target.filters):
        target.addFilter(DeletedCheckpointFilter())
