"""Which MLflow store a command talks to. Its own module so that `analyze` and the scripts
resolve the URI exactly as `launch` does without importing Ray (`sweeper.tracking` does)."""

from __future__ import annotations

import os
from pathlib import Path

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
