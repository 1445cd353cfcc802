"""The reviewer's checklist: what a reviewer of robust-training results asks first, answered
from the sweep's own runs. Each item is met, not met, or unknown (its runs cannot tell), with
the figure behind the verdict; `caat-sweep analyze` prints it and summary.md / .html open
with it.

Each item is a small function of plain data (the selected runs with their config params,
the tidy table, the runs' class-wise lists), so each can be tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from sweeper.analysis._classwise import autoattack_images, split_images
from sweeper.analysis._intervals import min_detectable_difference
from sweeper.analysis._model import (
    BEST_EPOCH,
    BEST_METRICS,
    MASKING_GAP,
    ROBUST_OVERFIT_GAP,
    CheckItem,
    method_key,
    method_label,
)
from sweeper.analysis._stats import numeric
from sweeper.contract import PGD_AUTOATTACK_GAP

CHECKLIST_TITLE = "Reviewer's checklist"
MET, NOT_MET, UNKNOWN = "met", "not met", "unknown"
MIN_SEEDS = 3
# The headline metrics whose smallest detectable difference the checklist reports.
HEADLINE = (("test_robust_acc", "robust"), ("test_worst_class_robust_acc", "worst-class robust"))
# A reviewer's yardstick for "the seeds can resolve a difference": improvements claimed for
# robust-training methods are often 1-2 accuracy points, so seeds that cannot detect 1 point
# cannot support such a claim either way.
DETECTABLE_TARGET = 0.01
_NONE = {"", "none", "nan"}


def _pts(value: float) -> str:
    return f"{100 * value:.2f}"


def _given(value: object) -> bool:
    """Whether a logged param holds a value (params are strings; None is logged as "None")."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) \
        and str(value).strip().lower() not in _NONE


