"""Trade-off analysis of a sweep: MLflow runs -> tidy tables, paired tests, Pareto fronts, plots.

Data flow, each step a small function on a plain DataFrame so that it can be tested on its own:

    load_sweep (MLflow)  ->  runs: one row per trial run (tags, final metrics, scenario params)
    select_runs          ->  the runs that count: a cell's finished confirmation runs (of a
                             cell that confirmed several configs, those of the config with the
                             best mean selection metric: best_confirmed), else its single best
                             finished tuning run by the sweep's selection metric
    load_classwise       ->  each selected run's classwise.json (per-class lists)
    load_directions      ->  the selected CAAT runs' per-epoch direction metrics (frac_anti,
                             frac_anti_noisy / _clean, anti_noisy_auc), tidy; with
                             class_direction_table (classwise.json's per-class anti share and
                             bound, by epoch) the input of the caat_directions plots
    aggregate            ->  mean / std / n and the 95% t-interval of the mean over seeds per
                             scenario x method x metric (the test metrics, then AutoAttack's
                             when selected runs carry them, then the best checkpoint's
                             `test_best_*`, the robust-overfitting gap and `best_epoch` when
                             runs report a best checkpoint)
    cell_wilson          ->  for accuracies on counted images, one run's Wilson 95% binomial
                             interval at the cell's mean (classwise.json's image counts)
    paired_tests         ->  each method minus the reference (TRADES), paired by seed: the
                             difference's t-interval, p, Holm's p per table (scenario x
                             checkpoint) and the smallest difference the test could detect
    pareto_front         ->  methods whose (natural, robust) no other method dominates
    summarize            ->  the tidy summary (one row per scenario x method x metric) + notes
                             + the masking alarm: cells whose mean PGD - AutoAttack gap
                             exceeds MASKING_GAP (end of summary.md / .html, and stderr)
                             + the reviewer's checklist (`_checklist`: top of summary.md /
                             .html, printed by `caat-sweep analyze`)
    write_outputs        ->  summary.csv / .md / .tex / .html, classwise.csv (per cell, with
                             both intervals), classwise_runs.csv (per run, Wilson intervals),
                             selected_runs.csv,
                             and the PNG plots: tradeoff.png, classwise_<scenario>.png,
                             vs_<factor>.png, caat_directions_<scenario>.png (CAAT's anti share
                             over the epochs, noisy vs clean labels, its noisy-label AUC and,
                             under imbalance, the per-class share and bound; only for
                             scenarios whose CAAT runs logged them)

When the parent run names the cells' Optuna studies (`optuna_storage` tag; sweeps from before
them write nothing more, and a storage that cannot be read is a note):

    analyse_studies      ->  per cell and objective, hyperparameter importances (Optuna's
                             PED-ANOVA, summing to 1), and every config: the study's completed
                             tuning trials and the confirmed configs (confirmation runs grouped
                             by `tuned_by`, means over seeds), feasible or not, on its front
    write_outputs        ->  also importance.csv / .png; pareto_configs.csv (the non-dominated
                             feasible configs per cell, tuning and confirmed fronts apart; for
                             one objective the best config) and pareto_configs.png (two or three
                             objectives); infeasible_configs.csv (sweeps with constraints: every
                             config that breaks one, and which); and per cell Optuna's plotly
                             views in optuna/ (parallel coordinates, contours of the two most
                             important params per objective, the Pareto front), offline with one
                             shared optuna/plotly.min.js and linked from summary.html

Only finished runs count: pruned and failed trials never enter a table. Final metric values are
the values at the last step (MLflow's latest value), i.e. the last evaluated epoch.

This module is the public front; the steps live in private siblings, each importing only
those below it: `_intervals` (the interval maths: t, Wilson, Holm, power), `_directions`
(CAAT direction tables), `_model` (SweepRuns, Summary, shared names), `_load` (MLflow),
`_stats` (pure pandas), `_classwise` (per-class intervals), `_checklist`, `_summary`,
`_blocks` (format-neutral tables), `_render` (md / tex), `_html`, `_plots`,
`_direction_plots`, `_configs` (config fronts), `_optuna` (the studies), `_optuna_plots`,
`_analyze` (the driver). What runs and studies carry is `sweeper.contract`.
"""

