"""The Ray Tune trainable of a sweep: one trial through `run_trial`, with its shared inputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sweeper.contract import UNRETRYABLE_KEY
from sweeper.search._faults import FailRule, FaultyReporter
from sweeper.search._inputs import SWEEP_KEY, SharedSplits
from trainables.config import recorded_config, validate
from trainables.errors import ConfigError, one_line

logger = logging.getLogger("caat_sweeper.trial")


def sweep_trial(config: dict, *, datasets: Mapping[str, SharedSplits],
                warm_starts: Mapping[str, dict], faults: list[FailRule]) -> None:
    """The Ray Tune trainable: one trial of the sweep through `run_trial`.

    A `ConfigError` (a config the worker cannot load, a plugin that does not import there,
    missing data, a checkpoint of another format) or an ImportError (a package the worker's
    environment lacks) fails the same way on every retry: the trial reports it under
    `UNRETRYABLE_KEY` and ends, once, instead of raising into Ray's retries."""
    from ray import tune

    # One line per checkpoint per epoch from every trial buries the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    entry = config[SWEEP_KEY]
    try:
        run_sweep_trial(config, entry, datasets, warm_starts, faults)
    except (ConfigError, ImportError) as err:
        kind = "" if isinstance(err, ConfigError) else f"{type(err).__name__}: "
        line = kind + one_line(err)
        logger.error("trial of cell %s failed (not retried: it cannot pass): %s",
                     entry.get("cell"), line)
        tune.report({UNRETRYABLE_KEY: line})


def run_sweep_trial(config: dict, entry: Mapping, datasets: Mapping[str, SharedSplits],
                    warm_starts: Mapping[str, dict], faults: list[FailRule]) -> None:
    from trainables.trial import RayReporter, run_trial, warm_start_key

    # recorded_config: a trial restored from a sweep launched before methods owned their
    # knobs may carry other methods' knobs; the driver validated everything else.
    cfg = validate(recorded_config({k: v for k, v in config.items() if k != SWEEP_KEY}))
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
