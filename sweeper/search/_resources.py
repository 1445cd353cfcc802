"""Whether the cluster can ever run a trial: checked once Ray is up, before the sweep
writes anything, and watched while it runs.

Ray keeps a trial PENDING, silently, for as long as no node can give what it asks; only
the autoscaler's log says why. A local cluster never grows, so a trial it cannot fit is
refused at launch. A cluster behind `--address` may grow (an autoscaler), so it gets a
warning, and `StallWatch` stops the sweep, resumably, when trials have waited
`resources.pending_timeout_s` with nothing running.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Mapping

from ray.tune import Callback

from trainables.errors import ConfigError

# The space's resources fields and Ray's resource names.
RAY_NAMES = {"cpu": "CPU", "gpu": "GPU"}
EXIT_STALLED = 4


def shortfalls(asked: Mapping[str, float], have: Mapping[str, float]) -> list[tuple[str, float,
                                                                                    float]]:
    """(field, asked, has) for each resource a trial asks more of than the cluster has."""
    return [(field, need, float(have.get(RAY_NAMES[field], 0.0)))
            for field, need in asked.items()
            if need > 0 and float(have.get(RAY_NAMES[field], 0.0)) < need]


def check_resources(asked: Mapping[str, float], have: Mapping[str, float], *,
                    local: bool) -> str | None:
    """Refuse (local) or return a warning (a cluster that may scale) when no trial fits."""
    short = shortfalls(asked, have)
    if not short:
        return None
    field, need, has = short[0]
    unit = "GPU" if field == "gpu" else "CPU"
    if local:
        hint = ("set resources.gpu: 0 to train on the CPU, or launch on a machine or "
                "--address cluster with GPUs" if field == "gpu" else
                f"lower resources.cpu to at most {has:g} (or raise --num-cpus)")
        raise ConfigError(f"resources.{field}: a trial asks for {need:g} {unit}, and this "
                          f"machine's Ray has {has:g}; {hint}")
    return (f"warning: resources.{field}: a trial asks for {need:g} {unit}, and the cluster "
            f"has {has:g} now; trials wait for its autoscaler, and the sweep stops if they "
            "wait resources.pending_timeout_s with nothing running")


class StallWatch(Callback):
    """A Tune callback: when trials have been PENDING for `timeout_s` with none running,
    stop the sweep as Ctrl-C does (Tune saves its state; `resume` continues) and leave the
    reason for the driver (`stalled()`).

    Tune pickles its callbacks with the experiment and a resumed sweep runs the unpickled
    ones, so this holds plain values only, and forgets its clock when pickled."""

    def __init__(self, timeout_s: float | None, asked: Mapping[str, float]):
        self.timeout_s, self.asked = timeout_s, dict(asked)
        self._since: float | None = None
        self.clock: Callable[[], float] = time.monotonic

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_since", "clock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _since=None, clock=time.monotonic)

    def on_step_end(self, iteration, trials, **info):
        if self.observe([t.status for t in trials]):
            _request_stop(self.message())

    def observe(self, statuses: list[str]) -> bool:
        """Whether, at this look at the trials' states, they have waited too long."""
        if self.timeout_s is None or "RUNNING" in statuses or "PENDING" not in statuses:
            self._since = None
            return False
        now = self.clock()
        self._since = now if self._since is None else self._since
        return now - self._since >= self.timeout_s

    def message(self) -> str:
        asked = ", ".join(f"{k}: {v:g}" for k, v in self.asked.items())
        return (f"no trial could start for {self.timeout_s:g} s "
                f"(resources.pending_timeout_s): each asks for {{{asked}}} and no node has "
                "it free; add nodes or lower resources in a new sweep, or resume when the "
                "cluster can give it")


_STALLED: list[str] = []


def _request_stop(message: str) -> None:
    if _STALLED:
        return  # asked once already; Tune is stopping
    _STALLED.append(message)
    # Tune's own stop signal while `fit` runs (SIGUSR1 where there is one: unlike SIGINT it
    # cannot be taken for the user's Ctrl-C): stop at the next step, save the state, return.
    signal.raise_signal(getattr(signal, "SIGUSR1", signal.SIGINT))


def stalled() -> str | None:
    """Why the watch stopped this process's sweep, if it did."""
    return _STALLED[-1] if _STALLED else None


def reset() -> None:
    """Forget an earlier sweep's stall (a process that runs several: tests, notebooks)."""
    _STALLED.clear()


def warn(message: str | None) -> None:
    if message:
        print(message, file=sys.stderr)
