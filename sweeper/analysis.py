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
    aggregate            ->  mean / std / n over seeds per scenario x method x metric
    paired_tests         ->  each method minus the reference (TRADES), paired by seed
    pareto_front         ->  methods whose (natural, robust) no other method dominates
    summarize            ->  the tidy summary (one row per scenario x method x metric) + notes
    write_outputs        ->  summary.csv / .md / .tex / .html, classwise.csv, selected_runs.csv,
                             and the PNG plots: tradeoff.png, classwise_<scenario>.png,
                             vs_<factor>.png, caat_directions_<scenario>.png (CAAT's anti share
                             over the epochs, noisy vs clean labels, its noisy-label AUC and,
                             under imbalance, the per-class share and bound; only for
                             scenarios whose CAAT runs logged them)

Only finished runs count: pruned and failed trials never enter a table. Final metric values are
the values at the last step (MLflow's latest value), i.e. the last evaluated epoch.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper._tracking_uri import open_client, resolve_tracking_uri
from trainables.errors import ConfigError

# Test-split metrics reported per scenario x method, in table order, with their headers.
METRICS: tuple[str, ...] = (
    "test_natural_acc",
    "test_robust_acc",
    "test_worst_class_natural_acc",
    "test_worst_class_robust_acc",
    "test_class_natural_acc_std",
    "test_boundary_error",
)
METRIC_LABELS = {
    "test_natural_acc": "natural",
    "test_robust_acc": "robust",
    "test_worst_class_natural_acc": "worst-class natural",
    "test_worst_class_robust_acc": "worst-class robust",
    "test_class_natural_acc_std": "class std",
    "test_boundary_error": "boundary error",
}
# Best per column is the largest accuracy but the smallest spread / gap.
LOWER_IS_BETTER = frozenset({"test_class_natural_acc_std", "test_boundary_error"})

REFERENCE = "trades"
DEFAULT_SELECTION_METRIC = "val_robust_acc"
EXPERIMENT_PREFIX = "caat-sweep/"

# Paper order of the methods; methods not listed follow alphabetically.
METHOD_ORDER = ("erm", "pgd_at", "trades", "frl", "mwn", "anti_adv", "caat")
METHOD_LABELS = {"erm": "ERM", "pgd_at": "PGD-AT", "trades": "TRADES", "frl": "FRL",
                 "mwn": "MWN", "anti_adv": "Anti-adv", "caat": "CAAT"}

FASHION_MNIST_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Boot")
CIFAR10_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Scenario params read from each run (flattened config keys) -> runs-table column.
SCENARIO_PARAMS = {"scenario.noise_type": "noise_type", "scenario.noise_rate": "noise_rate",
                   "scenario.imbalance_ratio": "imbalance_ratio", "dataset.name": "dataset",
                   "method.eps": "eps", "eval.steps": "eval_steps", "eval.eps": "eval_eps"}

# Shown in every table when a value cannot be computed; the notes say why.
NA = "n/a"


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


@dataclass
class Summary:
    tidy: pd.DataFrame  # one row per scenario x method x metric (raw fractions)
    selected: pd.DataFrame  # the runs that built it
    scenarios: pd.DataFrame  # one row per scenario: its factors
    classwise: pd.DataFrame  # scenario x method x class: mean per-class accuracies
    notes: list[str]
    reference: str = REFERENCE
    # CAAT's direction diagnostics of the selected runs: per-epoch metrics and per-class lists.
    directions: pd.DataFrame = field(default_factory=lambda: empty_directions())
    class_directions: pd.DataFrame = field(default_factory=lambda: empty_class_directions())


# ---------------------------------------------------------------------------------- loading


def _check_store_exists(uri: str) -> None:
    # MLflow would silently create an empty database at a mistyped path.
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise SweepNotFound(f"--tracking-uri: no MLflow store at {path} (run `caat-sweep "
                                "launch` first, or point --tracking-uri at the sweep's store)")
    elif uri.startswith(("http://", "https://")):
        # MLflow's client retries an unreachable server for minutes; ask once, briefly.
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as resp:
                resp.read()
        except Exception as err:
            reason = " ".join(str(err).split())[:200]
            raise SweepNotFound(f"--tracking-uri: cannot reach {uri} ({reason})") from None


def load_sweep(name: str, tracking_uri: str | None = None) -> SweepRuns:
    """Read a sweep's trial runs (tags, final metrics, scenario params) and its parent's tags."""
    import logging

    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    _check_store_exists(uri)
    # MLflow logs schema checks at INFO on every open; the analysis output should stay readable.
    for logger in ("mlflow", "alembic"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    client = open_client(uri)
    try:
        exp = client.get_experiment_by_name(EXPERIMENT_PREFIX + name)
        if exp is None:
            known = sorted(e.name.removeprefix(EXPERIMENT_PREFIX)
                           for e in client.search_experiments()
                           if e.name.startswith(EXPERIMENT_PREFIX))
            listing = ", ".join(known) if known else "none"
            raise SweepNotFound(f"sweep {name!r}: not in {uri}; sweeps there: {listing}")
        infos = _search_all_runs(client, exp.experiment_id)
    except MlflowException as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepNotFound(f"--tracking-uri {uri}: cannot read the store ({first})") from None

    parents = [r for r in infos if r.data.tags.get("role") == "parent"]
    trials = [r for r in infos if r.data.tags.get("role") != "parent"]
    sweep = SweepRuns(name=name, experiment_id=exp.experiment_id, runs=runs_frame(trials))
    if parents:
        tags = parents[0].data.tags
        sweep.metric = tags.get("metric", DEFAULT_SELECTION_METRIC)
        sweep.mode = tags.get("mode", "max")
    else:
        sweep.notes.append(f"no parent run found: selecting by {sweep.metric} ({sweep.mode})")
    if sweep.mode not in ("max", "min"):
        raise SweepNotFound(f"sweep {name!r}: parent tag mode={sweep.mode!r}; allowed: max, min")
    return sweep


def _search_all_runs(client: Any, experiment_id: str) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def runs_frame(runs: Iterable[Any]) -> pd.DataFrame:
    """MLflow Run objects -> one row per run: identity tags, status, final metrics, factors."""
    rows = []
    for run in runs:
        tags = run.data.tags
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "trial_id": tags.get("trial_id", run.info.run_name),
            "cell": tags.get("cell"),
            "scenario": tags.get("scenario"),
            "method": tags.get("method"),
            "seed": tags.get("seed"),
            "phase": tags.get("phase", "tune"),
            "outcome": tags.get("outcome"),
            "error": tags.get("error"),
        }
        for param, column in SCENARIO_PARAMS.items():
            row[column] = run.data.params.get(param)
        # run.data.metrics holds each metric's latest value: the last step's.
        row.update(run.data.metrics)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else ["run_id", "run_name", "status",
                                                          "trial_id", "cell", "scenario",
                                                          "method", "seed", "phase", "outcome",
                                                          "error", *SCENARIO_PARAMS.values()])
    return normalise_runs(frame)


