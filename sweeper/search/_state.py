"""The sweep searcher's saved state: typed, versioned, and written only through public APIs.

One file per save (Ray's `Searcher.save(checkpoint_path)`, so `Tuner.restore` finds it):
JSON with the searcher's own bookkeeping, each cell's Optuna study as Optuna's journal
(plain dicts, the format of `optuna.storages.JournalStorage`), and the bytes that each
cell's `OptunaSearch.save` and `ASHAScheduler.save` wrote (the sampler's random state,
the running trials, the ASHA rungs). Loading refuses a file of another format version or
of other cells, one line each.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optuna.storages.journal import BaseJournalBackend

from sweeper import storage as st
from trainables.errors import ConfigError

STATE_FORMAT = "caat-sweeper search state"
STATE_VERSION = 1


@dataclass
class SearchState:
    """What `CellSearcher` saves. Trial ids are Ray's; `cells` are the plan's, in order."""

    cells: list[str]
    trials: dict[str, dict[str, Any]]  # trial id -> its `_sweep` entry + "params", in order
    issued: dict[str, int]  # cell -> tuning trials handed out
    confirmed: dict[str, int]  # cell -> confirmation trials handed out
    ended: dict[str, tuple[str, float | None]]  # trial id -> (outcome, selection value)
    cursor: int  # the cell the next tuning trial comes from
    study_numbers: dict[str, int]  # tuning trial id -> its trial number in its cell's study
    studies: dict[str, list[dict]] = field(default_factory=dict)  # cell -> journal logs
    searchers: dict[str, bytes] = field(default_factory=dict)  # cell -> OptunaSearch.save
    schedulers: dict[str, bytes] = field(default_factory=dict)  # cell -> ASHAScheduler.save
    version: int = STATE_VERSION

    def to_bytes(self) -> bytes:
        blobs = {"searchers": self.searchers, "schedulers": self.schedulers}
        doc = {"format": STATE_FORMAT, "version": self.version, "cells": self.cells,
               "trials": self.trials, "issued": self.issued, "confirmed": self.confirmed,
               "ended": {t: list(v) for t, v in self.ended.items()}, "cursor": self.cursor,
               "study_numbers": self.study_numbers, "studies": self.studies,
               **{k: {c: base64.b64encode(b).decode() for c, b in v.items()}
                  for k, v in blobs.items()}}
        return json.dumps(doc, default=_plain).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str,
                   cells: list[str] | None = None) -> SearchState:
        """The state in `data` (read from `source`, named in errors); with `cells`, only
        a state of exactly those cells."""
        doc = _document(data, source)
        if doc["version"] != STATE_VERSION:
            raise ConfigError(f"{source}: search state format version {doc['version']}; this "
                              f"caat-sweeper reads version {STATE_VERSION}")
        if cells is not None and doc["cells"] != cells:
            raise ConfigError(f"{source}: the search state's cells do not match the sweep's "
                              f"({_cell_difference(doc['cells'], cells)})")
        blobs = {k: {c: base64.b64decode(s) for c, s in doc[k].items()}
                 for k in ("searchers", "schedulers")}
        return cls(cells=doc["cells"], trials=doc["trials"], issued=doc["issued"],
                   confirmed=doc["confirmed"], cursor=doc["cursor"],
                   ended={t: (v[0], v[1]) for t, v in doc["ended"].items()},
                   study_numbers=doc["study_numbers"], studies=doc["studies"], **blobs)

    def to_disk(self, path: str) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_disk(cls, path: str, cells: list[str] | None = None) -> SearchState:
        return cls.from_bytes(Path(path).read_bytes(), path, cells)


def _plain(value: Any) -> Any:
    """A numpy scalar a result may carry, as the Python number it stands for."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"search state: cannot save {type(value).__name__} {value!r}")


def _document(data: bytes, source: str) -> dict[str, Any]:
    if data[:1] == b"\x80":  # a pickle: what caat-sweeper saved before this format
        raise ConfigError(f"{source}: this sweep was saved by an older caat-sweeper; finish "
                          "it with that version or start a new sweep")
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise ConfigError(f"{source}: not a caat-sweeper search state")
    return doc