def _listed(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _tested(selected: pd.DataFrame) -> pd.DataFrame:
    """The selected runs that carry test metrics (a tuning run may have skipped the split)."""
    return selected[numeric(selected, "test_natural_acc").notna()]


def selection_item(objectives: Sequence[tuple[str, str]], selected: pd.DataFrame) -> CheckItem:
    """Configs and checkpoints chosen on validation metrics only (never on test)."""
    chosen = list(dict.fromkeys(objectives))
    figure = "configs chosen by " + ", ".join(f"{m} ({mode})" for m, mode in chosen)
    keep = selected.get("eval_keep_best", pd.Series(dtype=object))
    best = selected.get("eval_best_metric", pd.Series(dtype=object))
    keeping = [b for k, b in zip(keep.reindex(selected.index), best.reindex(selected.index),
                                 strict=True) if str(k).lower() != "false" and _given(b)]
    used = sorted(set(map(str, keeping)))
    figure += ("; best checkpoint by " + ", ".join(used) if used
               else "; checkpoints: no eval.best_metric recorded (last epoch)")
    bad = [m for m, _ in chosen if not m.startswith("val_")] + [
        m for m in used if not m.startswith("val_")]
    return CheckItem("selection on validation only", NOT_MET if bad else MET,
                     figure + (f"; not validation: {', '.join(bad)}" if bad else ""))


def seeds_item(tidy: pd.DataFrame) -> CheckItem:
    """Seeds per cell: the fewest over cells of the headline metric's n (met at >= 3)."""
    rows = tidy[tidy["metric"].eq("test_robust_acc")]
    if not len(rows):
        return CheckItem("seeds per cell", UNKNOWN, "no cell reports test_robust_acc")
    n = rows["n"].astype(int)
    few = [f"{r.scenario}/{r.method}" for r in rows.itertuples() if r.n < MIN_SEEDS]
    figure = (f"min {n.min()}, max {n.max()} over {len(rows)} cells ({MIN_SEEDS} needed)"
              + (f"; fewer in {_listed(few)}" if few else ""))
    return CheckItem("seeds per cell", MET if n.min() >= MIN_SEEDS else NOT_MET, figure)


def _span(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:g}" if low == high else f"{low:g}-{high:g}"


def autoattack_item(selected: pd.DataFrame, classwise: Mapping[str, Mapping[str, list]],
                    ) -> CheckItem:
    """AutoAttack's version and images: met when every tested run ran `standard` on the
    whole test split."""
    name = "AutoAttack version and images"
    tested = _tested(selected)
    ran = tested[numeric(tested, "test_autoattack_acc").notna()]
    if not len(ran):
        return CheckItem(name, NOT_MET, "not run (eval.autoattack: none): robustness rests on "
                                        "PGD alone")
    versions = [str(v) if _given(v) else "unknown version"
                for v in ran.get("eval_autoattack", pd.Series(None, index=ran.index))]
    lists = [classwise.get(r, {}) for r in ran["run_id"]]
    images = [autoattack_images(x) for x in lists]
    split = [split_images(x) for x in lists]
    figure = "/".join(sorted(set(versions)))
    if all(np.isfinite(images)) and all(np.isfinite(split)):
        figure += f" on {_span(images)} of {_span(split)} test images"
    else:
        figure += (" on an unknown number of test images (runs without "
                   "test_class_autoattack_count or test_class_count)")
    figure += f", in {len(ran)} of {len(tested)} runs"
    short = any(i < s for i, s in zip(images, split, strict=True))
    if short or len(ran) < len(tested) or any(v not in ("standard", "unknown version")
                                              for v in versions):
        status = NOT_MET
    elif "unknown version" in versions or not (all(np.isfinite(images))
                                               and all(np.isfinite(split))):
        status = UNKNOWN
    else:
        status = MET
    return CheckItem(name, status, figure)


def gap_item(tidy: pd.DataFrame) -> CheckItem:
    """The largest mean PGD - AutoAttack gap over cells: met when no cell exceeds the
    masking alarm's MASKING_GAP (the alarm's rule, so that the two never disagree)."""
    name = "PGD-AutoAttack gap"
    rows = tidy[tidy["metric"].eq(PGD_AUTOATTACK_GAP) & tidy["mean"].notna()]
    if not len(rows):
        return CheckItem(name, UNKNOWN, "no AutoAttack results: gradient masking not checked")
    top = rows.loc[rows["mean"].idxmax()]
    status = MET if top["mean"] <= MASKING_GAP + 1e-9 else NOT_MET
    return CheckItem(name, status, f"largest {_pts(top['mean'])} points "
                                   f"({top['scenario']}/{top['method']}, mean of "
                                   f"{int(top['n'])} runs; masking alarm above "
                                   f"{_pts(MASKING_GAP)})")


def budget_item(selected: pd.DataFrame) -> CheckItem:
    """Training epochs per method (init.erm_epochs + optim.epochs): met when equal across the
    methods of each scenario; a warm start from init.checkpoint has epochs nobody recorded."""
    name = "training budget per method"
    tested = _tested(selected)
    erm, epochs = numeric(tested, "init_erm_epochs"), numeric(tested, "optim_epochs")
    if not len(tested) or erm.isna().any() or epochs.isna().any():
        return CheckItem(name, UNKNOWN, "runs without init.erm_epochs or optim.epochs params")
    total = (erm + epochs).astype(int)
    warm = tested.get("init_checkpoint", pd.Series(None, index=tested.index)).map(_given)
    unequal, per_scenario = [], {}
    for scenario, runs in tested.assign(total=total).groupby("scenario", sort=False):
        by_method = runs.groupby("method")["total"].agg(lambda t: sorted(set(t)))
        per_scenario[scenario] = sorted({t for ts in by_method for t in ts})
        if len(per_scenario[scenario]) > 1:
            unequal.append(f"{scenario}: " + ", ".join(
                f"{method_label(m)} {'/'.join(map(str, by_method[m]))}"
                for m in sorted(by_method.index, key=method_key)))
    warm_methods = sorted(set(tested.loc[warm, "method"]), key=method_key)
    if unequal:
        figure, status = "; ".join(unequal) + " epochs", NOT_MET
    else:
        totals = {tuple(t) for t in per_scenario.values()}
        figure = (f"{per_scenario[next(iter(per_scenario))][0]} epochs for every method"
                  if len(totals) == 1 else "equal within each scenario: " + "; ".join(
                      f"{s} {t[0]}" for s, t in per_scenario.items()) + " epochs")
        status = UNKNOWN if warm_methods else MET
    figure += " (init.erm_epochs + optim.epochs)"
    if warm_methods:
        figure += (f"; {', '.join(map(method_label, warm_methods))} start from init.checkpoint:"
                   " the warm start's epochs are unknown")
    return CheckItem(name, status, figure)


def best_last_item(selected: pd.DataFrame, tidy: pd.DataFrame) -> CheckItem:
    """Best (by validation) and last checkpoints both reported: met when every tested run
    carries best_epoch and test_best_* metrics."""
    name = "best and last checkpoints reported"
    tested = _tested(selected)
    if not len(tested):
        return CheckItem(name, UNKNOWN, "no run with test metrics yet")
    best = [m for m in BEST_METRICS if m in tested]
    has = numeric(tested, BEST_EPOCH).notna() & (
        tested[best].apply(pd.to_numeric, errors="coerce").notna().any(axis=1) if best
        else False)
    figure = f"both in {int(has.sum())} of {len(tested)} runs"
    gaps = tidy[tidy["metric"].eq(ROBUST_OVERFIT_GAP) & tidy["mean"].notna()]
    if len(gaps):
        top = gaps.loc[gaps["mean"].idxmax()]
        figure += (f"; largest robust-overfitting gap (best - last robust accuracy) "
                   f"{_pts(top['mean'])} points ({top['scenario']}/{top['method']})")
    if not has.any():
        figure = "last epoch only: runs carry no best_epoch / test_best_* metrics"
    return CheckItem(name, MET if has.all() else NOT_MET, figure)


def detectable_item(tidy: pd.DataFrame, reference: str) -> CheckItem:
    """The smallest difference the seeds could detect (two-sided t, alpha 0.05, power 80%),
    in points, for the headline metrics: the largest over the paired comparisons with the
    reference; without any, two samples of a cell's n and observed std. Met when that is at
    most DETECTABLE_TARGET for every headline metric."""
    name = "smallest detectable difference"
    parts, worst = [], []
    for metric, label in HEADLINE:
        rows = tidy[tidy["metric"].eq(metric)]
        paired = rows["min_detectable_diff"].dropna() if len(rows) else pd.Series(dtype=float)
        if len(paired):
            worst.append(paired.max())
            parts.append(f"{label} {_pts(paired.max())} points (largest of {len(paired)} "
                         f"paired comparisons with {method_label(reference)}, smallest "
                         f"{_pts(paired.min())})")
            continue
        two = [min_detectable_difference(r.std, int(r.n), paired=False)
               for r in rows.itertuples() if r.n >= 2]
        two = [v for v in two if np.isfinite(v)]
        if two:
            worst.append(max(two))
            parts.append(f"{label} {_pts(max(two))} points (largest over {len(two)} cells, "
                         "two samples of a cell's seeds: no paired comparison)")
    if not parts:
        return CheckItem(name, UNKNOWN, "fewer than 2 seeds in every cell: no test possible")
    # Met needs every headline metric's figure; one too large is enough for not met.
    status = (NOT_MET if max(worst) > DETECTABLE_TARGET + 1e-12
              else MET if len(worst) == len(HEADLINE) else UNKNOWN)
    return CheckItem(name, status, "; ".join(parts) + " at 80% power, two-sided alpha 0.05 "
                     f"(yardstick: {_pts(DETECTABLE_TARGET)} points)")


def build_checklist(objectives: Sequence[tuple[str, str]], selected: pd.DataFrame,
                    tidy: pd.DataFrame, classwise: Mapping[str, Mapping[str, list]],
                    reference: str) -> list[CheckItem]:
    """Every item, in the order a reviewer reads them."""
    return [selection_item(objectives, selected), seeds_item(tidy),
            autoattack_item(selected, classwise), gap_item(tidy), budget_item(selected),
            best_last_item(selected, tidy), detectable_item(tidy, reference)]


def checklist_lines(items: Sequence[CheckItem]) -> list[str]:
    return [item.line() for item in items]