def normalise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Fill scenario/method from the cell tag when absent and make factors numeric."""
    runs = runs.copy()
    for column in ("scenario", "method", "cell", "outcome", "error", "phase", "status"):
        if column not in runs:
            runs[column] = None
    if len(runs):
        split = runs["cell"].fillna("").astype(str).str.partition("/")
        runs["scenario"] = runs["scenario"].where(runs["scenario"].notna(),
                                                  split[0].replace("", None))
        runs["method"] = runs["method"].where(runs["method"].notna(), split[2].replace("", None))
        runs["cell"] = runs["cell"].where(runs["cell"].notna(),
                                          runs["scenario"].astype(str) + "/" + runs["method"])
    runs["phase"] = runs["phase"].fillna("tune")
    for column in ("seed", "noise_rate", "imbalance_ratio", "eps", "eval_steps", "eval_eps"):
        if column in runs:
            runs[column] = pd.to_numeric(runs[column], errors="coerce")
    return runs


def load_classwise(uri: str, run_ids: Iterable[str]) -> dict[str, dict[str, list[float]]]:
    """classwise.json of each run (missing artifacts are skipped: the bars just leave a gap)."""
    client = open_client(resolve_tracking_uri(uri))
    out: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
        for run_id in run_ids:
            try:
                path = client.download_artifacts(run_id, "classwise.json", tmp)
                out[run_id] = json.loads(Path(path).read_text())
            except Exception:  # a missing artifact must not stop the analysis
                continue
    return out


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # MLflow draws a progress bar per artifact download, which would bury the notes.
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# ------------------------------------------------------------------------------- selection


STATES = ("completed", "pruned", "failed", "running", "interrupted")


def coverage(runs: pd.DataFrame) -> pd.DataFrame:
    """Per cell: how many trials completed, were pruned, failed, are running or interrupted."""
    state = runs["outcome"].where(runs["outcome"].isin(["completed", "pruned", "failed"]),
                                  "running")
    # No outcome yet: KILLED is a trial an interrupted driver left behind (a resume reopens
    # it); FAILED without an outcome died before the sweeper could tag it.
    state = state.mask(state.eq("running") & runs["status"].eq("KILLED"), "interrupted")
    state = state.mask(state.eq("running") & runs["status"].eq("FAILED"), "failed")
    table = pd.crosstab(runs["cell"], state)
    for column in STATES:
        if column not in table:
            table[column] = 0
    return table[list(STATES)]


def select_runs(runs: pd.DataFrame, metric: str, mode: str = "max") -> pd.DataFrame:
    """The runs that count, with a `source` column: `confirm` or `best tune`.

    Per cell: its completed confirmation runs when there are any (aggregated over seeds);
    otherwise the single completed tuning run with the best final `metric` (n = 1).
    Pruned, failed and running trials never count.
    """
    done = runs[runs["outcome"].eq("completed")]
    picked = []
    for _cell, group in done.groupby("cell", sort=True):
        confirm = group[group["phase"].eq("confirm")]
        if len(confirm):
            picked.append(confirm.assign(source="confirm"))
            continue
        tune = group[group["phase"].eq("tune")]
        if metric not in tune:
            continue
        tune = tune[np.isfinite(pd.to_numeric(tune[metric], errors="coerce"))]
        if not len(tune):
            continue
        # Ties go to the earlier trial id, so the pick does not depend on MLflow's order.
        tune = tune.sort_values([metric, "trial_id"], ascending=[mode == "min", True])
        picked.append(tune.iloc[[0]].assign(source="best tune"))
    if not picked:
        return runs.iloc[0:0].assign(source=pd.Series(dtype=object))
    return pd.concat(picked, ignore_index=True)


def aggregate(selected: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean, sample std (NaN for n = 1) and n over a cell's selected runs, per metric."""
    rows = []
    for (scenario, method), group in selected.groupby(["scenario", "method"], sort=False):
        for metric in metrics:
            values = pd.to_numeric(group.get(metric), errors="coerce").dropna().to_numpy(float)
            n = len(values)
            rows.append({
                "scenario": scenario, "method": method, "metric": metric,
                "mean": float(values.mean()) if n else math.nan,
                "std": float(values.std(ddof=1)) if n >= 2 else math.nan,
                "n": n, "source": group["source"].iloc[0],
            })
    return pd.DataFrame(rows, columns=["scenario", "method", "metric", "mean", "std", "n",
                                       "source"])


def paired_test(values: pd.Series, reference: pd.Series) -> dict[str, Any]:
    """Paired t-test of values - reference over the seeds both have (index = seed)."""
    from scipy import stats

    pairs = pd.concat([values.rename("a"), reference.rename("b")], axis=1).dropna()
    n = len(pairs)
    out: dict[str, Any] = {"n_pairs": n, "mean_diff": math.nan, "t": math.nan, "p": math.nan,
                           "note": ""}
    if n:
        out["mean_diff"] = float((pairs["a"] - pairs["b"]).mean())
    if n < 2:
        out["note"] = f"paired test needs >= 2 seeds run by both methods, have {n}"
        return out
    diff = (pairs["a"] - pairs["b"]).to_numpy(float)
    # Identical differences on every seed leave t undefined (0/0, or x/0 = inf with a
    # precision warning from scipy); report that instead of an infinite t.
    if diff.std(ddof=1) <= 1e-12 * max(1.0, abs(diff.mean())):
        out["note"] = "differences identical on every seed: t undefined"
        return out
    res = stats.ttest_rel(pairs["a"].to_numpy(float), pairs["b"].to_numpy(float))
    out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


