"""Sweep test support: one local Ray for in-process sweeps, tiny gmm spaces, process hygiene.

Test modules import the helpers they use (`from sweep_support import tiny_space`); the
fixtures (`ray_local`, `private_ray_env`) live in this folder's conftest.py.

Ray takes seconds to start, so the in-process sweep tests share one local instance (two
CPUs, like CI). Tests that need their own driver or cluster (SIGKILL, multi-node) start
subprocesses with a private RAY_TMPDIR and clean up every process they started.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

CLI = [sys.executable, "-m", "sweeper.cli"]
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from headless_browser import find_browser  # noqa: E402

# The tests that look at a web UI through headless Chromium. `make test` installs Debian's
# chromium where it can (root and apt); only where it cannot is the test skipped. CI sets
# CAAT_REQUIRE_BROWSER=1, so there a missing browser fails the test instead of hiding it.
needs_chromium = pytest.mark.skipif(
    find_browser() is None and os.environ.get("CAAT_REQUIRE_BROWSER") != "1",
    reason="no chromium, and none could be installed (`make test` runs apt-get install "
           "chromium as root)")


def tiny_space(**top) -> dict:
    """A sweep of linear/mlp models on a tiny Gaussian mixture: trials take ~0.1 s."""
    space = {
        "name": "tiny",
        "base": {
            "dataset": {"name": "gmm", "shape": [1, 1, 8], "num_classes": 3, "n_train": 300,
                        "n_test": 90},
            "scenario": {"meta_per_class": 5, "val_per_class": 10},
            "model": {"arch": "mlp"},
            "method": {"steps": 2},
            "optim": {"epochs": 3, "batch_size": 32},
            "eval": {"steps": 2},
            "runtime": {"device": "cpu"},
        },
        "scenarios": [{"noise_type": "pair", "noise_rate": 0.2}],
        "methods": ["erm", "trades"],
        "search": {"all": {"optim.lr": {"type": "float", "low": 0.01, "high": 0.2,
                                        "log": True}},
                   "trades": {"method.beta": {"type": "float", "low": 1.0, "high": 6.0}}},
        "trials_per_cell": 2,
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "confirm": {"seeds": [1]},
    }
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(space.get(key), dict):
            merged = copy.deepcopy(space[key])
            merged.update(value)
            space[key] = merged
        else:
            space[key] = value
    from trainables.config import knobs_model

    if not any("steps" in knobs_model(m).model_fields for m in space["methods"]):
        space["base"].pop("method")  # a sweep of methods without an attack (ERM)
    return space


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter that imports this checkout (for what a
    command loads: tests of which heavy packages it imports)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def session_pids(sid: int) -> list[int]:
    """Processes of a session (a subprocess started with start_new_session=True)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                out.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return out


def kill_session(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGKILL a subprocess's whole session and wait until none of it is left.

    Ray's raylet and workers die with their driver (fate sharing) but may take seconds;
    whatever is still there after the grace period is killed by pid (ours: same session).
    """
    sid = proc.pid
    _kill(session_pids(sid))
    proc.wait(timeout=30)
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    _kill(session_pids(sid))
    time.sleep(1)
    assert not session_pids(sid), f"processes left over: {session_pids(sid)}"


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
