"""The Ray Tune trainable of a sweep: one trial through `run_trial`, with its shared inputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sweeper.search._faults import FailRule, FaultyReporter
from sweeper.search._inputs import SWEEP_KEY, SharedSplits
from trainables.config import validate


def sweep_trial(config: dict, *, datasets: Mapping[str, SharedSplits],
                warm_starts: Mapping[str, dict], faults: list[FailRule]) -> None:
    """The Ray Tune trainable: one trial of the sweep through `run_trial`."""
    from trainables.trial import RayReporter, run_trial, warm_start_key

    # One line per checkpoint per epoch from every trial buries the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    entry = config[SWEEP_KEY]
    cfg = validate({k: v for k, v in config.items() if k != SWEEP_KEY})
    ws = None
    if entry.get("warm_start"):
        # This trial's own key maps to the warm start its scenario and seed share.
        ws = {warm_start_key(cfg): warm_starts[entry["warm_start"]]}
    reporter = RayReporter()
    if faults:
        reporter = FaultyReporter(reporter, faults, entry["cell"])
    run_trial(cfg, reporter, splits=datasets[entry["data"]].to_splits(), warm_starts=ws)


def trial_name(trial) -> str:
    return trial.trial_id