def paired_tests(selected: pd.DataFrame, reference: str = REFERENCE,
                 metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Each method minus the reference in the same scenario, paired by seed, per metric."""
    rows = []
    for scenario, group in selected.groupby("scenario", sort=False):
        ref = group[group["method"].eq(reference)]
        for method, runs in group.groupby("method", sort=False):
            if method == reference:
                continue
            for metric in metrics:
                empty = {"n_pairs": 0, "mean_diff": math.nan, "t": math.nan, "p": math.nan}
                if not len(ref):
                    res = {**empty, "note": f"no {reference} runs in this scenario"}
                elif "best tune" in set(runs["source"]) | set(ref["source"]):
                    # A best tuning run's seed is whatever the search drew: pairing it with
                    # another cell's best run by seed would be an invented comparison.
                    res = {**empty, "note": "no confirmation runs (one best tuning run per "
                                            "cell): paired test not applicable"}
                else:
                    res = paired_test(_by_seed(runs, metric), _by_seed(ref, metric))
                rows.append({"scenario": scenario, "method": method, "metric": metric, **res})
    return pd.DataFrame(rows, columns=["scenario", "method", "metric", "mean_diff", "t", "p",
                                       "n_pairs", "note"])


def _by_seed(runs: pd.DataFrame, metric: str) -> pd.Series:
    values = pd.to_numeric(runs.get(metric), errors="coerce")
    series = pd.Series(values.to_numpy(float), index=runs["seed"].to_numpy())
    # Two runs with the same seed in one cell would make the pairing ambiguous; keep the last.
    return series[~series.index.duplicated(keep="last")]


def pareto_front(points: pd.DataFrame, x: str = "natural", y: str = "robust") -> pd.Series:
    """True for points no other point dominates (>= on both and > on one), within one set."""
    xs, ys = points[x].to_numpy(float), points[y].to_numpy(float)
    on_front = []
    for i in range(len(points)):
        dominated = np.any((xs >= xs[i]) & (ys >= ys[i]) & ((xs > xs[i]) | (ys > ys[i])))
        on_front.append(bool(np.isfinite(xs[i]) and np.isfinite(ys[i]) and not dominated))
    return pd.Series(on_front, index=points.index, name="pareto")


def pareto_by_scenario(agg: pd.DataFrame) -> pd.DataFrame:
    """(scenario, method) -> natural, robust means and whether it is on the scenario's front."""
    wide = agg.pivot_table(index=["scenario", "method"], columns="metric", values="mean",
                           dropna=False).reset_index()
    wide = wide.rename(columns={"test_natural_acc": "natural", "test_robust_acc": "robust"})
    for column in ("natural", "robust"):
        if column not in wide:
            wide[column] = math.nan
    wide["pareto"] = False
    for _scenario, group in wide.groupby("scenario", sort=False):
        wide.loc[group.index, "pareto"] = pareto_front(group)
    return wide[["scenario", "method", "natural", "robust", "pareto"]]


def best_flags(agg: pd.DataFrame) -> pd.Series:
    """True where a mean is the best of its scenario and metric (all ties marked)."""
    flags = pd.Series(False, index=agg.index, name="best")
    for (_scenario, metric), group in agg.groupby(["scenario", "metric"], sort=False):
        means = group["mean"].dropna()
        if not len(means):
            continue
        target = means.min() if metric in LOWER_IS_BETTER else means.max()
        flags.loc[means.index[means == target]] = True
    return flags


# ----------------------------------------------------------------------------- the summary


def method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


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

    agg = aggregate(selected)
    agg["best"] = best_flags(agg)
    front = pareto_by_scenario(agg)
    agg = agg.merge(front[["scenario", "method", "pareto"]], on=["scenario", "method"])
    tests = paired_tests(selected, reference)
    tidy = agg.merge(tests, on=["scenario", "method", "metric"], how="left")
    tidy["n_pairs"] = tidy["n_pairs"].astype("Int64")
    is_ref = tidy["method"].eq(reference)
    tidy.loc[is_ref, "note"] = "reference"

    if not selected["method"].eq(reference).any():
        notes.append(f"no {method_label(reference)} runs in this sweep: paired tests skipped")
    if selected["source"].eq("best tune").any():
        notes.append("cells without confirmation runs report their best tuning run (n = 1, by "
                     f"{sweep.metric}): std and paired tests are not applicable there")

    scenarios = scenario_table(selected)
    tidy = tidy.merge(scenarios, on="scenario", how="left")
    order_s = {s: i for i, s in enumerate(scenarios["scenario"])}
    tidy["_s"] = tidy["scenario"].map(order_s)
    tidy["_m"] = tidy["method"].map(method_key)
    tidy["_k"] = tidy["metric"].map(METRICS.index)
    tidy = tidy.sort_values(["_s", "_m", "_k"]).drop(columns=["_s", "_m", "_k"])
    columns = ["scenario", "noise_type", "noise_rate", "imbalance_ratio", "method", "metric",
               "mean", "std", "n", "source", "best", "pareto", "mean_diff", "t", "p", "n_pairs",
               "note"]
    tidy = tidy[columns].rename(columns={"mean_diff": f"diff_vs_{reference}",
                                         "note": "test_note"}).reset_index(drop=True)
    classwise = classwise_table(selected, sweep.classwise)
    directions, class_directions = direction_tables(sweep, selected)
    return Summary(tidy=tidy, selected=selected, scenarios=scenarios, classwise=classwise,
                   notes=notes, reference=reference, directions=directions,
                   class_directions=class_directions)


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
            parts = [f"{row[k]} {k}" for k in STATES[1:] if row[k]]
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


def classwise_table(selected: pd.DataFrame,
                    classwise: dict[str, dict[str, list[float]]]) -> pd.DataFrame:
    """Mean per-class test accuracies over a cell's selected runs (runs without the artifact
    are left out of that cell's mean)."""
    rows = []
    for (scenario, method), group in selected.groupby(["scenario", "method"], sort=False):
        lists = [classwise[r] for r in group["run_id"] if r in classwise]
        if not lists:
            continue
        for kind in ("natural", "robust"):
            key = f"test_class_{kind}_acc"
            arrays = [np.asarray(c[key], float) for c in lists if key in c]
            if not arrays or len({a.shape for a in arrays}) != 1:
                continue
            mean = np.mean(arrays, axis=0)
            for cls, value in enumerate(mean):
                rows.append({"scenario": scenario, "method": method, "kind": kind,
                             "class": cls, "mean": float(value), "n": len(arrays)})
    return pd.DataFrame(rows, columns=["scenario", "method", "kind", "class", "mean", "n"])


# ---------------------------------------------------------------------------------- tables


def _pct(value: float) -> str:
    return NA if value is None or pd.isna(value) else f"{100 * value:.2f}"


def _signed_pct(value: float) -> str:
    return NA if value is None or pd.isna(value) else f"{100 * value:+.2f}"


def _p(value: float) -> str:
    """'p=0.035' or 'p<0.001'; NA when there is no test."""
    if value is None or pd.isna(value):
        return NA
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


@dataclass
class _Block:
    """One scenario's table in a format-neutral form; the writers only add markup."""

    scenario: str
    description: str
    methods: list[str]
    n: list[str]  # "3", or "1 (tune)" for a cell reported by its best tuning run
    cells: list[list[tuple[str, str, bool]]]  # per method, per metric: (mean, std, best)
    pareto: list[bool]
    diffs: list[list[tuple[str, str]]]  # per non-reference method, per metric: (diff, p)
    diff_methods: list[str]
    diff_pairs: list[str]
    diff_notes: list[str]

    @property
    def has_diffs(self) -> bool:
        """Whether any difference from the reference could be computed (else: notes only)."""
        return any(d != NA for row in self.diffs for d, _ in row)


def _blocks(summary: Summary) -> list[_Block]:
    blocks = []
    tidy = summary.tidy
    ref = summary.reference
    diff_col = f"diff_vs_{ref}"
    for _, srow in summary.scenarios.iterrows():
        sub = tidy[tidy["scenario"].eq(srow["scenario"])]
        methods = sorted(sub["method"].unique(), key=method_key)
        block = _Block(scenario=srow["scenario"], description=describe_scenario(srow),
                       methods=methods, n=[], cells=[], pareto=[], diffs=[], diff_methods=[],
                       diff_pairs=[], diff_notes=[])
        by_note: dict[str, list[str]] = {}
        for method in methods:
            rows = sub[sub["method"].eq(method)].set_index("metric")
            best_tune = rows["source"].iloc[0] == "best tune"
            block.n.append(f"{int(rows['n'].iloc[0])}" + (" (tune)" if best_tune else ""))
            block.pareto.append(bool(rows["pareto"].iloc[0]))
            block.cells.append([(_pct(rows.at[m, "mean"]), _pct(rows.at[m, "std"]),
                                 bool(rows.at[m, "best"])) if m in rows.index else (NA, NA, False)
                                for m in METRICS])
            if method == ref:
                continue
            block.diff_methods.append(method)
            block.diff_pairs.append(str(int(rows["n_pairs"].iloc[0]))
                                    if not pd.isna(rows["n_pairs"].iloc[0]) else "0")
            block.diffs.append([(_signed_pct(rows.at[m, diff_col]), _p(rows.at[m, "p"]))
                                if m in rows.index else (NA, NA) for m in METRICS])
            for note in sorted({n for n in rows["test_note"].dropna() if n}):
                by_note.setdefault(note, []).append(method_label(method))
        block.diff_notes = [f"{', '.join(names)}: {note}" for note, names in by_note.items()]
        blocks.append(block)
    return blocks


def _value(mean: str, std: str) -> str:
    return mean if std == NA or mean == NA else f"{mean} ± {std}"


def _headers() -> list[str]:
    return [METRIC_LABELS[m] for m in METRICS]


def _caption(summary: Summary) -> str:
    return ("Test-set metrics in %: mean ± std over seeds (n runs). Best per column in bold "
            "(highest accuracy; lowest class std and boundary error). † = on the scenario's "
            "natural-vs-robust Pareto front. Differences from "
            f"{method_label(summary.reference)} are in percentage points, paired by seed, "
            "with the paired t-test's p-value.")


def to_markdown(summary: Summary, title: str = "") -> str:
    lines = [f"# {title}" if title else "# Summary", "", _caption(summary), ""]
    ref = method_label(summary.reference)
    for b in _blocks(summary):
        lines += [f"## {b.scenario}" + (f" ({b.description})" if b.description else ""), ""]
        lines.append("| method | n | " + " | ".join(_headers()) + " |")
        lines.append("|---|---:|" + "---:|" * len(METRICS))
        for i, method in enumerate(b.methods):
            name = method_label(method) + (" †" if b.pareto[i] else "")
            vals = [(f"**{_value(m, s)}**" if best else _value(m, s)) for m, s, best in b.cells[i]]
            lines.append(f"| {name} | {b.n[i]} | " + " | ".join(vals) + " |")
        lines.append("")
        if b.has_diffs:
            lines += [f"Difference from {ref} (pp; p of the paired t-test):", ""]
            lines.append("| method | pairs | " + " | ".join(_headers()) + " |")
            lines.append("|---|---:|" + "---:|" * len(METRICS))
            for method, pairs, diffs in zip(b.diff_methods, b.diff_pairs, b.diffs, strict=True):
                vals = [d if p == NA else f"{d} ({p})" for d, p in diffs]
                lines.append(f"| {method_label(method)} | {pairs} | " + " | ".join(vals) + " |")
            lines.append("")
        if b.diff_notes:
            prefix = "" if b.has_diffs else f"Difference from {ref}: "
            lines += [f"- {prefix}{n}" for n in b.diff_notes] + [""]
    if summary.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in summary.notes] + [""]
    return "\n".join(lines)


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "±": r"$\pm$", "†": r"$^\dagger$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(summary: Summary, title: str = "") -> str:
    """Two booktabs tables (results; differences from the reference), one block per scenario."""
    ncol = 2 + len(METRICS)
    spec = "l" + "r" * (ncol - 1)
    head = " & ".join(["Method", "$n$"] + [tex_escape(h) for h in _headers()]) + r" \\"
    blocks = _blocks(summary)
    ref = method_label(summary.reference)

    def table(caption: str, label: str, body: list[str], header: str) -> list[str]:
        return [r"\begin{table*}[t]", r"\centering", r"\small",
                rf"\caption{{{tex_escape(caption)}}}", rf"\label{{{label}}}",
                rf"\begin{{tabular}}{{{spec}}}", r"\toprule", header, *body,
                r"\bottomrule", r"\end{tabular}", r"\end{table*}", ""]

    body: list[str] = []
    for b in blocks:
        body += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{"
                 + tex_escape(b.scenario + (f" ({b.description})" if b.description else ""))
                 + r"}} \\", r"\midrule"]
        for i, method in enumerate(b.methods):
            name = tex_escape(method_label(method)) + (r"$^\dagger$" if b.pareto[i] else "")
            vals = []
            for m, s, best in b.cells[i]:
                v = m if s == NA or m == NA else rf"{m} $\pm$ {s}"
                vals.append(rf"\textbf{{{v}}}" if best else v)
            body.append(" & ".join([name, str(b.n[i]), *vals]) + r" \\")
    out = [f"% {tex_escape(title)}" if title else "% summary",
           "% needs \\usepackage{booktabs}", ""]
    out += table(_caption(summary), "tab:summary", body, head)

    diff_body: list[str] = []
    for b in blocks:
        if not b.has_diffs:
            continue
        diff_body += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{"
                      + tex_escape(b.scenario) + r"}} \\", r"\midrule"]
        for method, pairs, diffs in zip(b.diff_methods, b.diff_pairs, b.diffs, strict=True):
            # A typeset minus, not a hyphen.
            vals = [(d if p == NA else f"{d} (${p}$)").replace("-", "$-$", 1) for d, p in diffs]
            diff_body.append(" & ".join([tex_escape(method_label(method)), pairs, *vals])
                             + r" \\")
    if diff_body:
        diff_head = head.replace("$n$", "pairs")
        out += table(f"Difference from {ref} in percentage points (paired by seed) and the "
                     "p-value of the paired t-test; n/a: fewer than 2 paired seeds.",
                     "tab:vs-reference", diff_body, diff_head)
    # Why a value is n/a, per scenario, and what the sweep is missing: as comments, so the
    # file still compiles as is.
    notes = [f"{b.scenario}: {n}" for b in blocks for n in b.diff_notes] + summary.notes
    out += [f"% note: {n}" for n in notes]
    return "\n".join(out) + "\n"


