"""The MLflow contract of a sweep: which store, which experiment, which tags and metrics, and
what a run's state is. Every command and script that reads or writes a sweep's runs takes
these from here, so they cannot drift apart. No Ray and no torch (not even through another
module): `caat-sweep status`, `analyze`, `ui` and users' scripts import it on any machine;
mlflow is imported only where a client is opened.

The schema (`sweeper.tracking` writes it, `sweeper.analysis`, `sweeper.status` and users'
scripts read it):

- Experiment `caat-sweep/<sweep name>` (`experiment_name`). Only the driver writes (a Ray Tune
  `Callback` running in the driver process), never trial workers: SQLite has one writer, and
  the driver sees every trial's results, errors and restarts.
- One parent run: run name = sweep name; tags `sweep`=<name>, `role`=`parent`,
  `metric`=<selection metric (the primary one of several)>, `mode`=`max`|`min`,
  `objectives` (`OBJECTIVES_TAG`: every objective, "metric:mode,..."), `optuna_storage`
  (`OPTUNA_STORAGE_TAG`: the RDB URL of the cells' Optuna studies, one per cell, named by
  the cell id); artifact `space.yaml` (the space file as launched); artifacts
  `analysis/` (`ANALYSIS_ARTIFACTS`): the files `caat-sweep analyze` wrote last
  (`log_analysis`; a re-run replaces files of the same name).
- One child run per Ray trial (tuning and confirmation), nested under the parent
  (`PARENT_TAG`); run name = trial id; tags `sweep`, `role`=`trial`, `trial_id`, the sweep
  entry's `TRIAL_TAGS`: `cell` (`<scenario name>/<method>`, e.g. `pair-0.4_ir-1_eps-0.1/caat`),
  `scenario`, `method`, `seed`, `phase` (`tune` | `confirm`); on confirmation runs
  `tuned_by` (`TUNED_BY_TAG`: the tuning trial whose config they re-run); `outcome`
  (`OUTCOMES`, set when the trial ends) and, for failed trials, `error` (one line);
  `retries` when Ray Tune restarted the trial from its checkpoint after a failure (never
  after an error that cannot pass on retry: a bad config or a plugin that does not import
  in the worker ends the trial at once, reporting `UNRETRYABLE_KEY` with the one line);
  `restore` when a resume found the trial's recorded checkpoint missing or corrupt and
  continued from an intact one or from scratch (`sweeper/restore.py`), with `error` naming
  the corrupt file.
- Params: the flattened resolved trial config (dotted keys such as `scenario.noise_rate`,
  `method.eps`, from `TrialConfig.resolved()` + `trainables.config.flatten`), logged once.
- Metrics: the per-epoch scalars `run_trial` reports (`train_loss`, `train_samples_per_s`,
  `frac_anti` when present, `val_*` / `test_*` as named in DESIGN.md) with step = epoch;
  none of Ray's bookkeeping keys. An epoch is logged once even when a trial re-runs it
  after a restore.
  With `eval.autoattack` (confirmation trials), the last epoch also carries AutoAttack's
  scalars `AUTOATTACK_METRICS` (`test_autoattack_acc`, `test_worst_class_autoattack_acc`,
  `test_pgd_autoattack_gap`). List-valued results are never metrics: the class-wise lists go
  to the artifact below, `test_autoattack_indices` (which test images AutoAttack ran on) stays in
  the trial's checkpoint and metrics.json, and `test_autoattack_flags` (strings) becomes the tag
  `autoattack_flags` (`AUTOATTACK_FLAGS_TAG`, joined by "; ") when there are any.
  With `eval.keep_best` (the default) the last epoch also carries `best_epoch` and, when it
  evaluated the test split, the best checkpoint's `BEST_REPORT_METRICS` (`test_best_*`, the
  weights of the best epoch by `eval.best_metric` on validation), and with
  `eval.autoattack_best` its `BEST_AUTOATTACK_METRICS`.
- Artifact `classwise.json` (`CLASSWISE_KEYS`): the last reported class-wise lists
  {"val_class_natural_acc": [...], "val_class_robust_acc": [...], "val_class_count": [...],
  "test_class_natural_acc": [...], "test_class_robust_acc": [...], "test_class_count":
  [...]} (`*_class_count`: the images per class, the accuracies' denominators), AutoAttack's
  `test_class_autoattack_acc` and `test_class_autoattack_count` when the trial ran it, the
  best checkpoint's twins of the test lists (`test_best_class_*`), and for CAAT the
  training diagnostics by observed class `train_class_frac_anti`, `train_class_mean_eps`
  (last epoch) and their histories `train_class_frac_anti_by_epoch`,
  `train_class_mean_eps_by_epoch` (one list per epoch); then every other class-wise list a
  method reports at its epoch end (e.g. CFA's `cfa_class_eps`, DAFA's
  `train_class_dafa_weight`, FAAL's `train_class_faal_weight`), each with its `_by_epoch`
  history.
- Status FINISHED for completed and pruned trials, FAILED for failed ones. When a sweep
  (or a resume) ends, no run is left RUNNING: unfinished trials (an interrupted driver) are
  marked KILLED until a resume reopens them. A resumed driver finds each trial's run again
  by its `trial_id` tag; runs of trials started after the experiment's last saved state
  (Ray re-runs those under new ids) are deleted, so runs = trials. `run_state` reads a
  run's status and outcome back as one of `RUN_STATES`.
- The tracking URI: `--tracking-uri`, else `$MLFLOW_TRACKING_URI`, else
  `sqlite:///mlflow.db` (`resolve_tracking_uri`, shared by every command).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.errors import ServiceUnavailable, one_line
from trainables.metric_names import (
    AUTOATTACK_CLASSWISE,
    AUTOATTACK_METRICS,
    AUTOATTACK_RECORDS,
    CLASSWISE_DIAGNOSTICS,
    CLASSWISE_METRICS,
    SCALAR_METRICS,
    best_name,
    split_metrics,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

# ------------------------------------------------------------------------------- the store

# A trial's result carrying this key ended on an error that would fail the same way on
# every retry (a config or plugin error in the worker): it is failed at once, not retried.
UNRETRYABLE_KEY = "unretryable_error"

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
SQLITE = "sqlite:///"


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri` (the --tracking-uri flag), else $MLFLOW_TRACKING_URI, else ./mlflow.db.

    `sqlite:///relative.db` becomes absolute, so resume and status work from any directory,
    and a bare path to an existing file (what people type) a SQLite URI."""
    uri = uri or os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str(Path(uri[len(SQLITE):]).expanduser().resolve())
    if "://" not in uri and Path(uri).expanduser().is_file():
        return SQLITE + str(Path(uri).expanduser().resolve())
    return uri


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a SQLite store; None for any other store."""
    return Path(tracking_uri[len(SQLITE):]) if tracking_uri.startswith(SQLITE) else None


def artifact_location(tracking_uri: str, sweep: str) -> str | None:
    """Where a new sweep experiment keeps its runs' artifacts: beside a SQLite store, in
    `<store>-artifacts/<sweep>/` (`mlflow.db` -> `mlflow-artifacts/`). MLflow's own default
    there is `./mlruns` of whatever directory the driver started in, so the same sweep's
    artifacts would scatter with the shell's cwd. None for a tracking server: it decides
    (its --artifacts-destination or --default-artifact-root)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / f"{db.stem}-artifacts" / sweep).as_uri()


