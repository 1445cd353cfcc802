"""The trade-off plots: natural vs robust per scenario, per-class accuracy, accuracy against a
scenario factor; and the helpers every plot shares (method styles, class names, titles)."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeper.analysis._classwise import CLASSWISE_KINDS
from sweeper.analysis._model import METHOD_ORDER, Summary, method_key, method_label
from sweeper.analysis._summary import describe_scenario, pgd_setting

# The class-wise plot's panels: natural and robust (PGD) always, AutoAttack where runs ran it.
_PANEL_TITLES = {"natural": "Natural test accuracy per class",
                 "robust": "Robust test accuracy per class",
                 "autoattack": "AutoAttack test accuracy per class (its test subset)"}

FASHION_MNIST_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Boot")
CIFAR10_CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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


def fit_title(fig: Any, text: str, fontsize: float = 12) -> Any:
    """`fig.suptitle(text)`, wrapped to the figure's width: a one-panel figure is narrower
    than most titles, and matplotlib cuts a long suptitle off at both edges."""
    # An average glyph is about 0.55 em wide; keep a 10% margin.
    per_line = max(20, int(0.9 * fig.get_figwidth() * 72 / (0.55 * fontsize)))
    return fig.suptitle(textwrap.fill(text, per_line), fontsize=fontsize)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "scenario"


def _wide_means(summary: Summary) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(scenario, method) x metric: the means and their t-interval's bounds over seeds."""
    tidy = summary.tidy
    index = ["scenario", "method"]
    return tuple(tidy.pivot_table(index=index, columns="metric", values=v, dropna=False)
                 for v in ("mean", "ci_low", "ci_high"))


def error_bar(mean: Any, low: Any, high: Any) -> np.ndarray | None:
    """matplotlib's asymmetric error bar (2 x k: below, above) of t-interval bounds around
    their means; None when no bound is finite (n = 1), a missing bound drawn as 0."""
    mean, low, high = (np.atleast_1d(np.asarray(v, float)) for v in (mean, low, high))
    if not (np.isfinite(low) | np.isfinite(high)).any():
        return None
    return np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0)


def _robust_label(summary: Summary) -> str:
    setting = pgd_setting(summary.selected)
    if setting is None:
        return "robust accuracy (%)"
    return f"robust accuracy, PGD-{setting[0]} eps={setting[1]:.3g} (%)"