def to_html(summary: Summary, title: str = "", plots: Sequence[str] = ()) -> str:
    """A standalone page: the tables, the notes and the plots (linked by relative path)."""
    esc = html.escape
    ref = method_label(summary.reference)
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'>",
             f"<title>{esc(title or 'Summary')}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
             "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "th:first-child,td:first-child{text-align:left}"
             "thead th{border-bottom:2px solid #333}img{max-width:100%;margin:1em 0}"
             ".note{color:#555}</style></head><body>",
             f"<h1>{esc(title or 'Summary')}</h1>", f"<p>{esc(_caption(summary))}</p>"]
    head = "".join(f"<th>{esc(h)}</th>" for h in ["method", "n", *_headers()])
    for b in _blocks(summary):
        parts.append(f"<h2>{esc(b.scenario)}"
                     + (f" <small>({esc(b.description)})</small>" if b.description else "")
                     + "</h2>")
        parts.append(f"<table class='summary'><thead><tr>{head}</tr></thead><tbody>")
        for i, method in enumerate(b.methods):
            name = esc(method_label(method)) + (" †" if b.pareto[i] else "")
            tds = "".join(f"<td>{'<b>' if best else ''}{esc(_value(m, s))}"
                          f"{'</b>' if best else ''}</td>" for m, s, best in b.cells[i])
            parts.append(f"<tr><td>{name}</td><td>{b.n[i]}</td>{tds}</tr>")
        parts.append("</tbody></table>")
        if b.has_diffs:
            parts.append(f"<p>Difference from {esc(ref)} (pp; p of the paired t-test):</p>")
            dhead = head.replace("<th>n</th>", "<th>pairs</th>", 1)
            parts.append(f"<table class='diff'><thead><tr>{dhead}</tr></thead><tbody>")
            for method, pairs, diffs in zip(b.diff_methods, b.diff_pairs, b.diffs, strict=True):
                tds = "".join(f"<td>{esc(d if p == NA else f'{d} ({p})')}</td>"
                              for d, p in diffs)
                parts.append(f"<tr><td>{esc(method_label(method))}</td><td>{pairs}</td>"
                             f"{tds}</tr>")
            parts.append("</tbody></table>")
        for note in b.diff_notes:
            prefix = "" if b.has_diffs else f"Difference from {ref}: "
            parts.append(f"<p class='note'>{esc(prefix + note)}</p>")
    if summary.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in summary.notes)
                     + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<img src='{esc(p)}' alt='{esc(p)}'>" for p in plots]
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------- plots