def store_exists(tracking_uri: str) -> bool:
    """False for a SQLite file not created yet (opening it would create it)."""
    path = sqlite_path(tracking_uri)
    return path is None or path.is_file()


def check_reachable(tracking_uri: str) -> None:
    """Ask a tracking server once, briefly (MLflow's client retries a dead one for minutes).
    ServiceUnavailable, one line, when it does not answer; nothing to ask of a local store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=10) as resp:
            resp.read()
    except Exception as err:
        reason = one_line(err, 200)
        raise ServiceUnavailable(f"--tracking-uri: cannot reach {tracking_uri} ({reason})"
                                 ) from None


def open_client(tracking_uri: str) -> MlflowClient:
    """An MlflowClient whose store is ready. Two processes that open a fresh SQLite file at
    once both create MLflow's tables and break it for good (alembic's temporary tables
    collide): the first creates them while holding a lock on the file's directory, the
    others wait, then find them made."""
    from mlflow import MlflowClient

    path = sqlite_path(tracking_uri)
    if path is None:
        return MlflowClient(tracking_uri=tracking_uri)
    import fcntl

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)  # the store is open: its tables exist
    finally:
        os.close(fd)  # releases the lock
    return client


# --------------------------------------------------------------------- experiments and runs

EXPERIMENT_PREFIX = "caat-sweep/"
PARENT_TAG = "mlflow.parentRunId"
# A trial run's tags taken from its sweep entry (besides `sweep`, `role` and `trial_id`).
TRIAL_TAGS = ("cell", "scenario", "method", "seed", "phase")
# On confirmation runs: the Ray trial id of the tuning trial whose config they re-run (a
# multi-objective cell confirms several configs; this tells their runs apart).
TUNED_BY_TAG = "tuned_by"
# On the parent run: every objective as "metric:mode,metric:mode" (the `metric`/`mode`
# tags hold the primary one), and the RDB URL of the cells' Optuna studies.
OBJECTIVES_TAG = "objectives"
OPTUNA_STORAGE_TAG = "optuna_storage"


# What the cells' Optuna studies carry (`sweeper.search._study` writes them, the analysis
# reads them; here so that reading them needs no Ray). On each study trial: the Ray trial id
# it belongs to, {metric: value} of the result it was told with, and each constraint's
# violation (<= 0: feasible; also Optuna's own record, `Trial.set_constraint`). On each
# study: the constraints, {metric: {min: .., max: ..}}.
RAY_TRIAL_ATTR = "ray_trial_id"
VALUES_ATTR = "objective_values"
CONSTRAINTS_ATTR = "constraint_violations"
STUDY_CONSTRAINTS_ATTR = "constraints"


def format_objectives(objectives: list[tuple[str, str]]) -> str:
    return ",".join(f"{metric}:{mode}" for metric, mode in objectives)


def parse_objectives(tag: str) -> list[tuple[str, str]]:
    """(metric, mode) pairs of an OBJECTIVES_TAG value (pure)."""
    pairs = [item.split(":") for item in tag.split(",") if item]
    return [(metric, mode) for metric, mode in pairs]
PARENT_FILTER = "tags.role = 'parent'"
TRIAL_FILTER = "tags.role = 'trial'"


def experiment_name(sweep: str) -> str:
    return EXPERIMENT_PREFIX + sweep


def parent_run_id(client: Any, sweep: str) -> str | None:
    """The id of the sweep's parent run; None while its experiment or parent run does not
    exist."""
    exp = client.get_experiment_by_name(experiment_name(sweep))
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], PARENT_FILTER, max_results=1)
    return runs[0].info.run_id if runs else None


# The parent run's artifact folder for the analysis' outputs.
ANALYSIS_ARTIFACTS = "analysis"


def log_analysis(tracking_uri: str, sweep: str, files: Iterable[Path]) -> str | None:
    """Upload `files` as the artifacts `analysis/<file name>` of the sweep's parent run, so
    the MLflow UI shows the analysis next to the trials; a file of the same name replaces
    the one logged before. Returns the parent run's id; None when the sweep has no parent
    run. Errors are whatever the tracking server or artifact store raises
    (ServiceUnavailable, quickly, for a server that does not answer).

    The files written, not the whole output directory: it may hold other files (an earlier
    analysis' plot of a scenario since dropped, or anything in a shared --out)."""
    check_reachable(tracking_uri)
    client = open_client(tracking_uri)
    run_id = parent_run_id(client, sweep)
    if run_id is None:
        return None
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=ANALYSIS_ARTIFACTS)
    return run_id


