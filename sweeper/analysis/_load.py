"""MLflow -> plain data: a sweep's runs as one table (tags, final metrics, scenario params)
and the selected runs' classwise.json. Final metric values are the values at the last step
(MLflow's latest value), i.e. the last evaluated epoch."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from sweeper.analysis._model import SweepNotFound, SweepRuns
from sweeper.contract import (
    DEFAULT_SELECTION_METRIC,
    EXPERIMENT_PREFIX,
    OBJECTIVES_TAG,
    OPTUNA_STORAGE_TAG,
    TUNED_BY_TAG,
    check_reachable,
    experiment_name,
    open_client,
    parse_objectives,
    resolve_tracking_uri,
    search_all_runs,
    sqlite_path,
)

# Scenario params read from each run (flattened config keys) -> runs-table column.
SCENARIO_PARAMS = {"scenario.noise_type": "noise_type", "scenario.noise_rate": "noise_rate",
                   "scenario.imbalance_ratio": "imbalance_ratio", "dataset.name": "dataset",
                   "method.eps": "eps", "eval.steps": "eval_steps", "eval.eps": "eval_eps"}
# Config params the reviewer's checklist reads (`sweeper.analysis._checklist`): AutoAttack's
# version, the training budget, a warm start, and how the best checkpoint was chosen. Runs of
# older sweeps lack some: their columns are empty and the checklist says "unknown".
CONFIG_PARAMS = {"eval.autoattack": "eval_autoattack", "init.erm_epochs": "init_erm_epochs",
                 "optim.epochs": "optim_epochs", "init.checkpoint": "init_checkpoint",
                 "eval.keep_best": "eval_keep_best", "eval.best_metric": "eval_best_metric"}


def _check_store(uri: str) -> None:
    # MLflow would silently create an empty database at a mistyped path.
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise SweepNotFound(f"--tracking-uri: no MLflow store at {path} (run `caat-sweep "
                            "launch` first, or point --tracking-uri at the sweep's store)")
    check_reachable(uri)


def load_sweep(name: str, tracking_uri: str | None = None) -> SweepRuns:
    """Read a sweep's trial runs (tags, final metrics, scenario params) and its parent's tags."""
    import logging

    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    _check_store(uri)
    # MLflow logs schema checks at INFO on every open; the analysis output should stay readable.
    for logger in ("mlflow", "alembic"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    client = open_client(uri)
    try:
        exp = client.get_experiment_by_name(experiment_name(name))
        if exp is None:
            known = sorted(e.name.removeprefix(EXPERIMENT_PREFIX)
                           for e in client.search_experiments()
                           if e.name.startswith(EXPERIMENT_PREFIX))
            listing = ", ".join(known) if known else "none"
            raise SweepNotFound(f"sweep {name!r}: not in {uri}; sweeps there: {listing}")
        infos = search_all_runs(client, exp.experiment_id)
    except MlflowException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepNotFound(f"--tracking-uri {uri}: cannot read the store ({first})") from None

    parents = [r for r in infos if r.data.tags.get("role") == "parent"]
    trials = [r for r in infos if r.data.tags.get("role") != "parent"]
    sweep = SweepRuns(name=name, experiment_id=exp.experiment_id, runs=runs_frame(trials))
    if parents:
        tags = parents[0].data.tags
        sweep.metric = tags.get("metric", DEFAULT_SELECTION_METRIC)
        sweep.mode = tags.get("mode", "max")
        sweep.optuna_storage = tags.get(OPTUNA_STORAGE_TAG) or None
        if tags.get(OBJECTIVES_TAG):
            sweep.objectives = _objectives(name, tags[OBJECTIVES_TAG])
    else:
        sweep.notes.append(f"no parent run found: selecting by {sweep.metric} ({sweep.mode})")
    if sweep.mode not in ("max", "min"):
        raise SweepNotFound(f"sweep {name!r}: parent tag mode={sweep.mode!r}; allowed: max, min")
    # Sweeps from before several objectives select on one: that is their only objective.
    sweep.objectives = sweep.objectives or [(sweep.metric, sweep.mode)]
    return sweep


def _objectives(name: str, tag: str) -> list[tuple[str, str]]:
    try:
        objectives = parse_objectives(tag)
    except ValueError:
        objectives = []
    if not objectives or any(mode not in ("max", "min") for _, mode in objectives):
        raise SweepNotFound(f"sweep {name!r}: parent tag {OBJECTIVES_TAG}={tag!r}; expected "
                            "metric:mode pairs joined by commas, mode max or min")
    return objectives


def runs_frame(runs: Iterable[Any]) -> pd.DataFrame:
    """MLflow Run objects -> one row per run: identity tags, status, final metrics, factors."""
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "trial_id": tags.get("trial_id", run.info.run_name),
            "cell": tags.get("cell"),
            "scenario": tags.get("scenario"),
            "method": tags.get("method"),
            "seed": tags.get("seed"),
            "phase": tags.get("phase", "tune"),
            "outcome": tags.get("outcome"),
            "error": tags.get("error"),
            "tuned_by": tags.get(TUNED_BY_TAG),
        }
        for param, column in {**SCENARIO_PARAMS, **CONFIG_PARAMS}.items():
            row[column] = run.data.params.get(param)
        # run.data.metrics holds each metric's latest value: the last step's.
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else ["run_id", "run_name", "status",
                                                          "trial_id", "cell", "scenario",
                                                          "method", "seed", "phase", "outcome",
                                                          "error", "tuned_by",
                                                          *SCENARIO_PARAMS.values(),
                                                          *CONFIG_PARAMS.values()])
    return normalise_runs(frame)


def normalise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Fill scenario/method from the cell tag when absent and make factors numeric."""
    runs = runs.copy()
    for column in ("scenario", "method", "cell", "outcome", "error", "phase", "status",
                   "tuned_by"):
        if column not in runs:
            runs[column] = None
    if len(runs):
        split = runs["cell"].fillna("").astype(str).str.partition("/")
        runs["scenario"] = runs["scenario"].where(runs["scenario"].notna(),
                                                  split[0].replace("", None))
        runs["method"] = runs["method"].where(runs["method"].notna(), split[2].replace("", None))
        runs["cell"] = runs["cell"].where(runs["cell"].notna(),
                                          runs["scenario"].astype(str) + "/" + runs["method"])
    runs["phase"] = runs["phase"].fillna("tune")
    for column in ("seed", "noise_rate", "imbalance_ratio", "eps", "eval_steps", "eval_eps",
                   "init_erm_epochs", "optim_epochs"):
        if column in runs:
            runs[column] = pd.to_numeric(runs[column], errors="coerce")
    return runs


def load_classwise(uri: str, run_ids: Iterable[str]) -> dict[str, dict[str, list[float]]]:
    """classwise.json of each run (missing artifacts are skipped: the bars just leave a gap)."""
    client = open_client(resolve_tracking_uri(uri))
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
        for run_id in run_ids:
            try:
                path = client.download_artifacts(run_id, "classwise.json", tmp)
                out[run_id] = json.loads(Path(path).read_text())
            except Exception:  # a missing artifact must not stop the analysis
                continue
    return out


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # MLflow draws a progress bar per artifact download, which would bury the notes.
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
