"""The whole analysis on plain data: SweepRuns -> Summary (the tidy table with its intervals,
the scenarios, the class-wise means, the notes, the reviewer's checklist), and how scenarios
are described."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sweeper.analysis._checklist import build_checklist
from sweeper.analysis._classwise import (
    cell_wilson,
    classwise_table,
    count_notes,
    run_classwise_table,
)
from sweeper.analysis._directions import direction_tables
from sweeper.analysis._model import (
    MASKING_GAP,
    REFERENCE,
    NothingToAnalyse,
    Summary,
    SweepRuns,
    checkpoint_of,
    method_key,
    method_label,
)
from sweeper.analysis._stats import (
    aggregate,
    best_flags,
    best_metrics,
    cells_without_test_metrics,
    coverage,
    n_confirmed_configs,
    paired_tests,
    pareto_by_scenario,
    reported_metrics,
    select_runs,
    with_overfit_gap,
)
from sweeper.contract import AUTOATTACK_ACC, PGD_AUTOATTACK_GAP, RUN_STATES

# summary.csv's columns. ci_*: the 95% t-interval of the mean over seeds; wilson_*: one
# run's Wilson 95% binomial interval at the mean, on wilson_n test images; diff_*: the paired
# difference from the reference and its 95% t-interval; p_holm: p Holm-adjusted over the
# holm_n comparisons of its table (scenario x checkpoint); min_detectable_diff: the smallest
# difference that paired test detects with 80% power.
TIDY_COLUMNS = ["scenario", "noise_type", "noise_rate", "imbalance_ratio", "method", "metric",
                "checkpoint", "mean", "std", "n", "ci_low", "ci_high", "wilson_low",
                "wilson_high", "wilson_n", "source", "best", "pareto", "mean_diff",
                "diff_ci_low", "diff_ci_high", "t", "p", "p_holm", "holm_n",
                "min_detectable_diff", "n_pairs", "note"]


def scenario_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per scenario with its factors, in a readable order (clean first).

    The training bound `eps` is kept only when the sweep varies it: a constant one would
    just repeat itself in every title.
    """
    cols = ["noise_type", "noise_rate", "imbalance_ratio", "eps", "dataset"]
    for column in cols:
        if column not in runs:
            runs = runs.assign(**{column: None})
    table = runs.groupby("scenario", sort=False)[cols].first().reset_index()
    if pd.to_numeric(table["eps"], errors="coerce").nunique() < 2:
        table = table.drop(columns="eps")
    table["_rate"] = table["noise_rate"].fillna(-1)
    table["_imb"] = table["imbalance_ratio"].fillna(-1)
    table["_eps"] = table["eps"].fillna(-1) if "eps" in table else 0
    table = table.sort_values(["_rate", "_imb", "noise_type", "_eps", "scenario"],
                              na_position="first")
    return table.drop(columns=["_rate", "_imb", "_eps"]).reset_index(drop=True)


def pgd_setting(selected: pd.DataFrame) -> tuple[int, float] | None:
    """(steps, eps) of the PGD behind "robust" when every selected run used the same."""
    steps = selected["eval_steps"].dropna().unique() if "eval_steps" in selected else []
    eps = selected["eval_eps"].dropna().unique() if "eval_eps" in selected else []
    return (int(steps[0]), float(eps[0])) if len(steps) == 1 and len(eps) == 1 else None


def robust_attack(selected: pd.DataFrame) -> str:
    """What "robust" means in the tables, e.g. 'PGD-20 with random start at eps 0.1'."""
    setting = pgd_setting(selected)
    if setting is None:
        return "PGD with random start (steps or eps differ between runs: selected_runs.csv)"
    return f"PGD-{setting[0]} with random start at eps {setting[1]:.3g}"


