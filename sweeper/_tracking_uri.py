"""Which MLflow store a command talks to, and a client for it. Its own module so that
`analyze` and the scripts resolve the URI and open the store exactly as `launch` does
without importing Ray (`sweeper.tracking` does)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri` (the --tracking-uri flag), else $MLFLOW_TRACKING_URI, else ./mlflow.db.

    `sqlite:///relative.db` becomes absolute, so resume and status work from any directory,
    and a bare path to an existing file (what people type) a SQLite URI."""
    uri = uri or os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).expanduser().resolve())
    if "://" not in uri and Path(uri).expanduser().is_file():
        return prefix + str(Path(uri).expanduser().resolve())
    return uri


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient whose store is ready. Two processes that open a fresh SQLite file at
    once both create MLflow's tables and break it for good (alembic's temporary tables
    collide): the first creates them while holding a lock on the file's directory, the
    others wait, then find them made."""
    from mlflow import MlflowClient

    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return MlflowClient(tracking_uri=tracking_uri)
    import fcntl
    import os

    folder = Path(tracking_uri[len(prefix):]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)  # the store is open: its tables exist
    finally:
        os.close(fd)  # releases the lock
    return client
