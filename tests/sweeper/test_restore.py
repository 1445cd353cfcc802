"""Which checkpoint a trial restores from when its recorded one is missing or corrupt
(sweeper.restore), on synthetic checkpoint directories."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from sweeper.restore import DeletedCheckpointFilter, choose_fallback
from trainables.trial import CHECKPOINT_FILE

FS = pafs.LocalFileSystem()


def _checkpoint(trial_dir: Path, index: int, epoch: int | None, corrupt: bool = False) -> str:
    path = trial_dir / f"checkpoint_{index:06d}"
    path.mkdir(parents=True)
    if corrupt:
        (path / CHECKPOINT_FILE).write_bytes(b"")
    elif epoch is not None:
        torch.save({"epoch": epoch, "model": {"w": torch.zeros(2)}}, path / CHECKPOINT_FILE)
    return str(path)


def test_an_intact_recorded_checkpoint_needs_no_fallback(tmp_path):
    recorded = _checkpoint(tmp_path, 3, epoch=4)
    _checkpoint(tmp_path, 2, epoch=3)
    assert choose_fallback(FS, recorded) is None


def test_a_missing_checkpoint_falls_back_to_the_intact_one_with_most_epochs(tmp_path):
    _checkpoint(tmp_path, 4, epoch=5)
    _checkpoint(tmp_path, 5, epoch=6)
    _checkpoint(tmp_path, 6, epoch=None, corrupt=True)  # newer but broken: skipped
    (tmp_path / "checkpoint_tmp").mkdir()  # not a checkpoint: skipped
    recorded = str(tmp_path / "checkpoint_000003")  # deleted by Ray, named by its state
    fallback = choose_fallback(FS, recorded)
    assert fallback.path == str(tmp_path / "checkpoint_000005") and fallback.epoch == 6
    assert not fallback.corrupt
    assert fallback.note == f"resumed from checkpoint_000005 at epoch 6 ({recorded} missing)"


def test_a_checkpoint_of_the_last_epoch_is_passed_over(tmp_path):
    # Restored from it, the trial would end with nothing to report (counted as pruned).
    _checkpoint(tmp_path, 4, epoch=4)
    _checkpoint(tmp_path, 5, epoch=5)
    fallback = choose_fallback(FS, str(tmp_path / "checkpoint_000003"), epochs=5)
    assert fallback.path.endswith("checkpoint_000004") and fallback.epoch == 4
    assert choose_fallback(FS, str(tmp_path / "checkpoint_000003")).epoch == 5


def test_the_most_epochs_wins_over_the_newest_name(tmp_path):
    # After a fallback Ray's index restarts below the surviving names, so a directory with
    # a lower number can hold later epochs.
    _checkpoint(tmp_path, 5, epoch=8)
    _checkpoint(tmp_path, 6, epoch=6)
    fallback = choose_fallback(FS, str(tmp_path / "checkpoint_000002"))
    assert fallback.path.endswith("checkpoint_000005") and fallback.epoch == 8


@pytest.mark.parametrize("content, why", [
    (b"", "corrupt: state.pt (0 bytes) does not load"),
    (b"not a torch file at all", "corrupt: state.pt (23 bytes) does not load"),
    (None, "corrupt: no state.pt"),
])
def test_a_corrupt_recorded_checkpoint_names_its_path_and_reason(tmp_path, content, why):
    recorded = tmp_path / "checkpoint_000004"
    recorded.mkdir()
    if content is not None:
        (recorded / CHECKPOINT_FILE).write_bytes(content)
    _checkpoint(tmp_path, 3, epoch=4)
    fallback = choose_fallback(FS, str(recorded))
    assert fallback.corrupt and fallback.epoch == 4
    assert fallback.note == f"resumed from checkpoint_000003 at epoch 4 ({recorded} {why})"


def test_no_intact_checkpoint_means_from_scratch(tmp_path):
    recorded = _checkpoint(tmp_path, 1, epoch=None, corrupt=True)
    fallback = choose_fallback(FS, recorded)
    assert fallback.path is None and fallback.epoch == 0 and fallback.corrupt
    assert fallback.note.startswith("restarted from scratch (")
    assert "no intact checkpoint" in fallback.note
    gone = choose_fallback(FS, str(tmp_path / "nowhere" / "checkpoint_000001"))
    assert gone.path is None and not gone.corrupt


def test_only_the_deleted_checkpoint_traceback_is_quietened():
    quiet = DeletedCheckpointFilter()

    def record(exc: BaseException, msg: str = "Trial %s: Error handling checkpoint %s"):
        return logging.LogRecord("ray", logging.ERROR, "x", 1, msg, ("t", "c"),
                                 (type(exc), exc, None))

    assert not quiet.filter(record(FileNotFoundError("checkpoint_000001")))
    assert quiet.filter(record(ValueError("something else")))
    assert quiet.filter(record(FileNotFoundError("x"), msg="Another message %s %s"))
