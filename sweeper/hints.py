"""The commands the tools print for a user to paste ("`caat-sweep resume NAME` continues
it"), with every non-default option they need, so that they work as printed.

A sweep launched with `--storage /scratch/runs` is found by `resume`, `status`, `sync` and
`dashboard` only with that option again; `analyze` and `ui` find its runs only with its
`--tracking-uri`. The defaults are what the same command resolves with no option, from the
directory and environment it runs in.
"""

from __future__ import annotations

import logging
import shlex

from sweeper.contract import resolve_tracking_uri
from sweeper.storage import resolve_storage

# Which option finds a sweep, per command.
_STORAGE_VERBS = {"resume", "status", "sync", "dashboard"}
_TRACKING_VERBS = {"analyze", "ui"}


def command(verb: str, name: str | None = None, *, storage: str | None = None,
            tracking_uri: str | None = None) -> str:
    """`caat-sweep VERB [NAME] [--out ...] [--storage S] [--tracking-uri U]`, shell-quoted."""
    parts = ["caat-sweep", verb] + ([name] if name else [])
    if verb == "analyze" and name:
        parts += ["--out", f"runs/analysis/{name}"]
    if verb in _STORAGE_VERBS and storage and storage != resolve_storage(None):
        parts += ["--storage", storage]
    if verb in _TRACKING_VERBS and tracking_uri and tracking_uri != resolve_tracking_uri(None):
        parts += ["--tracking-uri", tracking_uri]
    return shlex.join(parts)


def for_sweep(verb: str, manifest) -> str:
    """`command` for a sweep from its manifest (`sweeper.storage.Manifest`)."""
    return command(verb, manifest.name, storage=manifest.storage,
                   tracking_uri=manifest.tracking_uri)


class RayResumeHintFilter(logging.Filter):
    """Drops Ray Tune's "Resume experiment with: Tuner.restore(...)": a sweep resumes with
    `caat-sweep resume`, which the driver prints itself (Tuner.restore alone would skip the
    studies, the MLflow runs and the confirmation phase)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def quiet_ray_resume_hint() -> None:
    target = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, RayResumeHintFilter) for f in target.filters):
        target.addFilter(RayResumeHintFilter())
