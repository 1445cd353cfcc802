"""CAAT's direction diagnostics, one plot per scenario (caat_directions_<scenario>.png): the
anti-adversarial share over the epochs (noisy vs clean labels), the anti score's AUC for
noisy labels and, under imbalance, the per-class share and bound."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from sweeper.analysis._directions import (
    class_means_at_last,
    class_means_by_epoch,
    direction_means,
)
from sweeper.analysis._model import Summary
from sweeper.analysis._plots import class_names, save_scenario_figure

_SHARES = {"frac_anti": ("all samples", "black"), "frac_anti_noisy": ("noisy labels", "tab:red"),
           "frac_anti_clean": ("clean labels", "tab:blue")}


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
