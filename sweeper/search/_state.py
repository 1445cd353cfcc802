"""The sweep searcher's saved state: typed, versioned, and written only through public APIs.

One file per save (Ray's `Searcher.save(checkpoint_path)`, so `Tuner.restore` finds it):
JSON with the searcher's own bookkeeping (which Ray trial is which cell's, phase, params
and study trial number; how each ended, with its objective values) and the bytes each
cell's `ASHAScheduler.save` wrote (the rungs). The cells' Optuna studies are not in it:
they live in the sweep's Optuna storage (`sweeper.search._study`). Loading refuses a file
of another format version or of other cells, one line each.
"""

from __future__ import annotations

import base64
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeper import storage as st
from trainables.errors import ConfigError

STATE_FORMAT = "caat-sweeper search state"
# 2: studies moved to Optuna storage; `ended` holds {metric: value}.
STATE_VERSION = 2


@dataclass
class SearchState:
    """What `CellSearcher` saves. Trial ids are Ray's; `cells` are the plan's, in order."""

    cells: list[str]
    trials: dict[str, dict[str, Any]]  # trial id -> its `_sweep` entry + "params", in order
    issued: dict[str, int]  # cell -> tuning trials handed out
    confirmed: dict[str, int]  # cell -> confirmation trials handed out
    # trial id -> (outcome, {metric: value} of the objectives and constrained metrics)
    ended: dict[str, tuple[str, dict[str, float]]]
    cursor: int  # the cell the next tuning trial comes from
    study_numbers: dict[str, int]  # tuning trial id -> its trial number in its cell's study
    schedulers: dict[str, bytes] = field(default_factory=dict)  # cell -> ASHAScheduler.save
    version: int = STATE_VERSION

    def to_bytes(self) -> bytes:
        blobs = {"schedulers": self.schedulers}
        doc = {"format": STATE_FORMAT, "version": self.version, "cells": self.cells,
               "trials": self.trials, "issued": self.issued, "confirmed": self.confirmed,
               "ended": {t: list(v) for t, v in self.ended.items()}, "cursor": self.cursor,
               "study_numbers": self.study_numbers,
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
                 for k in ("schedulers",)}
        return cls(cells=doc["cells"], trials=doc["trials"], issued=doc["issued"],
                   confirmed=doc["confirmed"], cursor=doc["cursor"],
                   ended={t: (v[0], v[1]) for t, v in doc["ended"].items()},
                   study_numbers=doc["study_numbers"], **blobs)

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
    """Cell id -> {Ray trial id: its Optuna FrozenTrial}: which study trial each Ray tuning
    trial is, read from the sweep's Optuna storage (`RAY_TRIAL_ATTR`)."""
    import optuna

    from sweeper.search._study import RAY_TRIAL_ATTR

    manifest = json.loads(st.read_bytes(st.join(sweep_dir, st.MANIFEST)))
    url = manifest.get("optuna_storage") or st.study_storage(sweep_dir)
    out = {}
    for summary in optuna.get_all_study_summaries(url):
        study = optuna.load_study(study_name=summary.study_name, storage=url)
        out[summary.study_name] = {t.user_attrs[RAY_TRIAL_ATTR]: t for t in study.trials
                                   if RAY_TRIAL_ATTR in t.user_attrs}
    return out


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