def plot_tradeoff(summary: Summary, path: Path) -> Path:
    """Natural vs robust test accuracy, one panel per scenario, the Pareto front drawn."""
    import matplotlib.pyplot as plt

    means, lows, highs = _wide_means(summary)
    scenarios = list(summary.scenarios["scenario"])
    styles = _method_styles(summary.tidy["method"])
    ncols = min(3, len(scenarios))
    nrows = math.ceil(len(scenarios) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.4 * nrows + 0.8),
                             squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (_, srow) in zip(axes.flat, summary.scenarios.iterrows(), strict=False):
        scenario = srow["scenario"]
        m, lo, hi = (frame.loc[scenario] for frame in (means, lows, highs))
        for method in sorted(m.index, key=method_key):
            x, y = (100 * m.at[method, k] for k in ("test_natural_acc", "test_robust_acc"))
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            xe, ye = (error_bar(100 * m.at[method, k], 100 * lo.at[method, k],
                                100 * hi.at[method, k])
                      for k in ("test_natural_acc", "test_robust_acc"))
            h = ax.errorbar(x, y, xerr=xe, yerr=ye, linestyle="none", markersize=8, capsize=3,
                            label=method_label(method), **styles[method])
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
        # A wide interval (n = 2 has t = 12.7) must not stretch an axis past what an
        # accuracy can be.
        ax.set_xlim(max(ax.get_xlim()[0], 0), min(ax.get_xlim()[1], 100))
        ax.set_ylim(max(ax.get_ylim()[0], 0), min(ax.get_ylim()[1], 100))
        if not any(np.isfinite(m.get("test_natural_acc", pd.Series(dtype=float)))):
            # Mid-sweep: the selected runs are tuning runs that skipped the test split.
            ax.text(0.5, 0.5, "no test metrics yet\n(confirmation pending)", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
    for ax in list(axes.flat)[len(scenarios):]:
        ax.set_visible(False)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center",
                   ncol=min(len(handles), 8), frameon=False)
    fit_title(fig, "Natural vs robust test accuracy (mean and 95% t-interval over seeds; "
              "upper right is better)")
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
    """Per-class natural and robust (and AutoAttack) test accuracy, grouped bars per method."""
    import matplotlib.pyplot as plt

    # The last epoch's weights, like the tables' first block.
    data = summary.classwise[summary.classwise["scenario"].eq(scenario)
                             & summary.classwise["checkpoint"].eq("last")]
    if not len(data):
        return None
    methods = sorted(data["method"].unique(), key=method_key)
    styles = _method_styles(summary.tidy["method"])
    num_classes = int(data["class"].max()) + 1
    srow = summary.scenarios.set_index("scenario").loc[scenario]
    names = class_names(srow.get("dataset"), num_classes)
    width = 0.8 / len(methods)
    kinds = [k for k in CLASSWISE_KINDS if k != "autoattack" or data["kind"].eq(k).any()]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(8.0, 0.9 * num_classes + 2),
                                                     3.75 * len(kinds)), sharex=True)
    xs = np.arange(num_classes)
    for ax, kind in zip(axes, kinds, strict=True):
        for i, method in enumerate(methods):
            rows = data[data["method"].eq(method) & data["kind"].eq(kind)]
            values, low, high = (np.full(num_classes, np.nan) for _ in range(3))
            at = rows["class"].to_numpy(int)
            for into, column in ((values, "mean"), (low, "ci_low"), (high, "ci_high")):
                into[at] = 100 * rows[column].to_numpy(float)
            # The 95% t-interval over seeds of each class's mean (none for one seed).
            ax.bar(xs + (i - (len(methods) - 1) / 2) * width, values, width,
                   yerr=error_bar(values, low, high), capsize=2, error_kw={"lw": 0.8},
                   color=styles[method]["color"], label=method_label(method))
        ax.set_ylabel(f"{kind} accuracy (%)" if kind != "autoattack" else "AutoAttack (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(_PANEL_TITLES[kind], fontsize=11, loc="left")
    axes[-1].set_xticks(xs, names, rotation=30 if num_classes > 6 else 0, ha="right"
                        if num_classes > 6 else "center")
    axes[-1].set_xlabel("class")
    axes[0].legend(ncol=min(len(methods), 7), loc="lower center", bbox_to_anchor=(0.5, 1.12),
                   frameon=False)
    return save_scenario_figure(fig, scenario, srow, "per-class accuracy, mean over seeds "
                                "and its 95% t-interval", path)


def save_scenario_figure(fig: Any, scenario: str, srow: pd.Series, what: str,
                         path: Path) -> Path:
    """Title a one-scenario figure ("<scenario> (<its factors>): <what>"), save it, close it."""
    import matplotlib.pyplot as plt

    desc = describe_scenario(srow)
    fit_title(fig, f"{scenario}" + (f" ({desc})" if desc else "") + f": {what}")
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
    means, lows, highs = _wide_means(summary)
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
                es = error_bar(ys, 100 * lows.loc[keys, metric].to_numpy(float),
                               100 * highs.loc[keys, metric].to_numpy(float))
                h = ax.errorbar(xs, ys, yerr=es, capsize=3,
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
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center",
                   ncol=min(len(handles), 4 if len(groups) > 1 else 7), frameon=False)
    where = "" if len(groups) > 1 else f" ({next(iter(groups))})"
    fit_title(fig, f"Test accuracy against {xlabel.split(' (')[0]}{where}; mean and 95% "
              "t-interval over seeds")
    rows_legend = math.ceil(len(handles) / (4 if len(groups) > 1 else 7))
    fig.tight_layout(rect=(0, 0.035 * rows_legend + 0.01, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
