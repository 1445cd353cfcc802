"""The driver: read a sweep from MLflow, analyse it, write every export."""

from __future__ import annotations

from pathlib import Path

from sweeper.analysis._configs import configs_frame
from sweeper.analysis._direction_plots import plot_caat_directions
from sweeper.analysis._directions import load_directions
from sweeper.analysis._html import to_html
from sweeper.analysis._load import load_classwise, load_sweep
from sweeper.analysis._model import REFERENCE, StudyAnalysis, Summary
from sweeper.analysis._optuna import analyse_studies
from sweeper.analysis._optuna_plots import plot_importance, plot_pareto_configs, write_views
from sweeper.analysis._plots import (
    plot_classwise,
    plot_tradeoff,
    plot_vs_factor,
    safe_name,
    varied_factors,
)
from sweeper.analysis._render import to_latex, to_markdown
from sweeper.analysis._stats import select_runs
from sweeper.analysis._summary import summarize
from sweeper.contract import resolve_tracking_uri


def write_plots(summary: Summary, out: Path) -> list[Path]:
    import matplotlib

    # Headless machines and CI: never ask for a display.
    matplotlib.use("Agg")
    written = [plot_tradeoff(summary, out / "tradeoff.png")]
    if summary.optuna is not None:
        # The configs' fronts beside the methods' trade-off they refine.
        written.append(plot_pareto_configs(summary.optuna, out / "pareto_configs.png"))
    for scenario in summary.scenarios["scenario"]:
        written.append(plot_classwise(summary, scenario,
                                      out / f"classwise_{safe_name(scenario)}.png"))
    for factor in varied_factors(summary.scenarios):
        written.append(plot_vs_factor(summary, factor, out / f"vs_{factor}.png"))
    for scenario in summary.scenarios["scenario"]:
        written.append(plot_caat_directions(summary, scenario,
                                            out / f"caat_directions_{safe_name(scenario)}.png"))
    if summary.optuna is not None:
        written.append(plot_importance(summary.optuna, out / "importance.png"))
    return [p for p in written if p is not None]


def write_study_tables(analysis: StudyAnalysis, out: Path) -> list[Path]:
    """importance.csv, pareto_configs.csv and, when the sweep has constraints,
    infeasible_configs.csv (every config that breaks one, and which)."""
    files = [out / "importance.csv", out / "pareto_configs.csv"]
    analysis.importance.to_csv(files[0], index=False, float_format="%.10g")
    configs_frame(analysis, "pareto").to_csv(files[1], index=False, float_format="%.10g")
    if analysis.constraints:
        files.append(out / "infeasible_configs.csv")
        configs_frame(analysis, "infeasible").to_csv(files[-1], index=False,
                                                     float_format="%.10g")
    return files


def write_outputs(summary: Summary, out: str | Path, title: str = "") -> list[Path]:
    """All exports into `out` (created); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    # 10 significant digits: exact for any metric the trainer logs, without float noise.
    summary.tidy.to_csv(out / "summary.csv", index=False, float_format="%.10g")
    files.append(out / "summary.csv")
    summary.classwise.to_csv(out / "classwise.csv", index=False, float_format="%.10g")
    files.append(out / "classwise.csv")
    # Each selected run's per-class accuracies with their Wilson intervals (worst class marked).
    summary.run_classwise.to_csv(out / "classwise_runs.csv", index=False, float_format="%.10g")
    files.append(out / "classwise_runs.csv")
    selected = summary.selected
    # Which config a confirmation run re-ran, once some run says (sweeps before several
    # objectives did not: their file keeps its columns).
    tuned = ("tuned_by",) if "tuned_by" in selected and selected["tuned_by"].notna().any() else ()
    cols = [c for c in ("scenario", "method", "seed", "source", "phase", "trial_id", *tuned,
                        "run_id", *summary.metrics, *summary.best_metrics) if c in selected]
    selected[cols].to_csv(out / "selected_runs.csv", index=False, float_format="%.10g")
    files.append(out / "selected_runs.csv")
    views: dict[str, list[tuple[str, str]]] = {}
    if summary.optuna is not None:
        files += write_study_tables(summary.optuna, out)
        views, notes = write_views(summary.optuna, out)
        # Before the summaries are rendered, so that they list them too.
        summary.notes.extend(notes)
        files += [out / path for links in views.values() for _, path in links]
    plots = write_plots(summary, out)
    (out / "summary.md").write_text(to_markdown(summary, title))
    (out / "summary.tex").write_text(to_latex(summary, title))
    (out / "summary.html").write_text(to_html(summary, title, [p.name for p in plots], views))
    files += [out / "summary.md", out / "summary.tex", out / "summary.html", *plots]
    return files


def analyze(name: str, out: str | Path, tracking_uri: str | None = None,
            reference: str = REFERENCE) -> tuple[Summary, list[Path]]:
    """Read sweep `name` from MLflow, analyse it and write every export into `out`."""
    sweep = load_sweep(name, tracking_uri)
    if len(sweep.runs):
        # Only the runs that enter the tables need their artifact downloaded.
        selected = select_runs(sweep.runs, sweep.metric, sweep.mode)
        uri = resolve_tracking_uri(tracking_uri)
        sweep.classwise = load_classwise(uri, selected["run_id"])
        sweep.directions = load_directions(uri, selected)
    summary = summarize(sweep, reference)
    if sweep.optuna_storage:
        summary.optuna, notes = analyse_studies(sweep, summary.selected)
        summary.notes.extend(notes)
    files = write_outputs(summary, out, title=f"Sweep {name}")
    return summary, files