from sweeper.analysis._analyze import analyze, write_outputs, write_plots, write_study_tables
from sweeper.analysis._checklist import (
    CHECKLIST_TITLE,
    DETECTABLE_TARGET,
    MIN_SEEDS,
    build_checklist,
)
from sweeper.analysis._classwise import (
    CLASSWISE_KINDS,
    cell_wilson,
    classwise_table,
    run_classwise_table,
)
from sweeper.analysis._configs import (
    CONFIG_KEYS,
    configs_frame,
    configs_table,
    mark_fronts,
    violation,
)
from sweeper.analysis._direction_plots import plot_caat_directions
from sweeper.analysis._directions import (
    CLASS_DIRECTION_COLUMNS,
    CLASS_DIRECTION_KEYS,
    DIRECTION_COLUMNS,
    DIRECTION_METHOD,
    DIRECTION_METRICS,
    class_direction_table,
    class_means_at_last,
    class_means_by_epoch,
    direction_frame,
    direction_means,
    direction_tables,
    empty_class_directions,
    empty_directions,
    load_directions,
)
from sweeper.analysis._html import to_html
from sweeper.analysis._intervals import (
    detectable_effect,
    holm,
    min_detectable_difference,
    t_interval,
    wilson_interval,
)
from sweeper.analysis._load import (
    CONFIG_PARAMS,
    SCENARIO_PARAMS,
    load_classwise,
    load_sweep,
    normalise_runs,
    runs_frame,
)
from sweeper.analysis._model import (
    BEST_EPOCH,
    BEST_METRICS,
    LOWER_IS_BETTER,
    MASKING_GAP,
    MASKING_TEXT,
    MASKING_TITLE,
    METHOD_LABELS,
    METHOD_ORDER,
    METRICS,
    REFERENCE,
    ROBUST_OVERFIT_GAP,
    CheckItem,
    NothingToAnalyse,
    StudyAnalysis,
    Summary,
    SweepNotFound,
    SweepRuns,
    best_name,
    method_key,
    method_label,
)
from sweeper.analysis._optuna import (
    IMPORTANCE_COLUMNS,
    StudiesUnavailable,
    analyse_studies,
    cell_importances,
    importance_table,
    open_studies,
)
from sweeper.analysis._optuna_plots import (
    VIEWS_DIR,
    plot_importance,
    plot_pareto_configs,
    write_views,
)
from sweeper.analysis._plots import (
    CIFAR10_CLASSES,
    FACTORS,
    FASHION_MNIST_CLASSES,
    class_names,
    factor_series,
    plot_classwise,
    plot_tradeoff,
    plot_vs_factor,
    safe_name,
    save_scenario_figure,
    varied_factors,
)
from sweeper.analysis._render import METRIC_LABELS, NA, tex_escape, to_latex, to_markdown
from sweeper.analysis._stats import (
    aggregate,
    best_confirmed,
    best_flags,
    best_metrics,
    coverage,
    holm_tables,
    n_confirmed_configs,
    paired_test,
    paired_tests,
    pareto_by_scenario,
    pareto_front,
    reported_metrics,
    select_runs,
)
from sweeper.analysis._summary import (
    TIDY_COLUMNS,
    coverage_notes,
    describe_scenario,
    masking_alarms,
    nothing_message,
    scenario_table,
    several_configs_notes,
    summarize,
)
from sweeper.contract import AUTOATTACK_METRICS, DEFAULT_SELECTION_METRIC

__all__ = [
    "AUTOATTACK_METRICS", "BEST_EPOCH", "BEST_METRICS", "CHECKLIST_TITLE", "CIFAR10_CLASSES",
    "CLASSWISE_KINDS", "CLASS_DIRECTION_COLUMNS", "CLASS_DIRECTION_KEYS", "CONFIG_KEYS",
    "CONFIG_PARAMS", "CheckItem", "DEFAULT_SELECTION_METRIC", "DETECTABLE_TARGET",
    "DIRECTION_COLUMNS", "DIRECTION_METHOD", "DIRECTION_METRICS", "FACTORS",
    "FASHION_MNIST_CLASSES", "IMPORTANCE_COLUMNS", "LOWER_IS_BETTER", "MASKING_GAP",
    "MASKING_TEXT", "MASKING_TITLE", "METHOD_LABELS", "METHOD_ORDER", "METRICS",
    "METRIC_LABELS", "MIN_SEEDS", "NA", "NothingToAnalyse", "REFERENCE", "ROBUST_OVERFIT_GAP",
    "SCENARIO_PARAMS", "StudiesUnavailable", "StudyAnalysis", "Summary", "SweepNotFound",
    "SweepRuns", "TIDY_COLUMNS", "VIEWS_DIR", "aggregate", "analyse_studies", "analyze",
    "best_confirmed", "best_flags", "best_metrics", "best_name", "build_checklist",
    "cell_importances", "cell_wilson", "class_direction_table", "class_means_at_last",
    "class_means_by_epoch", "class_names", "classwise_table", "configs_frame", "configs_table",
    "coverage", "coverage_notes", "describe_scenario", "detectable_effect", "direction_frame",
    "direction_means", "direction_tables", "empty_class_directions", "empty_directions",
    "factor_series", "holm", "holm_tables", "importance_table", "load_classwise",
    "load_directions", "load_sweep", "mark_fronts", "masking_alarms", "method_key",
    "method_label", "min_detectable_difference", "n_confirmed_configs", "normalise_runs",
    "nothing_message", "open_studies", "paired_test", "paired_tests", "pareto_by_scenario",
    "pareto_front", "plot_caat_directions", "plot_classwise", "plot_importance",
    "plot_pareto_configs", "plot_tradeoff", "plot_vs_factor", "reported_metrics",
    "run_classwise_table", "runs_frame", "safe_name", "save_scenario_figure", "scenario_table",
    "select_runs", "several_configs_notes", "summarize", "t_interval", "tex_escape", "to_html",
    "to_latex", "to_markdown", "varied_factors", "violation", "wilson_interval",
    "write_outputs", "write_plots", "write_study_tables", "write_views",
]
