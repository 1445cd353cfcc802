"""The MLflow contract (`sweeper.contract`): imported without Ray or torch, the tracking URI's
resolution order and path forms, the run-state table, the metric names derived from
`trainables.metric_names`, and a health check that says ServiceUnavailable."""

from __future__ import annotations

import json

import pytest
from sweep_support import free_port, run_python

from sweeper import contract
from sweeper.contract import resolve_tracking_uri, run_state
from trainables.errors import ConfigError, ServiceUnavailable


def heavy_imports(module: str) -> list[str]:
    """Which of ray and torch a fresh interpreter has loaded after importing `module`."""
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'})))")
    return json.loads(run_python(code).stdout.splitlines()[-1])


def test_the_contract_imports_neither_ray_nor_torch():
    assert heavy_imports("sweeper.contract") == []


def test_the_analysis_imports_neither_ray_nor_torch():
    assert heavy_imports("sweeper.analysis") == []


def test_caat_sweep_status_imports_neither_ray_nor_torch():
    assert heavy_imports("sweeper.status") == []


# ----------------------------------------------------------------------- tracking URI


def test_tracking_uri_is_the_flag_then_the_environment_then_the_default(tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(contract.TRACKING_URI_ENV, raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(contract.TRACKING_URI_ENV, "http://127.0.0.1:5001")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5001"
    assert resolve_tracking_uri("http://127.0.0.1:5002") == "http://127.0.0.1:5002"


def test_tracking_uri_path_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A relative SQLite URI becomes absolute (resume and status run from anywhere) ...
    assert resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path / 'rel/x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    # ... and a bare path to an existing file (what people type) a SQLite URI.
    (tmp_path / "bare.db").touch()
    assert resolve_tracking_uri("bare.db") == f"sqlite:///{tmp_path / 'bare.db'}"
    assert resolve_tracking_uri(str(tmp_path / "bare.db")) == f"sqlite:///{tmp_path / 'bare.db'}"
    # A bare path to nothing is left for MLflow to judge (it may be a file store).
    assert resolve_tracking_uri("missing.db") == "missing.db"


def test_a_dead_tracking_server_is_a_service_unavailable_not_a_config_error():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable, match=f"--tracking-uri: cannot reach {uri} ") as err:
        contract.check_reachable(uri)
    assert not isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    contract.check_reachable("sqlite:////nowhere/mlflow.db")  # nothing to ask of a local store


def test_reading_a_missing_store_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert contract.trial_runs(uri, "s") == [] and not (tmp_path / "none.db").exists()


# ------------------------------------------------------------------------- run states


@pytest.mark.parametrize("status, outcome, state", [
    ("FINISHED", "completed", "completed"),
    ("FINISHED", "pruned", "pruned"),
    ("FAILED", "failed", "failed"),
    # The outcome is set only once a trial has ended: a RUNNING run (its end status still
    # queued, or a trial resumed after the driver lost its end) already has its result.
    ("RUNNING", "completed", "completed"),
    ("KILLED", "pruned", "pruned"),
    ("RUNNING", None, "running"),
    ("SCHEDULED", None, "running"),
    ("KILLED", None, "interrupted"),
    ("FINISHED", None, "interrupted"),
    # Not written by the driver (it tags the outcome first): another writer said it failed.
    ("FAILED", None, "failed"),
    ("FAILED", "bogus", "failed"),
    ("KILLED", float("nan"), "interrupted"),
    (None, None, "running"),
])
def test_run_state_table(status, outcome, state):
    assert run_state(status, outcome) == state
    assert state in contract.RUN_STATES


def test_status_columns_are_the_run_states():
    from sweeper.status import COUNTS

    assert sorted(COUNTS) == sorted(contract.RUN_STATES)


# ---------------------------------------------------------------------------- names


def test_metric_names_derive_from_trainables_metric_names():
    assert contract.SELECTION_METRICS == (
        "val_robust_acc", "val_natural_acc", "val_worst_class_robust_acc",
        "val_worst_class_natural_acc", "val_class_natural_acc_std", "val_boundary_error")
    assert contract.SELECTION_METRICS[0] == contract.DEFAULT_SELECTION_METRIC
    assert contract.REPORT_METRICS == (
        "test_natural_acc", "test_robust_acc", "test_worst_class_natural_acc",
        "test_worst_class_robust_acc", "test_class_natural_acc_std", "test_boundary_error")
    assert contract.CLASSWISE_KEYS == (
        "val_class_natural_acc", "val_class_robust_acc", "val_class_count",
        "test_class_natural_acc", "test_class_robust_acc", "test_class_count",
        "test_class_autoattack_acc", "test_class_autoattack_count",
        "test_best_class_natural_acc", "test_best_class_robust_acc", "test_best_class_count",
        "test_best_class_autoattack_acc", "test_best_class_autoattack_count",
        "train_class_frac_anti",
        "train_class_mean_eps", "train_class_frac_anti_by_epoch",
        "train_class_mean_eps_by_epoch")
    assert contract.AUTOATTACK_METRICS == (
        "test_autoattack_acc", "test_worst_class_autoattack_acc", "test_pgd_autoattack_gap")
    assert (contract.AUTOATTACK_ACC, contract.PGD_AUTOATTACK_GAP) == (
        "test_autoattack_acc", "test_pgd_autoattack_gap")
    assert contract.BEST_REPORT_METRICS == (
        "test_best_natural_acc", "test_best_robust_acc", "test_best_worst_class_natural_acc",
        "test_best_worst_class_robust_acc", "test_best_class_natural_acc_std",
        "test_best_boundary_error")
    assert contract.BEST_AUTOATTACK_METRICS == (
        "test_best_autoattack_acc", "test_best_worst_class_autoattack_acc",
        "test_best_pgd_autoattack_gap")


def test_experiment_name():
    assert contract.experiment_name("quick") == "caat-sweep/quick"