def _method_styles(methods: Iterable[str]) -> dict[str, dict[str, Any]]:
    """One colour and marker per method, the same in every plot."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    markers = "osD^vP*Xhp"
    ordered = sorted(set(methods), key=method_key)
    known = [m for m in METHOD_ORDER]
    styles = {}
    for i, method in enumerate(ordered):
        j = known.index(method) if method in known else len(known) + i
        styles[method] = {"color": colours[j % len(colours)], "marker": markers[j % len(markers)]}
    return styles


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "scenario"


def _wide_means(summary: Summary) -> tuple[pd.DataFrame, pd.DataFrame]:
    tidy = summary.tidy
    index = ["scenario", "method"]
    means = tidy.pivot_table(index=index, columns="metric", values="mean", dropna=False)
    stds = tidy.pivot_table(index=index, columns="metric", values="std", dropna=False)
    return means, stds


def _robust_label(summary: Summary) -> str:
    sel = summary.selected
    steps = sel["eval_steps"].dropna().unique() if "eval_steps" in sel else []
    eps = sel["eval_eps"].dropna().unique() if "eval_eps" in sel else []
    if len(steps) == 1 and len(eps) == 1:
        return f"robust accuracy, PGD-{int(steps[0])} eps={eps[0]:.3g} (%)"
    return "robust accuracy (%)"


def plot_tradeoff(summary: Summary, path: Path) -> Path:
    """Natural vs robust test accuracy, one panel per scenario, the Pareto front drawn."""
    import matplotlib.pyplot as plt

    means, stds = _wide_means(summary)
    scenarios = list(summary.scenarios["scenario"])
    styles = _method_styles(summary.tidy["method"])
    ncols = min(3, len(scenarios))
    nrows = math.ceil(len(scenarios) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.4 * nrows + 0.8),
                             squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (_, srow) in zip(axes.flat, summary.scenarios.iterrows(), strict=False):
        scenario = srow["scenario"]
        m = means.loc[scenario]
        s = stds.loc[scenario]
        for method in sorted(m.index, key=method_key):
            x = 100 * m.at[method, "test_natural_acc"]
            y = 100 * m.at[method, "test_robust_acc"]
            xe = 100 * s.at[method, "test_natural_acc"]
            ye = 100 * s.at[method, "test_robust_acc"]
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            h = ax.errorbar(x, y, xerr=xe if np.isfinite(xe) else None,
                            yerr=ye if np.isfinite(ye) else None, linestyle="none",
                            markersize=8, capsize=3, label=method_label(method),
                            **styles[method])
            handles.setdefault(method_label(method), h)
        front = summary.tidy[summary.tidy["scenario"].eq(scenario) & summary.tidy["pareto"]]
        fm = m.loc[sorted(front["method"].unique())]
        fm = fm.sort_values("test_natural_acc")
        if len(fm):
            (line,) = ax.plot(100 * fm["test_natural_acc"], 100 * fm["test_robust_acc"],
                              color="0.3", linestyle="--", linewidth=1.2, zorder=0,
                              marker="o", markersize=16, markerfacecolor="none",
                              markeredgecolor="0.5", label="Pareto front")
            handles.setdefault("Pareto front", line)
        desc = describe_scenario(srow)
        ax.set_title(f"{scenario}\n{desc}" if desc else scenario, fontsize=11)
        ax.set_xlabel("natural accuracy (%)")
        ax.set_ylabel(_robust_label(summary))
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        # A wide std bar must not stretch an axis past what an accuracy can be.
        ax.set_xlim(max(ax.get_xlim()[0], 0), min(ax.get_xlim()[1], 100))
        ax.set_ylim(max(ax.get_ylim()[0], 0), min(ax.get_ylim()[1], 100))
    for ax in list(axes.flat)[len(scenarios):]:
        ax.set_visible(False)
    fig.legend(handles.values(), handles.keys(), loc="lower center",
               ncol=min(len(handles), 8), frameon=False)
    fig.suptitle("Natural vs robust test accuracy (mean ± std over seeds; upper right is better)",
                 fontsize=12)
    # Leave half an inch at the bottom for the shared legend.
    fig.tight_layout(rect=(0, 0.5 / (4.4 * nrows + 0.8), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def class_names(dataset: Any, num_classes: int) -> list[str]:
    if dataset == "fashion_mnist" and num_classes == 10:
        return list(FASHION_MNIST_CLASSES)
    if dataset == "cifar10" and num_classes == 10:
        return list(CIFAR10_CLASSES)
    return [f"class {c}" for c in range(num_classes)]


def plot_classwise(summary: Summary, scenario: str, path: Path) -> Path | None:
    """Per-class natural and robust test accuracy, grouped bars per method."""
    import matplotlib.pyplot as plt

    data = summary.classwise[summary.classwise["scenario"].eq(scenario)]
    if not len(data):
        return None
    methods = sorted(data["method"].unique(), key=method_key)
    styles = _method_styles(summary.tidy["method"])
    num_classes = int(data["class"].max()) + 1
    srow = summary.scenarios.set_index("scenario").loc[scenario]
    names = class_names(srow.get("dataset"), num_classes)
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * num_classes + 2), 7.5), sharex=True)
    xs = np.arange(num_classes)
    for ax, kind in zip(axes, ("natural", "robust"), strict=True):
        for i, method in enumerate(methods):
            rows = data[data["method"].eq(method) & data["kind"].eq(kind)]
            values = np.full(num_classes, np.nan)
            values[rows["class"].to_numpy(int)] = 100 * rows["mean"].to_numpy(float)
            ax.bar(xs + (i - (len(methods) - 1) / 2) * width, values, width,
                   color=styles[method]["color"], label=method_label(method))
        ax.set_ylabel(f"{kind} accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{kind.capitalize()} test accuracy per class", fontsize=11, loc="left")
    axes[-1].set_xticks(xs, names, rotation=30 if num_classes > 6 else 0, ha="right"
                        if num_classes > 6 else "center")
    axes[-1].set_xlabel("class")
    axes[0].legend(ncol=min(len(methods), 7), loc="lower center", bbox_to_anchor=(0.5, 1.12),
                   frameon=False)
    return save_scenario_figure(fig, scenario, srow, "per-class accuracy, mean over seeds",
                                path)


def save_scenario_figure(fig: Any, scenario: str, srow: pd.Series, what: str,
                         path: Path) -> Path:
    """Title a one-scenario figure ("<scenario> (<its factors>): <what>"), save it, close it."""
    import matplotlib.pyplot as plt

    desc = describe_scenario(srow)
    fig.suptitle(f"{scenario}" + (f" ({desc})" if desc else "") + f": {what}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FACTORS = {"noise_rate": ("noise rate (%)", 100.0), "imbalance_ratio": ("imbalance ratio", 1.0)}


def varied_factors(scenarios: pd.DataFrame) -> list[str]:
    """The factors the sweep varies (>= 2 distinct known values)."""
    return [f for f in FACTORS if f in scenarios and scenarios[f].dropna().nunique() >= 2]


def factor_series(scenarios: pd.DataFrame, factor: str) -> dict[str, list[str]]:
    """Group scenarios into lines along `factor`: label -> scenarios, sorted by the factor.

    Scenarios sharing every other factor (and the bound eps, when it varies) form one line.
    A noise-free scenario joins the line of every noise type with its imbalance ratio (it is
    the rate-0 point of each). A group with two scenarios at the same value (they differ in
    something else) is no line and is left out.
    """
    table = scenarios.copy()
    clean = table["noise_rate"].fillna(0).eq(0) | table["noise_type"].eq("none")
    table.loc[clean, "noise_type"] = "none"
    eps = table["eps"].fillna(-1) if "eps" in table else pd.Series(-1.0, index=table.index)
    eps_label = {e: "" if e < 0 else f"eps {e:.3g}" for e in eps}
    groups: dict[str, list[str]] = {}

    def add(parts: tuple[str, ...], rows: pd.DataFrame) -> None:
        rows = rows.sort_values(factor)
        if rows[factor].nunique() >= 2 and not rows[factor].duplicated().any():
            groups[", ".join(p for p in parts if p)] = list(rows["scenario"])

    if factor == "noise_rate":
        kinds = sorted(set(table.loc[~clean, "noise_type"].dropna())) or ["none"]
        by = [table["imbalance_ratio"].fillna(-1), eps]
        for (ratio, e), rows in table.groupby(by, sort=True):
            imbalance = ("" if ratio < 0 else "balanced" if ratio == 1
                         else f"imbalance ratio {ratio:g}")
            for kind in kinds:
                add((f"{kind} noise" if kind != "none" else "", imbalance, eps_label[e]),
                    rows[rows["noise_type"].isin([kind, "none"])])
    else:
        by = [table["noise_type"], table["noise_rate"].fillna(0), eps]
        for (kind, rate, e), rows in table.groupby(by, sort=True):
            add(("no label noise" if kind == "none" else f"{kind} noise {100 * rate:g}%",
                 eps_label[e]), rows)
    return groups


def plot_vs_factor(summary: Summary, factor: str, path: Path) -> Path | None:
    """Accuracy and worst-class accuracy (natural and robust) against one scenario factor."""
    import matplotlib.pyplot as plt

    groups = factor_series(summary.scenarios, factor)
    if not groups:
        return None
    means, stds = _wide_means(summary)
    styles = _method_styles(summary.tidy["method"])
    xlabel, scale = FACTORS[factor]
    factors = summary.scenarios.set_index("scenario")[factor]
    linestyles = ["-", "--", ":", "-."]
    panels = [("test_natural_acc", "natural accuracy (%)"),
              ("test_worst_class_natural_acc", "worst-class natural accuracy (%)"),
              ("test_robust_acc", "robust accuracy (%)"),
              ("test_worst_class_robust_acc", "worst-class robust accuracy (%)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharex=True)
    handles: dict[str, Any] = {}
    methods = sorted(summary.tidy["method"].unique(), key=method_key)
    span = factors.max() - factors.min()
    for ax, (metric, ylabel) in zip(axes.flat, panels, strict=True):
        for g, (label, scenarios) in enumerate(groups.items()):
            for i, method in enumerate(methods):
                keys = [(s, method) for s in scenarios if (s, method) in means.index
                        and np.isfinite(means.at[(s, method), metric])]
                if not keys:
                    continue
                xs = np.array([factors[s] for s, _ in keys], float)
                # Dodge the methods sideways a little so that error bars do not overlap.
                dodge = i - (len(methods) - 1) / 2
                xs = xs * 1.03 ** dodge if factor == "imbalance_ratio" else (
                    xs + 0.006 * span * dodge)
                xs = xs * scale
                ys = 100 * means.loc[keys, metric].to_numpy(float)
                es = 100 * stds.loc[keys, metric].to_numpy(float)
                h = ax.errorbar(xs, ys, yerr=np.where(np.isfinite(es), es, 0), capsize=3,
                                linestyle=linestyles[g % len(linestyles)], markersize=6,
                                **styles[method])
                name = method_label(method) + (f" ({label})" if len(groups) > 1 else "")
                handles.setdefault(name, h)
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.removesuffix(" (%)").capitalize(), fontsize=11, loc="left")
        ax.grid(alpha=0.3)
        # Ticks at the swept values only: the sweep's grid, not matplotlib's.
        ticks = sorted(factors.dropna().unique())
        if factor == "imbalance_ratio":
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks([t * scale for t in ticks], [f"{t * scale:g}" for t in ticks])
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    fig.legend(handles.values(), handles.keys(), loc="lower center",
               ncol=min(len(handles), 4 if len(groups) > 1 else 7), frameon=False)
    where = "" if len(groups) > 1 else f" ({next(iter(groups))})"
    fig.suptitle(f"Test accuracy against {xlabel.split(' (')[0]}{where}; mean ± std over seeds",
                 fontsize=12)
    rows_legend = math.ceil(len(handles) / (4 if len(groups) > 1 else 7))
    fig.tight_layout(rect=(0, 0.035 * rows_legend + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


# --------------------------------------------------------------- CAAT direction diagnostics
#
# How CAAT splits its training samples between adversarial and anti-adversarial
# perturbations, epoch by epoch: MLflow metric histories and classwise.json -> tidy tables ->
# one plot per scenario (caat_directions_<scenario>.png). All of it lives in this section, so
# that it can move to a module of its own; outside it are only the hooks: the `directions`
# fields of SweepRuns and Summary, and one call each in summarize, write_plots and analyze.

DIRECTION_METHOD = "caat"
# Per-epoch scalars (step = epoch, 1-based) the plots read. The trainer logs more
# (meta_pref_noisy_auc, meta_grad_norm, meta_active_frac) that no plot shows yet.
DIRECTION_METRICS = ("frac_anti", "frac_anti_noisy", "frac_anti_clean", "anti_noisy_auc",
                     "meta_pref_noisy_auc")
DIRECTION_COLUMNS = ["run_id", "scenario", "method", "seed", "metric", "epoch", "value"]
# classwise.json: per-class lists by observed label (last epoch) and `<key>_by_epoch` histories.
CLASS_DIRECTION_KEYS = ("train_class_frac_anti", "train_class_mean_eps")
# `last`: the run's last epoch; `epoch` is NaN for a last-epoch list without its history.
CLASS_DIRECTION_COLUMNS = ["run_id", "scenario", "method", "seed", "metric", "epoch", "class",
                           "value", "last"]
_SHARES = {"frac_anti": ("all samples", "black"), "frac_anti_noisy": ("noisy labels", "tab:red"),
           "frac_anti_clean": ("clean labels", "tab:blue")}


def empty_directions() -> pd.DataFrame:
    return pd.DataFrame(columns=DIRECTION_COLUMNS)


def empty_class_directions() -> pd.DataFrame:
    return pd.DataFrame(columns=CLASS_DIRECTION_COLUMNS)


def load_directions(uri: str, selected: pd.DataFrame,
                    metrics: Sequence[str] = DIRECTION_METRICS) -> pd.DataFrame:
    """Per-epoch histories of `metrics` for the selected CAAT runs, one row per value
    (columns DIRECTION_COLUMNS). The only MLflow calls of this section."""
    client = open_client(resolve_tracking_uri(uri))
    rows = []
    runs = selected[selected["method"].eq(DIRECTION_METHOD)]
    for run_id, scenario, method, seed in zip(runs["run_id"], runs["scenario"], runs["method"],
                                              runs["seed"], strict=True):
        for metric in metrics:
            rows += [{"run_id": run_id, "scenario": scenario, "method": method, "seed": seed,
                      "metric": metric, "epoch": m.step, "value": m.value}
                     for m in client.get_metric_history(run_id, metric)]
    return direction_frame(rows)


def direction_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> the tidy history table, ordered by run, metric and epoch."""
    frame = pd.DataFrame(list(rows), columns=DIRECTION_COLUMNS)
    frame["epoch"] = frame["epoch"].astype(int)
    frame["value"] = frame["value"].astype(float)
    return frame.sort_values(["run_id", "metric", "epoch"], ignore_index=True)


