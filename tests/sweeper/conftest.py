"""Fixtures of the sweep tests: one shared local Ray, and private Ray temp dirs for subprocesses."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray shared by the in-process sweep tests (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def private_ray_env():
    """Environment for subprocesses with their own Ray: a private temp dir (short, for
    Ray's socket paths), removed afterwards."""
    env = dict(os.environ)
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env["CAAT_OFFLINE"] = "1"
    yield env
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