def describe_scenario(row: pd.Series) -> str:
    """'uniform noise 20%, imbalance 10' from a scenario's factors (what is known of them)."""
    parts = []
    rate, kind = row.get("noise_rate"), row.get("noise_type")
    if rate is not None and not pd.isna(rate):
        parts.append("no label noise" if rate == 0 or kind == "none"
                     else f"{kind} noise {_num(100 * rate)}%")
    ratio = row.get("imbalance_ratio")
    if ratio is not None and not pd.isna(ratio):
        parts.append("balanced" if ratio == 1 else f"imbalance ratio {_num(ratio)}")
    eps = row.get("eps")
    if eps is not None and not pd.isna(eps):
        parts.append(f"eps {eps:.3g}")
    return ", ".join(parts)


def _num(value: float) -> str:
    return f"{value:g}"


def summarize(sweep: SweepRuns, reference: str = REFERENCE) -> Summary:
    """The whole analysis on plain data; raises NothingToAnalyse when no trial finished."""
    runs = sweep.runs
    notes = list(sweep.notes)
    cov = coverage(runs) if len(runs) else pd.DataFrame()
    selected = select_runs(runs, sweep.metric, sweep.mode) if len(runs) else runs
    if not len(selected):
        raise NothingToAnalyse(nothing_message(cov, runs))
    notes.extend(coverage_notes(cov, selected))
    notes.extend(several_configs_notes(runs, selected, sweep.metric))

    notes.extend(count_notes(selected, sweep.classwise))

    selected = with_overfit_gap(selected)
    metrics, best = reported_metrics(selected), best_metrics(selected)
    table_metrics = (*metrics, *best)
    run_table = run_classwise_table(selected, sweep.classwise)
    agg = cell_wilson(aggregate(selected, table_metrics), run_table)
    agg["checkpoint"] = agg["metric"].map(checkpoint_of)
    agg["best"] = best_flags(agg)
    front = pareto_by_scenario(agg)
    agg = agg.merge(front[["scenario", "method", "pareto"]], on=["scenario", "method"])
    tests = paired_tests(selected, reference, table_metrics).drop(columns="checkpoint")
    tidy = agg.merge(tests, on=["scenario", "method", "metric"], how="left")
    for column in ("n_pairs", "holm_n"):
        tidy[column] = tidy[column].astype("Int64")
    is_ref = tidy["method"].eq(reference)
    tidy.loc[is_ref, "note"] = "reference"

    if not selected["method"].eq(reference).any():
        notes.append(f"no {method_label(reference)} runs in this sweep: paired tests skipped")
    untested = cells_without_test_metrics(selected)
    tuned_only = set(selected.loc[selected["source"].eq("best tune"), "cell"])
    if tuned_only - set(untested):
        notes.append("cells without confirmation runs report their best tuning run (n = 1, by "
                     f"{sweep.metric}): std, intervals and paired tests are not applicable "
                     "there")
    if untested:
        notes.append(f"{', '.join(untested)}: tuning runs skip the test split "
                     "(confirm.tune_test: false): confirmation pending, test metrics n/a (n = 0)")

    scenarios = scenario_table(selected)
    tidy = tidy.merge(scenarios, on="scenario", how="left")
    order_s = {s: i for i, s in enumerate(scenarios["scenario"])}
    tidy["_s"] = tidy["scenario"].map(order_s)
    tidy["_m"] = tidy["method"].map(method_key)
    tidy["_k"] = tidy["metric"].map(table_metrics.index)
    tidy = tidy.sort_values(["_s", "_m", "_k"]).drop(columns=["_s", "_m", "_k"])
    masking = masking_alarms(tidy)
    tidy = tidy[TIDY_COLUMNS].rename(columns={"mean_diff": f"diff_vs_{reference}",
                                              "note": "test_note"}).reset_index(drop=True)
    classwise = classwise_table(selected, sweep.classwise)
    directions, class_directions = direction_tables(sweep, selected)
    checklist = build_checklist(sweep.objectives or [(sweep.metric, sweep.mode)], selected,
                                tidy, sweep.classwise, reference)
    return Summary(tidy=tidy, selected=selected, scenarios=scenarios, classwise=classwise,
                   notes=notes, reference=reference, directions=directions,
                   class_directions=class_directions, metrics=metrics, masking=masking,
                   best_metrics=best, run_classwise=run_table, checklist=checklist)


