"""The whole analysis on plain data: SweepRuns -> Summary (the tidy table, the scenarios,
the class-wise means, the notes), and how scenarios are described."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sweeper.analysis._directions import direction_tables
from sweeper.analysis._model import (
    REFERENCE,
    NothingToAnalyse,
    Summary,
    SweepRuns,
    method_key,
    method_label,
)
from sweeper.analysis._stats import (
    aggregate,
    best_flags,
    cells_without_test_metrics,
    coverage,
    n_confirmed_configs,
    paired_tests,
    pareto_by_scenario,
    reported_metrics,
    select_runs,
)
from sweeper.contract import AUTOATTACK_ACC, PGD_AUTOATTACK_GAP, RUN_STATES

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

    metrics = reported_metrics(selected)
    agg = aggregate(selected, metrics)
    agg["best"] = best_flags(agg)
    front = pareto_by_scenario(agg)
    agg = agg.merge(front[["scenario", "method", "pareto"]], on=["scenario", "method"])
    tests = paired_tests(selected, reference, metrics)
    tidy = agg.merge(tests, on=["scenario", "method", "metric"], how="left")
    tidy["n_pairs"] = tidy["n_pairs"].astype("Int64")
    is_ref = tidy["method"].eq(reference)
    tidy.loc[is_ref, "note"] = "reference"

    if not selected["method"].eq(reference).any():
        notes.append(f"no {method_label(reference)} runs in this sweep: paired tests skipped")
    untested = cells_without_test_metrics(selected)
    tuned_only = set(selected.loc[selected["source"].eq("best tune"), "cell"])
    if tuned_only - set(untested):
        notes.append("cells without confirmation runs report their best tuning run (n = 1, by "
                     f"{sweep.metric}): std and paired tests are not applicable there")
    if untested:
        notes.append(f"{', '.join(untested)}: tuning runs skip the test split "
                     "(confirm.tune_test: false): confirmation pending, test metrics n/a (n = 0)")

    scenarios = scenario_table(selected)
    tidy = tidy.merge(scenarios, on="scenario", how="left")
    order_s = {s: i for i, s in enumerate(scenarios["scenario"])}
    tidy["_s"] = tidy["scenario"].map(order_s)
    tidy["_m"] = tidy["method"].map(method_key)
    tidy["_k"] = tidy["metric"].map(metrics.index)
    tidy = tidy.sort_values(["_s", "_m", "_k"]).drop(columns=["_s", "_m", "_k"])
    masking = masking_alarms(tidy)
    columns = ["scenario", "noise_type", "noise_rate", "imbalance_ratio", "method", "metric",
               "mean", "std", "n", "source", "best", "pareto", "mean_diff", "t", "p", "n_pairs",
               "note"]
    tidy = tidy[columns].rename(columns={"mean_diff": f"diff_vs_{reference}",
                                         "note": "test_note"}).reset_index(drop=True)
    classwise = classwise_table(selected, sweep.classwise)
    directions, class_directions = direction_tables(sweep, selected)
    return Summary(tidy=tidy, selected=selected, scenarios=scenarios, classwise=classwise,
                   notes=notes, reference=reference, directions=directions,
                   class_directions=class_directions, metrics=metrics, masking=masking)


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


# The per-class test accuracies classwise.csv and the class-wise plots show.
CLASSWISE_KINDS = ("natural", "robust", "autoattack")


def classwise_table(selected: pd.DataFrame,
                    classwise: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """Mean per-class test accuracies over a cell's selected runs (runs without the artifact
    are left out of that cell's mean)."""
    rows = []
    for (scenario, method), group in selected.groupby(["scenario", "method"], sort=False):
        lists = [classwise[r] for r in group["run_id"] if r in classwise]
        if not lists:
            continue
        # AutoAttack's lists exist only where runs ran it: no rows (and no panel) otherwise.
        for kind in CLASSWISE_KINDS:
            key = f"test_class_{kind}_acc"
            arrays = [np.asarray(c[key], float) for c in lists if key in c]
            if not arrays or len({a.shape for a in arrays}) != 1:
                continue
            mean = np.mean(arrays, axis=0)
            for cls, value in enumerate(mean):
                rows.append({"scenario": scenario, "method": method, "kind": kind,
                             "class": cls, "mean": float(value), "n": len(arrays)})
    return pd.DataFrame(rows, columns=["scenario", "method", "kind", "class", "mean", "n"])
