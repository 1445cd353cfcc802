"""What the analysis steps pass along (SweepRuns in, Summary out), its errors, and the
vocabulary every step shares: the reported metrics, the reference method, the methods'
order and labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from sweeper.analysis._directions import empty_class_directions, empty_directions
from sweeper.contract import (
    DEFAULT_SELECTION_METRIC,
    PGD_AUTOATTACK_GAP,
    REPORT_METRICS,
)
from trainables.errors import ConfigError

# Test-split metrics reported per scenario x method, in table order.
METRICS = REPORT_METRICS
# Best per column is the largest accuracy but the smallest spread / gap.
LOWER_IS_BETTER = frozenset({"test_class_natural_acc_std", "test_boundary_error",
                             PGD_AUTOATTACK_GAP})

REFERENCE = "trades"

# Paper order of the methods; methods not listed follow alphabetically.
METHOD_ORDER = ("erm", "pgd_at", "trades", "frl", "mwn", "anti_adv", "caat")
METHOD_LABELS = {"erm": "ERM", "pgd_at": "PGD-AT", "trades": "TRADES", "frl": "FRL",
                 "mwn": "MWN", "anti_adv": "Anti-adv", "caat": "CAAT"}


class SweepNotFound(ConfigError):
    """The named sweep (or the tracking store) does not exist: bad input, exit 2."""


class NothingToAnalyse(RuntimeError):
    """The sweep exists but no trial has finished yet: try again later (exit 3)."""


@dataclass
class SweepRuns:
    """Everything analysis needs from the tracking store, as plain data."""

    name: str
    experiment_id: str
    runs: pd.DataFrame  # one row per trial run
    metric: str = DEFAULT_SELECTION_METRIC
    mode: str = "max"
    classwise: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # run_id -> lists
    notes: list[str] = field(default_factory=list)
    directions: pd.DataFrame | None = None  # CAAT's per-epoch direction metrics (tidy)
    # Every objective of the selection, (metric, mode); the primary one is `metric`/`mode`.
    objectives: list[tuple[str, str]] = field(default_factory=list)
    # The RDB URL of the cells' Optuna studies; None for sweeps from before them.
    optuna_storage: str | None = None


@dataclass
class StudyAnalysis:
    """What the cells' Optuna studies add (`sweeper.analysis._optuna`), as plain tables, with
    the studies themselves for Optuna's interactive plots."""

    objectives: list[tuple[str, str]]
    importance: pd.DataFrame  # cell, scenario, method, objective, param, importance
    # One row per config: tuning trials (COMPLETE) and confirmed ones (mean over seeds),
    # with `feasible` and `pareto` (on its cell's front of its source's feasible configs).
    configs: pd.DataFrame
    params: list[str]  # the configs' param columns, in order
    constraints: list[str]  # the constrained metrics (their columns in `configs`)
    studies: dict = field(default_factory=dict)  # cell id -> optuna.Study


@dataclass
class Summary:
    tidy: pd.DataFrame  # one row per scenario x method x metric (raw fractions)
    selected: pd.DataFrame  # the runs that built it
    scenarios: pd.DataFrame  # one row per scenario: its factors
    classwise: pd.DataFrame  # scenario x method x class: mean per-class accuracies
    notes: list[str]
    reference: str = REFERENCE
    # CAAT's direction diagnostics of the selected runs: per-epoch metrics and per-class lists.
    directions: pd.DataFrame = field(default_factory=empty_directions)
    class_directions: pd.DataFrame = field(default_factory=empty_class_directions)
    # The metrics the tables show, in order: METRICS, then AutoAttack's when runs carry them.
    metrics: tuple[str, ...] = METRICS
    # One line per cell whose PGD - AutoAttack gap says gradient masking (`masking_alarms`).
    masking: list[str] = field(default_factory=list)
    # The Optuna studies' importances and config fronts; None when the sweep has no studies.
    optuna: StudyAnalysis | None = None


def method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)