def _cell_difference(saved: list[str], planned: list[str]) -> str:
    missing, extra = sorted(set(planned) - set(saved)), sorted(set(saved) - set(planned))
    parts = [f"not in the state: {', '.join(missing)}"] if missing else []
    parts += [f"not in the sweep: {', '.join(extra)}"] if extra else []
    return "; ".join(parts) or "same cells in another order"


def load_search_state(sweep_dir: str, cells: list[str] | None = None) -> SearchState | None:
    """The latest saved state of a sweep's searcher (None before the first save)."""
    import pyarrow.fs as pafs
    from ray.tune.search import Searcher

    fs, path = st.filesystem(sweep_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    prefix = Searcher.CKPT_FILE_TMPL.split("{}")[0]
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                   if i.base_name.startswith(prefix))
    if not files:
        return None
    with fs.open_input_stream(files[-1]) as f:
        return SearchState.from_bytes(f.readall(), st.join(sweep_dir, Path(files[-1]).name),
                                      cells)


def study_trials(sweep_dir: str) -> dict[str, dict[str, Any]]:
    """Cell id -> {Ray trial id: its Optuna FrozenTrial}: which study trial each run is."""
    state = load_search_state(sweep_dir)
    if state is None:
        return {}
    out = {}
    for cell, logs in state.studies.items():
        frozen = {t.number: t for t in read_study(cell, logs).trials}
        out[cell] = {tid: frozen[n] for tid, n in state.study_numbers.items()
                     if state.trials[tid]["cell"] == cell}
    return out


# ---------------------------------------------------------------- each cell's Optuna study


def read_study(cell: str, logs: list[dict]):
    """The optuna.Study these journal logs hold (a copy: changing it changes nothing saved)."""
    import optuna
    from optuna.storages import JournalStorage

    return optuna.load_study(study_name=cell, storage=JournalStorage(StudyJournal(cell, logs)))


# While CellSearcher saves or restores, the journals its OptunaSearch objects pickle stand
# for its own journals: saved without their logs (the state keeps them once), restored as
# the searcher's live journals, so the searcher reads the same study its OptunaSearch writes.
_LINKED: contextvars.ContextVar[Mapping[str, StudyJournal] | None] = contextvars.ContextVar(
    "caat_sweeper_linked_journals", default=None)


class StudyJournal(BaseJournalBackend):
    """One cell's Optuna study as a list of journal logs, in memory (Optuna's public
    backend interface; the logs are JSON-normalised, as a journal file would have them)."""

    def __init__(self, cell: str, logs: list[dict] | None = None):
        self.cell = cell
        self.logs: list[dict] = list(logs or [])

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self.logs.extend(json.loads(json.dumps(logs)))

    def __reduce__(self):
        linked = _LINKED.get()
        if linked is not None and linked.get(self.cell) is self:
            return _linked_journal, (self.cell,)
        return StudyJournal, (self.cell, self.logs)


def _linked_journal(cell: str) -> StudyJournal:
    linked = _LINKED.get()
    if linked is None or cell not in linked:
        raise RuntimeError(f"cell {cell}: its OptunaSearch state restores only through "
                           "CellSearcher.restore")
    return linked[cell]


@contextlib.contextmanager
def linked_journals(journals: Mapping[str, StudyJournal]) -> Iterator[None]:
    token = _LINKED.set(journals)
    try:
        yield
    finally:
        _LINKED.reset(token)


# ---------------------------------------------------------------- Ray's file-based save


def saved_bytes(obj) -> bytes:
    """What a Ray Searcher or TrialScheduler writes with its public `save(path)`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "state")
        obj.save(path)
        return Path(path).read_bytes()


def restore_bytes(obj, blob: bytes) -> None:
    """Its public `restore(path)` from what `saved_bytes` returned."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state"
        path.write_bytes(blob)
        obj.restore(str(path))