def masking_alarms(tidy: pd.DataFrame) -> list[str]:
    """One line per cell (in table order) whose mean PGD - AutoAttack gap exceeds
    MASKING_GAP: 'clean/caat: PGD 45.00% vs AutoAttack 40.00% ...'."""
    means = tidy.set_index(["scenario", "method", "metric"])["mean"]
    lines = []
    for row in tidy[tidy["metric"].eq(PGD_AUTOATTACK_GAP)].itertuples():
        gap = row.mean
        # Strictly above; the tolerance keeps a mean of exactly 3 points from tripping it.
        if pd.isna(gap) or gap <= MASKING_GAP + 1e-9:
            continue
        aa = means.get((row.scenario, row.method, AUTOATTACK_ACC), np.nan)
        pgd, aa_text = ("n/a", "n/a") if pd.isna(aa) else (f"{100 * (aa + gap):.2f}%",
                                                           f"{100 * aa:.2f}%")
        runs = "1 run" if row.n == 1 else f"mean of {row.n} runs"
        lines.append(f"{row.scenario}/{row.method}: PGD {pgd} vs AutoAttack {aa_text} on the "
                     f"same test images, a gap of {100 * gap:.2f} points ({runs})")
    return lines


def several_configs_notes(runs: pd.DataFrame, selected: pd.DataFrame, metric: str) -> list[str]:
    """One line per cell that confirmed several configs (a Pareto set): which one the tables
    report, and where the others are."""
    notes = []
    for cell, group in selected[selected["source"].eq("confirm")].groupby("cell", sort=True):
        confirm = runs[runs["cell"].eq(cell) & runs["phase"].eq("confirm")
                       & runs["outcome"].eq("completed")]
        n = n_confirmed_configs(confirm)
        if n > 1:
            notes.append(f"{cell}: confirmed {n} configs; the tables report the one with the "
                         f"best mean {metric} over its seeds (tuned by "
                         f"{group['tuned_by'].iloc[0]}); the rest are in pareto_configs.csv "
                         "(source confirmed) where their means stay on the front")
    return notes


def nothing_message(cov: pd.DataFrame, runs: pd.DataFrame) -> str:
    if not len(runs):
        return "nothing to analyse yet: the sweep has no trials yet"
    total = cov.sum()
    trials = "trial" if total["running"] == 1 else "trials"
    msg = (f"nothing to analyse yet: {total['running']} {trials} running, {total['completed']} "
           f"completed, {total['pruned']} pruned, {total['failed']} failed")
    if total["interrupted"]:
        msg += f", {total['interrupted']} interrupted (`caat-sweep resume` continues them)"
    errors = runs["error"].dropna()
    if len(errors):
        msg += f" (first error: {str(errors.iloc[0]).splitlines()[0][:200]})"
    return msg


def coverage_notes(cov: pd.DataFrame, selected: pd.DataFrame) -> list[str]:
    """Say what a half-finished sweep is missing, per cell."""
    notes = []
    have = set(selected["cell"])
    missing = [c for c in cov.index if c not in have]
    if missing:
        details = []
        for cell in missing:
            row = cov.loc[cell]
            parts = [f"{row[k]} {k}" for k in RUN_STATES[1:] if row[k]]
            details.append(f"{cell} ({', '.join(parts) or 'no finished run'})")
        notes.append(f"half-finished sweep: analysed {len(have)} of {len(cov)} cells; "
                     f"missing: {'; '.join(details)}")
    for state in ("running", "interrupted"):
        counts = cov.loc[[c for c in cov.index if c in have], state]
        counts = counts[counts > 0]
        if len(counts):
            notes.append(f"{state} trials in analysed cells (not counted): "
                         + ", ".join(f"{cell} ({n})" for cell, n in counts.items()))
    return notes
