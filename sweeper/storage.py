"""Where a sweep lives: a local directory or a cloud URI, and the manifest kept there.

`<storage>/<name>/` is Ray Tune's experiment directory (trials, checkpoints, the searcher's
studies) plus two things of ours: `sweep.json`, the manifest `resume` and `status` start
from (the space file as launched, tracking URI, Ray address, MLflow ids, state), and
`warm_starts/`, the ERM warm starts trained once per scenario and seed. All access goes
through pyarrow filesystems, the same layer Ray Tune uses, so `s3://`, `gs://` and local
paths behave alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from trainables.errors import ConfigError, one_line

DEFAULT_STORAGE = "runs"
MANIFEST = "sweep.json"
WARM_STARTS = "warm_starts"


def is_uri(storage: str) -> bool:
    return "://" in storage


def resolve_storage(storage: str | None) -> str:
    """An absolute local path (Ray Tune needs one) or the URI as given."""
    storage = storage or DEFAULT_STORAGE
    if is_uri(storage):
        return storage
    return str(Path(storage).expanduser().resolve())


def join(storage: str, *parts: str) -> str:
    return "/".join([storage.rstrip("/"), *parts])


def filesystem(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(uri_or_path):
        uri_or_path = str(Path(uri_or_path).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri_or_path)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError with long messages
        raise ConfigError(f"--storage: cannot open {uri_or_path} ({one_line(err)})") from None


def exists(uri_or_path: str) -> bool:
    fs, path = filesystem(uri_or_path)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri_or_path: str) -> bytes:
    fs, path = filesystem(uri_or_path)
    with fs.open_input_stream(path) as f:
        return f.readall()


def write_bytes(uri_or_path: str, data: bytes) -> None:
    """Write then move, so a reader (or a crash) never sees half a file."""
    fs, path = filesystem(uri_or_path)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def remove(uri_or_path: str) -> None:
    """Delete a file; a missing one is fine."""
    fs, path = filesystem(uri_or_path)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def list_dirs(uri_or_path: str) -> list[str]:
    fs, path = filesystem(uri_or_path)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


# ---------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    name: str
    storage: str
    tracking_uri: str
    space_text: str
    space_source: str
    address: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    # running: a driver runs it (or died without a word: `status` checks its lock);
    # interrupted: stopped by Ctrl-C, SIGTERM or stalled trials; failed: its driver ended on
    # an error; done: complete. All but done are continued by `caat-sweep resume`.
    state: str = "running"
    # Where the cells' Optuna studies live (an RDB URL; study name = cell id).
    optuna_storage: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sweep_dir(self) -> str:
        return join(self.storage, self.name)

    @property
    def studies_url(self) -> str:
        """The RDB URL of the sweep's Optuna studies (`study_storage`)."""
        return self.optuna_storage or study_storage(self.sweep_dir)

    def save(self) -> None:
        write_bytes(join(self.sweep_dir, MANIFEST), json.dumps(asdict(self), indent=2).encode())


OPTUNA_DB = "optuna.db"


def study_storage(sweep_dir: str, given: str | None = None) -> str:
    """The RDB URL of a sweep's Optuna studies: `given` (--optuna-storage: any SQLAlchemy
    URL Optuna's RDBStorage takes, for clusters), else an SQLite file in a local sweep's
    directory. Every study is one cell's, named by the cell id."""
    if given:
        if "://" not in given:
            raise ConfigError(f"--optuna-storage: {given!r} is not a database URL; e.g. "
                              "sqlite:///path/optuna.db or postgresql://user@host/db")
        return given
    if is_uri(sweep_dir):
        raise ConfigError(f"--optuna-storage: the sweep's storage {sweep_dir} is not a local "
                          "directory, so its Optuna studies need a database every node can "
                          "reach; pass --optuna-storage postgresql://... or mysql://...")
    return f"sqlite:///{Path(sweep_dir) / OPTUNA_DB}"


def sweep_exists(storage: str, name: str) -> bool:
    return exists(join(storage, name, MANIFEST))


def load_manifest(storage: str, name: str) -> Manifest:
    path = join(storage, name, MANIFEST)
    if not exists(path):
        known = [d for d in list_dirs(storage) if exists(join(storage, d, MANIFEST))]
        hint = f"sweeps there: {', '.join(known)}" if known else "no sweeps there"
        raise ConfigError(f"sweep {name!r}: not found in {storage} ({hint}); "
                          "pass --storage where it was launched")
    data = json.loads(read_bytes(path))
    return Manifest(**data)


# ------------------------------------------------------------------------ warm starts


def save_tensors(uri: str, state: dict) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes(uri, buf.getvalue())


def load_tensors(uri: str) -> dict:
    import torch

    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------- storage checks


def check_writable(storage: str) -> None:
    """Refuse (one line, exit 2) a local storage that is a file or cannot be written, before
    Ray starts; leaves no directory behind. Cloud URIs are checked by their first write."""
    if is_uri(storage) and not storage.startswith("file://"):
        filesystem(storage)  # an unknown scheme or bad bucket URI fails here
        return
    root = Path(storage.removeprefix("file://"))
    blocker = next((p for p in [root, *root.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"--storage: {storage}: {blocker} is a file, not a directory")
    with _probe_file(root):
        pass


@contextlib.contextmanager
def _probe_file(root: Path) -> Iterator[Path]:
    """A file written in `root` for the checks above, removed afterwards with every
    directory made for it: a refused launch leaves nothing behind."""
    created = [p for p in [root, *root.parents] if not p.exists()]
    marker = root / f".caat-storage-check-{uuid.uuid4().hex[:8]}"
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            marker.write_text("probe")
        except OSError as err:
            raise ConfigError(f"--storage: cannot write to {root} ({one_line(err)})") from None
        yield marker
    finally:
        marker.unlink(missing_ok=True)
        for path in created:  # deepest first
            _remove_empty(path)


# --------------------------------------------------------------- multi-node storage check


def check_shared(storage: str, unseen_by: Callable[[str], list[str]] | None = None) -> None:
    """Fail before launch when some node of the Ray cluster cannot see a local storage path.

    Ray Tune writes checkpoints from the node a trial runs on and restores them on any
    node, so every node needs the same storage: a cloud URI, or a filesystem shared at the
    same path (NFS). A file written here and looked for from every node tells which.
    """
    if is_uri(storage) and not storage.startswith("file://"):
        return
    unseen_by = unseen_by or _nodes_missing
    with _probe_file(Path(storage.removeprefix("file://"))) as marker:
        missing = unseen_by(str(marker))
    if missing:
        raise ConfigError(
            f"--storage: {storage} is a local path that {len(missing)} node(s) of this Ray "
            f"cluster cannot see ({', '.join(missing)}); a multi-node cluster needs storage "
            "every node shares: a cloud URI (s3://, gs://, abfs://) or a shared filesystem "
            "mounted at the same path on every node")


def _remove_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def _nodes_missing(marker: str) -> list[str]:
    """IPs of alive Ray nodes on which `marker` does not exist (none on a single node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return []
    probe = ray.remote(num_cpus=0)(os.path.exists)
    refs = {n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(marker) for n in nodes}
    return [name for name, ref in refs.items() if not ray.get(ref, timeout=120)]


