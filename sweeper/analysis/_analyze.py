"""The driver: read a sweep from MLflow, analyse it, write every export."""

from __future__ import annotations

from pathlib import Path

from sweeper.analysis._direction_plots import plot_caat_directions
from sweeper.analysis._directions import load_directions
from sweeper.analysis._load import load_classwise, load_sweep
from sweeper.analysis._model import REFERENCE, Summary
from sweeper.analysis._plots import (
    plot_classwise,
    plot_tradeoff,
    plot_vs_factor,
    safe_name,
    varied_factors,
)
from sweeper.analysis._render import to_html, to_latex, to_markdown
from sweeper.analysis._stats import select_runs
from sweeper.analysis._summary import summarize
from sweeper.contract import resolve_tracking_uri


def write_plots(summary: Summary, out: Path) -> list[Path]:
    import matplotlib

    # Headless machines and CI: never ask for a display.
    matplotlib.use("Agg")
    written = [plot_tradeoff(summary, out / "tradeoff.png")]
    for scenario in summary.scenarios["scenario"]:
        written.append(plot_classwise(summary, scenario,
                                      out / f"classwise_{safe_name(scenario)}.png"))
    for factor in varied_factors(summary.scenarios):
        written.append(plot_vs_factor(summary, factor, out / f"vs_{factor}.png"))
    for scenario in summary.scenarios["scenario"]:
        written.append(plot_caat_directions(summary, scenario,
                                            out / f"caat_directions_{safe_name(scenario)}.png"))
    return [p for p in written if p is not None]


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
    cols = [c for c in ("scenario", "method", "seed", "source", "phase", "trial_id", "run_id",
                        *summary.metrics) if c in summary.selected]
    summary.selected[cols].to_csv(out / "selected_runs.csv", index=False, float_format="%.10g")
    files.append(out / "selected_runs.csv")
    plots = write_plots(summary, out)
    (out / "summary.md").write_text(to_markdown(summary, title))
    (out / "summary.tex").write_text(to_latex(summary, title))
    (out / "summary.html").write_text(to_html(summary, title, [p.name for p in plots]))
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
    files = write_outputs(summary, out, title=f"Sweep {name}")
    return summary, files
