"""What the analysis steps pass along (SweepRuns in, Summary out), its errors, and the
vocabulary every step shares: the reported metrics, the reference method, the methods'
order and labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from sweeper.analysis._directions import empty_class_directions, empty_directions
from sweeper.contract import (
    AUTOATTACK_METRICS,
    DEFAULT_SELECTION_METRIC,
    PGD_AUTOATTACK_GAP,
    REPORT_METRICS,
)
from trainables.errors import ConfigError

# Test-split metrics reported per scenario x method, in table order.
METRICS = REPORT_METRICS

# Best and last checkpoints: beside each last-epoch `test_<m>`, trials that keep the weights of
# their best epoch by a validation metric report the same metric of those weights as
# `test_best_<m>`, and `best_epoch`. The names are derived here rather than read from the
# contract, so that runs from before them (and a contract without them) still analyse.
LAST_PREFIX, BEST_PREFIX = "test_", "test_best_"
BEST_EPOCH = "best_epoch"
# Per run: test_best_robust_acc - test_robust_acc, what robust overfitting cost the last epoch.
ROBUST_OVERFIT_GAP = "robust_overfit_gap"


def best_name(metric: str) -> str:
    """"test_robust_acc" -> "test_best_robust_acc"."""
    if not metric.startswith(LAST_PREFIX) or metric.startswith(BEST_PREFIX):
        raise ValueError(f"{metric!r}: only a last-epoch test metric has a best twin")
    return BEST_PREFIX + metric.removeprefix(LAST_PREFIX)


def last_name(metric: str) -> str:
    """"test_best_robust_acc" -> "test_robust_acc"; a last-epoch name stays as it is."""
    return (LAST_PREFIX + metric.removeprefix(BEST_PREFIX) if metric.startswith(BEST_PREFIX)
            else metric)


BEST_METRICS = tuple(best_name(m) for m in (*METRICS, *AUTOATTACK_METRICS))
# The metrics of the best-checkpoint block that are not a twin: no paired test, no Holm.
BEST_ONLY = (ROBUST_OVERFIT_GAP, BEST_EPOCH)


def checkpoint_of(metric: str) -> str:
    """Which weights a table metric measures: "best" (the best epoch by validation) or "last"."""
    return "best" if metric.startswith(BEST_PREFIX) or metric in BEST_ONLY else "last"


def is_autoattack(metric: str) -> bool:
    return last_name(metric) in AUTOATTACK_METRICS


# Best per column is the largest accuracy but the smallest spread / gap; the best epoch is
# no quality and gets no mark.
_LOWER = ("test_class_natural_acc_std", "test_boundary_error", PGD_AUTOATTACK_GAP)
LOWER_IS_BETTER = frozenset({*_LOWER, *map(best_name, _LOWER), ROBUST_OVERFIT_GAP})
UNRANKED = frozenset({BEST_EPOCH})

# The masking alarm: a cell whose PGD robust accuracy exceeds its AutoAttack accuracy on the
# same test images by more than this (a fraction, mean over seeds). AutoAttack is the
# stronger attack, so a point or so below PGD is expected of any model; several points mean
# PGD's gradients mislead it (gradient masking), and its number overstates robustness.
MASKING_GAP = 0.03
MASKING_TITLE = "possible gradient masking"
MASKING_TEXT = (f"In these cells PGD's robust accuracy exceeds AutoAttack's on the same test "
                f"images by more than {100 * MASKING_GAP:g} points (mean over seeds). "
                "AutoAttack's authors (Croce and Hein, ICML 2020) describe such a gap as the "
                "sign of gradient masking: PGD overstates the robustness of these models. "
                "Read their robustness from the AutoAttack columns.")

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
class CheckItem:
    """One line of the reviewer's checklist: what is checked, whether the sweep meets it
    ("met", "not met", or "unknown" when its runs cannot tell) and the figure behind that."""

    name: str
    status: str
    figure: str

    def line(self) -> str:
        return f"[{self.status}] {self.name}: {self.figure}"


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
    # The best-checkpoint block's metrics (`test_best_*` twins, ROBUST_OVERFIT_GAP,
    # BEST_EPOCH), those some selected run carries; empty for runs without a best checkpoint.
    best_metrics: tuple[str, ...] = ()
    # Per selected run, class and kind: accuracy, images and Wilson interval (classwise_runs).
    run_classwise: pd.DataFrame = field(default_factory=pd.DataFrame)
    # The reviewer's checklist (`sweeper.analysis._checklist`), in its order.
    checklist: list[CheckItem] = field(default_factory=list)
    # One line per cell whose PGD - AutoAttack gap says gradient masking (`masking_alarms`).
    masking: list[str] = field(default_factory=list)
    # The Optuna studies' importances and config fronts; None when the sweep has no studies.
    optuna: StudyAnalysis | None = None


def method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)
