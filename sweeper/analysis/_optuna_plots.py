"""The studies' pictures: importance.png and pareto_configs.png (matplotlib), and per cell
Optuna's interactive plotly figures as HTML pages in `optuna/`.

The HTML pages load plotly.js from one plotly.min.js beside them (plotly's "directory" mode):
they open offline, and the 4.8 MB bundle is written once instead of inlined into each page
(a sweep of 30 cells with 4 views each would otherwise weigh about 600 MB).
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.analysis._model import StudyAnalysis
from sweeper.analysis._plots import fit_title, safe_name
from sweeper.contract import CONSTRAINTS_ATTR
from trainables.errors import one_line

VIEWS_DIR = "optuna"


def _grid(n: int, width: float, height: float):
    import matplotlib.pyplot as plt

    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.8),
                             squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig: Any, path: Path, title: str, legend_rows: int = 1) -> Path:
    import matplotlib.pyplot as plt

    fit_title(fig, title)
    fig.tight_layout(rect=(0, 0.4 * legend_rows / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_importance(analysis: StudyAnalysis, path: Path) -> Path | None:
    """One panel per cell: each param's importance (PED-ANOVA, sums to 1), a bar per objective."""
    import matplotlib

    table = analysis.importance
    if not len(table):
        return None
    cells = list(dict.fromkeys(table["cell"]))
    objectives = [m for m, _ in analysis.objectives]
    colours = matplotlib.colormaps["tab10"].colors
    fig, axes = _grid(len(cells), 5.2, 3.6)
    width = 0.8 / len(objectives)
    for ax, cell in zip(axes.flat, cells, strict=False):
        rows = table[table["cell"].eq(cell)]
        params = list(dict.fromkeys(rows["param"]))
        y = np.arange(len(params))
        for j, metric in enumerate(objectives):
            got = rows[rows["objective"].eq(metric)].set_index("param")["importance"]
            ax.barh(y + j * width, [got.get(p, np.nan) for p in params], height=width,
                    color=colours[j % len(colours)], label=metric)
        ax.set_yticks(y + width * (len(objectives) - 1) / 2, params)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance (sums to 1 per objective)")
        ax.set_title(cell, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    return _save(fig, path, "Hyperparameter importance per cell and objective (PED-ANOVA, "
                            "completed tuning trials)")


def plot_pareto_configs(analysis: StudyAnalysis, path: Path) -> Path | None:
    """One panel per cell, the first two objectives on the axes: the tuning trials (feasible,
    infeasible), the tuning front, and the confirmed configs (means over seeds; filled when
    on their own front). Nothing with a single objective: its front is one best config."""
    if len(analysis.objectives) < 2 or not len(analysis.configs):
        return None
    (mx, ox), (my, oy) = analysis.objectives[:2]
    configs = analysis.configs
    cells = list(dict.fromkeys(configs["cell"]))
    fig, axes = _grid(len(cells), 5.2, 4.4)
    for ax, cell in zip(axes.flat, cells, strict=False):
        rows = configs[configs["cell"].eq(cell)]
        tune = rows[rows["source"].eq("tuning")]
        ok = tune["feasible"].astype(bool)
        ax.scatter(tune.loc[ok, mx], tune.loc[ok, my], s=14, color="0.65", label="tuning trial")
        ax.scatter(tune.loc[~ok, mx], tune.loc[~ok, my], s=18, color="0.65", marker="x",
                   label="tuning trial, infeasible")
        front = tune[tune["pareto"].astype(bool)].sort_values(mx)
        ax.plot(front[mx], front[my], color="tab:blue", marker="o", markersize=6,
                label="tuning front")
        conf = rows[rows["source"].eq("confirmed")]
        on = conf["pareto"].astype(bool)
        ax.scatter(conf.loc[on, mx], conf.loc[on, my], s=70, marker="D", color="tab:orange",
                   edgecolor="black", zorder=3, label="confirmed, on front (mean over seeds)")
        ax.scatter(conf.loc[~on, mx], conf.loc[~on, my], s=70, marker="D", facecolor="none",
                   edgecolor="tab:orange", zorder=3, label="confirmed, off front or infeasible")
        ax.set_xlabel(f"{mx} ({ox})")
        ax.set_ylabel(f"{my} ({oy})")
        ax.set_title(cell, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    return _save(fig, path, "Config fronts per cell: tuning trials vs confirmed configs",
                 legend_rows=2)


def _value(index: int, trial: Any) -> float:
    return trial.values[index]


def _violations(trial: Any) -> list[float]:
    # A trial the sweep recorded no violations for was infeasible to its sampler too.
    return list(trial.user_attrs.get(CONSTRAINTS_ATTR, [math.inf]))


def cell_figures(analysis: StudyAnalysis, cell: str) -> list[tuple[str, str, Any]]:
    """(file suffix, label, plotly figure) of a cell's interactive views: parallel
    coordinates; per objective, the contour of its two most important params (when the cell
    has importances for two); with several objectives, the Pareto front."""
    import optuna.visualization as ov

    study = analysis.studies[cell]
    metrics = [m for m, _ in analysis.objectives]
    multi = len(metrics) > 1
    # Optuna plots every objective of a multi-objective study on the axes (lines coloured by
    # Pareto rank); one objective is named after its metric.
    parallel = (ov.plot_parallel_coordinate(study) if multi
                else ov.plot_parallel_coordinate(study, target_name=metrics[0]))
    figures = [("parallel_coordinate", "parallel coordinates", parallel)]
    table = analysis.importance
    for i, metric in enumerate(metrics):
        top = list(table[table["cell"].eq(cell) & table["objective"].eq(metric)]["param"][:2])
        if len(top) < 2:
            continue
        # A multi-objective study needs a target to colour a contour by.
        target = {"target": partial(_value, i)} if multi else {}
        figures.append((f"contour_{safe_name(metric)}",
                        f"contour of {metric} over {top[0]} x {top[1]}",
                        ov.plot_contour(study, params=top, target_name=metric, **target)))
    if multi:
        figures.append(("pareto_front", "Pareto front of the tuning trials",
                        _pareto_front(study, metrics, bool(analysis.constraints))))
    return figures


def _pareto_front(study: Any, metrics: list[str], constrained: bool) -> Any:
    import optuna
    import optuna.visualization as ov

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not constrained or all(t.constraints for t in complete):
        # Optuna reads feasibility from what a constrained sampler recorded itself.
        return ov.plot_pareto_front(study, target_names=metrics)
    # A sampler without constraints (random search) records none: colour by the sweep's own
    # record instead, through the argument Optuna deprecated in 4.0 (removed in 6.0).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return ov.plot_pareto_front(study, target_names=metrics, constraints_func=_violations)


def write_views(analysis: StudyAnalysis, out: Path) -> tuple[dict[str, list[tuple[str, str]]],
                                                              list[str]]:
    """Each cell's interactive views as standalone HTML in out/optuna/: cell -> [(label,
    path relative to `out`)], and a note per cell whose views Optuna could not draw."""
    import optuna

    views: dict[str, list[tuple[str, str]]] = {}
    notes = []
    folder = out / VIEWS_DIR
    for cell, study in analysis.studies.items():
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            notes.append(f"{cell}: no completed tuning trial: no interactive views")
            continue
        try:
            figures = cell_figures(analysis, cell)
        except Exception as err:  # a figure Optuna cannot draw must not stop the analysis
            notes.append(f"{cell}: interactive views skipped ({one_line(err, 200)})")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for suffix, label, fig in figures:
            name = f"{safe_name(cell)}_{suffix}.html"
            fig.write_html(folder / name, include_plotlyjs="directory", full_html=True)
            views.setdefault(cell, []).append((label, f"{VIEWS_DIR}/{name}"))
    return views, notes
