"""Trade-off analysis of a sweep: MLflow runs -> tidy tables, paired tests, Pareto fronts, plots.

Data flow, each step a small function on a plain DataFrame so that it can be tested on its own:

    load_sweep (MLflow)  ->  runs: one row per trial run (tags, final metrics, scenario params)
    select_runs          ->  the runs that count: a cell's finished confirmation runs, else its
                             single best finished tuning run by the sweep's selection metric
    load_classwise       ->  each selected run's classwise.json (per-class lists)
    load_directions      ->  the selected CAAT runs' per-epoch direction metrics (frac_anti,
                             frac_anti_noisy / _clean, anti_noisy_auc), tidy; with
                             class_direction_table (classwise.json's per-class anti share and
                             bound, by epoch) the input of the caat_directions plots
    aggregate            ->  mean / std / n over seeds per scenario x method x metric (the
                             test metrics, then AutoAttack's when selected runs carry them)
    paired_tests         ->  each method minus the reference (TRADES), paired by seed
    pareto_front         ->  methods whose (natural, robust) no other method dominates
    summarize            ->  the tidy summary (one row per scenario x method x metric) + notes
                             + the masking alarm: cells whose mean PGD - AutoAttack gap
                             exceeds MASKING_GAP (end of summary.md / .html, and stderr)
    write_outputs        ->  summary.csv / .md / .tex / .html, classwise.csv, selected_runs.csv,
                             and the PNG plots: tradeoff.png, classwise_<scenario>.png,
                             vs_<factor>.png, caat_directions_<scenario>.png (CAAT's anti share
                             over the epochs, noisy vs clean labels, its noisy-label AUC and,
                             under imbalance, the per-class share and bound; only for
                             scenarios whose CAAT runs logged them)

Only finished runs count: pruned and failed trials never enter a table. Final metric values are
the values at the last step (MLflow's latest value), i.e. the last evaluated epoch.

This module is the public front; the steps live in private siblings, each importing only
those below it: `_directions` (CAAT direction tables), `_model` (SweepRuns, Summary, shared
names), `_load` (MLflow), `_stats` (pure pandas), `_summary`, `_render` (md / tex / html),
`_plots`, `_direction_plots`, `_analyze` (the driver). What runs carry in MLflow is
`sweeper.contract`.
"""

from sweeper.analysis._analyze import analyze, write_outputs, write_plots
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
from sweeper.analysis._load import (
    SCENARIO_PARAMS,
    load_classwise,
    load_sweep,
    normalise_runs,
    runs_frame,
)
from sweeper.analysis._model import (
    LOWER_IS_BETTER,
    METHOD_LABELS,
    METHOD_ORDER,
    METRICS,
    REFERENCE,
    NothingToAnalyse,
    Summary,
    SweepNotFound,
    SweepRuns,
    method_key,
    method_label,
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
from sweeper.analysis._render import METRIC_LABELS, NA, tex_escape, to_html, to_latex, to_markdown
from sweeper.analysis._stats import (
    aggregate,
    best_flags,
    coverage,
    paired_test,
    paired_tests,
    pareto_by_scenario,
    pareto_front,
    reported_metrics,
    select_runs,
)
from sweeper.analysis._summary import (
    CLASSWISE_KINDS,
    MASKING_GAP,
    MASKING_TEXT,
    MASKING_TITLE,
    classwise_table,
    coverage_notes,
    describe_scenario,
    masking_alarms,
    nothing_message,
    scenario_table,
    summarize,
)
from sweeper.contract import AUTOATTACK_METRICS, DEFAULT_SELECTION_METRIC

__all__ = [
    "AUTOATTACK_METRICS", "CIFAR10_CLASSES", "CLASSWISE_KINDS", "CLASS_DIRECTION_COLUMNS",
    "CLASS_DIRECTION_KEYS", "DEFAULT_SELECTION_METRIC", "DIRECTION_COLUMNS", "DIRECTION_METHOD",
    "DIRECTION_METRICS", "FACTORS", "FASHION_MNIST_CLASSES", "LOWER_IS_BETTER", "MASKING_GAP",
    "MASKING_TEXT", "MASKING_TITLE", "METHOD_LABELS", "METHOD_ORDER", "METRICS",
    "METRIC_LABELS", "NA", "NothingToAnalyse", "REFERENCE", "SCENARIO_PARAMS", "Summary",
    "SweepNotFound", "SweepRuns", "aggregate", "analyze", "best_flags", "class_direction_table",
    "class_means_at_last", "class_means_by_epoch", "class_names", "classwise_table", "coverage",
    "coverage_notes", "describe_scenario", "direction_frame", "direction_means",
    "direction_tables", "empty_class_directions", "empty_directions", "factor_series",
    "load_classwise", "load_directions", "load_sweep", "masking_alarms", "method_key",
    "method_label", "normalise_runs", "nothing_message", "paired_test", "paired_tests",
    "pareto_by_scenario", "pareto_front", "plot_caat_directions", "plot_classwise",
    "plot_tradeoff", "plot_vs_factor", "reported_metrics", "runs_frame", "safe_name",
    "save_scenario_figure", "scenario_table", "select_runs", "summarize", "tex_escape",
    "to_html", "to_latex", "to_markdown", "varied_factors", "write_outputs", "write_plots",
]