def search_all_runs(client: Any, experiment_id: str, filter_string: str = "", *,
                    include_deleted: bool = False) -> list[Any]:
    """Every run of an experiment that matches `filter_string`, page by page."""
    from mlflow.entities import ViewType

    view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, run_view_type=view,
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def trial_runs(tracking_uri: str, sweep: str) -> list[Any]:
    """A sweep's trial runs; none while its store or experiment does not exist (reading
    never creates either)."""
    if not store_exists(tracking_uri):
        return []
    client = open_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name(sweep))
    return [] if exp is None else search_all_runs(client, exp.experiment_id, TRIAL_FILTER)


# ------------------------------------------------------------------------------ run states

# The `outcome` tag the driver sets when a trial ends.
OUTCOMES = ("completed", "pruned", "failed")
# What `run_state` calls a trial run, in the order tables list them.
RUN_STATES = (*OUTCOMES, "running", "interrupted")
# A run's MLflow status when it has no outcome tag (an unknown tag counts as none).
_STATE_WITHOUT_OUTCOME = {"RUNNING": "running", "SCHEDULED": "running", "FAILED": "failed",
                          "KILLED": "interrupted", "FINISHED": "interrupted"}


def run_state(status: str | None, outcome: Any) -> str:
    """One of RUN_STATES, from a trial run's MLflow status and its `outcome` tag.

    The outcome tag wins: the driver sets it only once the trial has ended, before the end
    status (one queued write, replayed whole), and an epoch a resumed trial re-runs is never
    logged again, so a RUNNING run that already has one carries its final result. Without
    one: RUNNING is running; KILLED is a trial an interrupted driver left behind (a resume
    reopens it), FINISHED an ending nobody recorded: both interrupted. FAILED without an
    outcome is nothing the driver writes (it tags first); another writer said it failed, and
    no resume reopens a run for its MLflow status: failed."""
    if outcome in OUTCOMES:
        return outcome
    return _STATE_WITHOUT_OUTCOME.get(status or "", "running")


