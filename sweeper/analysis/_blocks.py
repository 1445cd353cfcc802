"""The summary's tables in a format-neutral form, their captions and the number formats they
share; the Markdown, LaTeX and HTML writers (`_render`, `_html`) only add markup.

Per scenario, one table per checkpoint: the last epoch's weights, then (when runs report
them) the best epoch's by validation. Each table has its results (mean [95% t-interval]),
where runs count their test images the binomial precision of one run (Wilson), and its
differences from the reference, which are one Holm family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from sweeper.analysis._model import (
    BEST_EPOCH,
    BEST_ONLY,
    METRICS,
    ROBUST_OVERFIT_GAP,
    Summary,
    best_name,
    is_autoattack,
    method_key,
    method_label,
)
from sweeper.analysis._summary import describe_scenario, robust_attack
from sweeper.contract import AUTOATTACK_METRICS

# Column headers of METRICS and AUTOATTACK_METRICS, in order; a best twin has its last
# metric's header (its table's title says which weights).
METRIC_LABELS = {
    **dict(zip(METRICS, ("natural", "robust", "worst-class natural", "worst-class robust",
                         "class std", "boundary error"), strict=True)),
    **dict(zip(AUTOATTACK_METRICS, ("AutoAttack", "worst-class AutoAttack", "PGD-AA gap"),
               strict=True)),
    ROBUST_OVERFIT_GAP: "robust overfitting gap", BEST_EPOCH: "best epoch"}
METRIC_LABELS.update({best_name(m): METRIC_LABELS[m] for m in (*METRICS, *AUTOATTACK_METRICS)})
# Shown in every table when a value cannot be computed; the notes say why.
NA = "n/a"
TITLES = {"last": "last epoch", "best": "best checkpoint (chosen on validation)"}


def pct(value: float) -> str:
    return NA if value is None or pd.isna(value) else f"{100 * value:.2f}"


def signed_pct(value: float) -> str:
    return NA if value is None or pd.isna(value) else f"{100 * value:+.2f}"


def _number(metric: str, value: float, signed: bool = False) -> str:
    """A table value: percent (points) for accuracies and gaps, epochs for the best epoch."""
    if metric == BEST_EPOCH:
        return NA if value is None or pd.isna(value) else f"{value:.1f}"
    return signed_pct(value) if signed else pct(value)


def p_text(value: float) -> str:
    """'p=0.035' or 'p<0.001'; NA when there is no test."""
    if value is None or pd.isna(value):
        return NA
    return "p<0.001" if value < 0.001 else f"p={value:.3f}"


def with_interval(mean: str, low: str, high: str) -> str:
    """'62.10 [58.30, 65.90]'; the mean alone where the interval is undefined (n = 1)."""
    return mean if NA in (mean, low, high) else f"{mean} [{low}, {high}]"


@dataclass
class Table:
    """One scenario's table of one checkpoint, in a format-neutral form."""

    checkpoint: str  # "last" | "best"
    metrics: tuple[str, ...]
    methods: list[str]
    n: list[str]  # "3", or "1 (tune)" for a cell reported by its best tuning run
    cells: list[list[tuple[str, bool]]]  # per method, per metric: (value [interval], best)
    pareto: list[bool]
    wilson_metrics: list[str] = field(default_factory=list)  # the columns with a Wilson interval
    wilson: list[list[str]] = field(default_factory=list)  # per method: "[lo, hi] of n"
    diff_metrics: tuple[str, ...] = ()
    diff_methods: list[str] = field(default_factory=list)
    diff_pairs: list[str] = field(default_factory=list)
    # Per non-reference method, per compared metric: (diff [interval], p, Holm's p).
    diffs: list[list[tuple[str, str, str]]] = field(default_factory=list)
    diff_notes: list[str] = field(default_factory=list)
    holm_n: int = 0  # comparisons in this table's Holm family

    @property
    def title(self) -> str:
        return TITLES[self.checkpoint]

    @property
    def has_diffs(self) -> bool:
        """Whether any difference from the reference could be computed (else: notes only)."""
        return any(d != NA for row in self.diffs for d, *_ in row)


@dataclass
class Block:
    scenario: str
    description: str
    tables: list[Table]


def headers(metrics: tuple[str, ...]) -> list[str]:
    return [METRIC_LABELS.get(m, m) for m in metrics]


def _cell(rows: pd.DataFrame, metric: str) -> tuple[str, bool]:
    if metric not in rows.index:
        return NA, False
    r = rows.loc[metric]
    if metric == BEST_EPOCH:
        # An epoch index: its mean over seeds says where the peak sits; a t-interval of
        # integers 1..E (negative at two seeds) would say nothing (summary.csv keeps it).
        return _number(metric, r["mean"]), False
    return (with_interval(_number(metric, r["mean"]), _number(metric, r["ci_low"]),
                          _number(metric, r["ci_high"])), bool(r["best"]))


def _wilson(rows: pd.DataFrame, metric: str) -> str:
    if metric not in rows.index or pd.isna(rows.at[metric, "wilson_n"]):
        return NA
    r = rows.loc[metric]
    return f"[{pct(r['wilson_low'])}, {pct(r['wilson_high'])}] of {int(r['wilson_n'])}"