def class_direction_table(selected: pd.DataFrame,
                          classwise: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The selected CAAT runs' per-class training diagnostics, one row per run x metric x
    epoch x class (columns CLASS_DIRECTION_COLUMNS; JSON null or NaN -> NaN)."""
    rows = []
    runs = selected[selected["method"].eq(DIRECTION_METHOD)]
    for run_id, scenario, method, seed in zip(runs["run_id"], runs["scenario"], runs["method"],
                                              runs["seed"], strict=True):
        lists = classwise.get(run_id, {})
        ident = {"run_id": run_id, "scenario": scenario, "method": method, "seed": seed}
        for key in CLASS_DIRECTION_KEYS:
            history = lists.get(f"{key}_by_epoch")
            if history:
                epochs = [(float(e), values, e == len(history))
                          for e, values in enumerate(history, start=1)]
            elif lists.get(key):
                epochs = [(math.nan, lists[key], True)]
            else:
                continue
            for epoch, values, last in epochs:
                rows += [{**ident, "metric": key, "epoch": epoch, "class": c, "value": v,
                          "last": last}
                         for c, v in enumerate(np.asarray(values, dtype=float))]
    frame = pd.DataFrame(rows, columns=CLASS_DIRECTION_COLUMNS)
    frame["value"] = frame["value"].astype(float)
    return frame


def direction_tables(sweep: SweepRuns, selected: pd.DataFrame) -> tuple[pd.DataFrame,
                                                                         pd.DataFrame]:
    """The histories of the selected runs (whatever `sweep.directions` holds besides) and
    their per-class diagnostics from `sweep.classwise`."""
    history = sweep.directions if sweep.directions is not None else empty_directions()
    history = history[history["run_id"].isin(selected["run_id"])].reset_index(drop=True)
    return history, class_direction_table(selected, sweep.classwise)


def direction_means(history: pd.DataFrame) -> pd.DataFrame:
    """Mean over a cell's runs per epoch (NaN values left out; n = the runs that count)."""
    values = history.dropna(subset=["value"])
    grouped = values.groupby(["scenario", "method", "metric", "epoch"], sort=True)["value"]
    return grouped.agg(mean="mean", n="count").reset_index()


def class_means_by_epoch(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """epoch x class: the mean over runs of a per-class diagnostic (NaN classes left out)."""
    rows = table[table["metric"].eq(metric) & table["epoch"].notna()]
    return rows.pivot_table(index="epoch", columns="class", values="value", aggfunc="mean",
                            dropna=False)


def class_means_at_last(table: pd.DataFrame, metric: str) -> pd.Series:
    """class -> the mean over runs of a per-class diagnostic at each run's last epoch."""
    rows = table[table["metric"].eq(metric) & table["last"].astype(bool)]
    return rows.groupby("class", sort=True)["value"].mean()


def _seed_lines(ax: Any, history: pd.DataFrame, metric: str, colour: Any, label: str,
                scale: float = 1.0) -> None:
    """Each run faint, the mean over runs bold (one run: just its line)."""
    rows = history[history["metric"].eq(metric)]
    if rows["run_id"].nunique() > 1:
        for _run, run in rows.groupby("run_id", sort=True):
            ax.plot(run["epoch"], scale * run["value"], color=colour, alpha=0.25, linewidth=1)
    means = direction_means(rows)
    n = int(means["n"].max()) if len(means) else 0
    ax.plot(means["epoch"], scale * means["mean"], color=colour, linewidth=2, marker="o",
            markersize=4, label=f"{label} (n={n})")


def _class_colours(num_classes: int) -> list[Any]:
    import matplotlib

    if num_classes <= 10:
        return list(matplotlib.colormaps["tab10"].colors[:num_classes])
    if num_classes <= 20:
        return list(matplotlib.colormaps["tab20"].colors[:num_classes])
    return [matplotlib.colormaps["viridis"](c / (num_classes - 1)) for c in range(num_classes)]


def _share_panel(ax: Any, history: pd.DataFrame) -> None:
    present = set(history["metric"])
    if "frac_anti_noisy" in present:
        metrics = [m for m in _SHARES if m in present]
    else:  # no label noise: the clean share is the overall share again
        metrics = ["frac_anti"] if "frac_anti" in present else ["frac_anti_clean"]
    for metric in metrics:
        label, colour = _SHARES[metric]
        _seed_lines(ax, history, metric, colour, label, scale=100.0)
    ax.set_ylabel("sent anti-adversarial (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Anti-adversarial share of training samples", fontsize=11, loc="left")
    ax.legend(fontsize=9, frameon=False)


def _auc_panel(ax: Any, history: pd.DataFrame) -> None:
    _seed_lines(ax, history, "anti_noisy_auc", "tab:purple", "anti score vs noisy label")
    if history["metric"].eq("meta_pref_noisy_auc").any():
        # What the meta objective itself prefers: the most the meta-net could learn.
        _seed_lines(ax, history, "meta_pref_noisy_auc", "tab:orange",
                    "meta objective's preference")
    ax.axhline(0.5, color="0.5", linestyle=":", linewidth=1, label="chance")
    ax.set_ylabel("ROC AUC")
    ax.set_ylim(0, 1)
    ax.set_title("Anti score as a detector of noisy labels", fontsize=11, loc="left")
    ax.legend(fontsize=9, frameon=False)


def _class_share_panel(ax: Any, by_epoch: pd.DataFrame, names: list[str]) -> None:
    colours = _class_colours(len(names))
    for c in by_epoch.columns:
        ax.plot(by_epoch.index, 100 * by_epoch[c], color=colours[int(c)], marker="o",
                markersize=3, linewidth=1.5, label=names[int(c)])
    ax.set_ylabel("sent anti-adversarial (%)")
    ax.set_ylim(-3, 103)
    ax.set_title("Anti-adversarial share per class (observed label)", fontsize=11, loc="left")
    if len(names) <= 20:
        ax.legend(fontsize=8, ncol=2, frameon=False)


def _class_eps_panel(ax: Any, last: pd.Series, names: list[str]) -> None:
    colours = _class_colours(len(names))
    classes = last.index.to_numpy(int)
    ax.bar(classes, last.to_numpy(float), color=[colours[c] for c in classes])
    ax.set_xticks(classes, [names[c] for c in classes], rotation=30 if len(names) > 6 else 0,
                  ha="right" if len(names) > 6 else "center")
    ax.set_ylabel("mean eps_i")
    ax.set_title("Mean perturbation bound per class, last epoch", fontsize=11, loc="left")


def plot_caat_directions(summary: Summary, scenario: str, path: Path) -> Path | None:
    """CAAT's anti-adversarial share over the epochs (noisy vs clean labels), the anti
    score's AUC for noisy labels and, under imbalance, the per-class share and bound.
    None (nothing written) when the scenario's CAAT runs logged none of it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = summary.directions[summary.directions["scenario"].eq(scenario)]
    history = history.dropna(subset=["value"])
    table = summary.class_directions[summary.class_directions["scenario"].eq(scenario)]
    srow = summary.scenarios.set_index("scenario").loc[scenario]
    panels: list[tuple[Any, bool]] = []  # (draw(ax), x axis is the epoch)
    shares = history[history["metric"].isin(list(_SHARES))]
    if len(shares):
        panels.append((lambda ax: _share_panel(ax, shares), True))
    auc = history[history["metric"].isin(["anti_noisy_auc", "meta_pref_noisy_auc"])]
    if len(auc):
        panels.append((lambda ax: _auc_panel(ax, auc), True))
    ratio = srow.get("imbalance_ratio")
    if ratio is not None and not pd.isna(ratio) and ratio > 1 and len(table):
        names = class_names(srow.get("dataset"), int(table["class"].max()) + 1)
        by_epoch = class_means_by_epoch(table, "train_class_frac_anti")
        if by_epoch.notna().any().any():
            panels.append((lambda ax: _class_share_panel(ax, by_epoch, names), True))
        last_eps = class_means_at_last(table, "train_class_mean_eps").dropna()
        if len(last_eps):
            panels.append((lambda ax: _class_eps_panel(ax, last_eps, names), False))
    if not panels:
        return None
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(8.0 if ncols == 1 else 12.0,
                                                    4.2 * nrows + 0.6), squeeze=False)
    for ax, (draw, over_epochs) in zip(axes.flat, panels, strict=False):
        draw(ax)
        ax.grid(alpha=0.3)
        if over_epochs:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return save_scenario_figure(fig, scenario, srow,
                                "CAAT's directions; mean over seeds, faint: each seed", path)


# ---------------------------------------------------------------------------------- driver


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
                        *METRICS) if c in summary.selected]
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