# --------------------------------------------------------------------------------- metrics

DEFAULT_SELECTION_METRIC = "val_robust_acc"
# The metrics a sweep may select on: the validation split's scalars (test is for reporting),
# each robust one before its natural one (the default first: errors list them in this order).
SELECTION_METRICS = split_metrics("val", tuple(sorted(
    SCALAR_METRICS, key=lambda m: (SCALAR_METRICS.index(m.replace("robust", "natural")),
                                   "robust" not in m))))
# The test-split scalars the analysis reports per scenario x method, in table order.
REPORT_METRICS = split_metrics("test")
# AutoAttack's scalars (`eval.autoattack`, logged at a trial's last epoch), reported after
# REPORT_METRICS by runs that carry them. The gap is PGD's robust accuracy minus AutoAttack's
# on the same test images: large means gradient masking (`sweeper.analysis` warns).
AUTOATTACK_ACC, _, PGD_AUTOATTACK_GAP = AUTOATTACK_METRICS
# The best checkpoint's twins of the test scalars (`eval.keep_best`), logged at the last step
# beside `best_epoch`, and AutoAttack's (`eval.autoattack_best`).
BEST_REPORT_METRICS = tuple(best_name(m) for m in REPORT_METRICS)
BEST_AUTOATTACK_METRICS = tuple(best_name(m) for m in AUTOATTACK_METRICS)
# The lists in a trial run's classwise.json artifact.
_LAST_CLASSWISE = (*split_metrics("test", CLASSWISE_METRICS), *AUTOATTACK_CLASSWISE)
CLASSWISE_KEYS = (*split_metrics("val", CLASSWISE_METRICS), *_LAST_CLASSWISE,
                  *(best_name(m) for m in _LAST_CLASSWISE), *CLASSWISE_DIAGNOSTICS,
                  *(f"{k}_by_epoch" for k in CLASSWISE_DIAGNOSTICS))
# A run's tag listing AutoAttack's flags (the list a trial reports as `test_autoattack_flags`),
# when it has any.
AUTOATTACK_FLAGS_KEY, _ = AUTOATTACK_RECORDS
AUTOATTACK_FLAGS_TAG = "autoattack_flags"