def _diff(rows: pd.DataFrame, metric: str, diff_col: str) -> tuple[str, str, str]:
    if metric not in rows.index:
        return NA, NA, NA
    r = rows.loc[metric]
    diff = with_interval(signed_pct(r[diff_col]), signed_pct(r["diff_ci_low"]),
                         signed_pct(r["diff_ci_high"]))
    if pd.isna(r["p"]):
        return diff, NA, NA
    holm = "<0.001" if r["p_holm"] < 0.001 else f"{r['p_holm']:.3f}"
    return diff, p_text(r["p"]), holm


def diff_text(diff: str, p: str, holm: str) -> str:
    """'+1.23 [-0.50, +2.96] (p=0.035, Holm 0.210)'; the difference alone without a test."""
    return diff if p == NA else f"{diff} ({p}, Holm {holm})"


def _table(summary: Summary, sub: pd.DataFrame, checkpoint: str,
           metrics: tuple[str, ...]) -> Table:
    ref, diff_col = summary.reference, f"diff_vs_{summary.reference}"
    methods = sorted(sub["method"].unique(), key=method_key)
    table = Table(checkpoint=checkpoint, metrics=metrics, methods=methods, n=[], cells=[],
                  pareto=[], diff_metrics=tuple(m for m in metrics if m not in BEST_ONLY))
    table.wilson_metrics = [m for m in metrics if sub.loc[sub["metric"].eq(m), "wilson_n"]
                            .notna().any()]
    by_note: dict[str, list[str]] = {}
    for method in methods:
        rows = sub[sub["method"].eq(method)].set_index("metric")
        first = rows.loc[metrics[0]] if metrics[0] in rows.index else rows.iloc[0]
        best_tune = first["source"] == "best tune"
        table.n.append(f"{int(first['n'])}" + (" (tune)" if best_tune else ""))
        # The front is the last epoch's natural vs robust: no dagger on the best table.
        table.pareto.append(bool(first["pareto"]) and checkpoint == "last")
        table.cells.append([_cell(rows, m) for m in metrics])
        table.wilson.append([_wilson(rows, m) for m in table.wilson_metrics])
        if method == ref:
            continue
        compared = rows.loc[[m for m in table.diff_metrics if m in rows.index]]
        table.diff_methods.append(method)
        pairs = compared["n_pairs"].dropna()
        table.diff_pairs.append(str(int(pairs.iloc[0])) if len(pairs) else "0")
        table.diffs.append([_diff(rows, m, diff_col) for m in table.diff_metrics])
        table.holm_n = max([table.holm_n, *compared["holm_n"].dropna().astype(int)])
        for note in sorted({n for n in compared["test_note"].dropna() if n}):
            by_note.setdefault(note, []).append(method_label(method))
    table.diff_notes = [f"{', '.join(names)}: {note}" for note, names in by_note.items()]
    return table


def blocks(summary: Summary) -> list[Block]:
    out = []
    for _, srow in summary.scenarios.iterrows():
        sub = summary.tidy[summary.tidy["scenario"].eq(srow["scenario"])]
        tables = [_table(summary, sub, "last", summary.metrics)]
        if summary.best_metrics:
            tables.append(_table(summary, sub, "best", summary.best_metrics))
        out.append(Block(srow["scenario"], describe_scenario(srow), tables))
    return out


def caption(summary: Summary) -> str:
    ref = method_label(summary.reference)
    text = ("Test-set metrics in %: the mean over seeds and its 95% t-interval [low, high] "
            "(Student's t with n - 1 degrees of freedom over the cell's n runs; none for "
            "n = 1). Best per column in bold (highest accuracy; lowest class std, boundary "
            "error and gaps). † = on the scenario's natural-vs-robust Pareto front. "
            f"Differences from {ref} are in percentage points, paired by seed: the mean "
            "difference and its 95% t-interval over the paired seeds, the paired t-test's p, "
            "and p Holm-adjusted over the comparisons of that table (every method against "
            f"{ref} in every column of one scenario's table of one checkpoint; each table "
            "names its count). Robust: accuracy under "
            f"{robust_attack(summary.selected)}, in pixel space [0, 1].")
    if any(is_autoattack(m) for m in summary.metrics):
        text += (" AutoAttack: accuracy under AutoAttack on a fixed test subset; PGD-AA gap: "
                 "PGD's robust accuracy minus AutoAttack's on that subset (a large one means "
                 "gradient masking).")
    if "wilson_n" in summary.tidy and summary.tidy["wilson_n"].notna().any():
        text += (" Binomial precision (where runs count their test images): one run's "
                 "Wilson 95% interval at the cell's mean, on one run's images (of n): how "
                 "precisely a single evaluation measures it. The seeds are evaluated on the "
                 "same test images, so their counts are not pooled; it is no interval over "
                 "seeds. classwise.csv has both per class (ci_*: over seeds; wilson_*: one "
                 "run's count), classwise_runs.csv each run's Wilson interval per class, its "
                 "worst class marked.")
    if summary.best_metrics:
        text += (" Best checkpoint: each run's weights of its best epoch by a validation "
                 "metric, on the same test images; robust overfitting gap: its robust "
                 "accuracy minus the last epoch's.")
    return text


def diff_intro(table: Table, ref: str) -> str:
    return (f"Difference from {ref} (pp; mean [95% t-interval] over paired seeds, p of the "
            f"paired t-test, Holm-adjusted over {table.holm_n} comparisons in this table):")


WILSON_INTRO = ("One run's binomial precision (Wilson 95% at the cell mean, on one run's n "
                "test images; not an interval over seeds):")

