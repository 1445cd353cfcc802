"""What a reviewer accepts, end to end on a synthetic sweep (no Ray, no MLflow): intervals on
every number (t over seeds, Wilson of one run, paired differences with Holm per table), the
best and last checkpoints, and the reviewer's checklist at the top of summary.md / .html.
Expected numbers come from scipy / statsmodels or by hand, never from the code under test."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.proportion import proportion_confint

from sweeper.analysis import SweepRuns, normalise_runs, summarize, write_outputs
from sweeper.analysis._checklist import (
    autoattack_item,
    budget_item,
    detectable_item,
    gap_item,
    seeds_item,
    selection_item,
)
from sweeper.analysis._plots import error_bar

METHODS = ("pgd_at", "trades", "caat")
SEEDS = (0, 1, 2)
CLASSES = 10
PER_CLASS = 100  # test images per class: a 1000-image test split
# Last-epoch robust accuracy per method and seed; the best checkpoint is robust-overfitting's
# undoing: PGD-AT's is 3 points better, CAAT's 1, TRADES's 2 (varying a little by seed).
ROBUST = {"pgd_at": (.40, .42, .41), "trades": (.45, .44, .46), "caat": (.47, .47, .49)}
OVERFIT = {"pgd_at": (.03, .04, .02), "trades": (.02, .02, .03), "caat": (.01, .00, .01)}
NATURAL = {"pgd_at": (.80, .79, .81), "trades": (.82, .84, .83), "caat": (.85, .84, .86)}
GAP = {"pgd_at": (.01, .02, .01), "trades": (.01, .01, .00), "caat": (.02, .01, .02)}


def class_list(mean: float, seed: int) -> list[float]:
    """Per-class accuracies (whole images out of PER_CLASS) around `mean`; class 0 lowest."""
    return [round(mean + 0.02 * (c - 4.5) + 0.01 * ((seed + c) % 2), 2) for c in range(CLASSES)]


def run_row(method: str, seed: int, **params) -> dict:
    robust, natural = ROBUST[method][seed], NATURAL[method][seed]
    best = robust + OVERFIT[method][seed]
    aa = robust - GAP[method][seed]
    row = {"run_id": f"r-{method}-{seed}", "trial_id": f"{method}-{seed}",
           "cell": f"clean/{method}", "scenario": "clean", "method": method, "seed": seed,
           "phase": "confirm", "outcome": "completed", "status": "FINISHED", "error": None,
           "noise_type": "none", "noise_rate": 0.0, "imbalance_ratio": 1.0,
           "eval_steps": 10, "eval_eps": 0.1,
           "eval_autoattack": "standard", "init_erm_epochs": 0, "optim_epochs": 10,
           "init_checkpoint": "None", "eval_keep_best": "True",
           "eval_best_metric": "val_robust_acc", "val_robust_acc": robust}
    for prefix, rob in (("test_", robust), ("test_best_", best)):
        rob_list, nat_list = class_list(rob, seed), class_list(natural, seed)
        row.update({f"{prefix}natural_acc": natural, f"{prefix}robust_acc": rob,
                    f"{prefix}worst_class_natural_acc": min(nat_list),
                    f"{prefix}worst_class_robust_acc": min(rob_list),
                    f"{prefix}class_natural_acc_std": 0.03, f"{prefix}boundary_error":
                    natural - rob})
    row.update({"test_autoattack_acc": aa, "test_worst_class_autoattack_acc": min(
        class_list(aa, seed)), "test_pgd_autoattack_gap": GAP[method][seed],
        "best_epoch": 6 + seed})
    row.update(params)
    return row


def classwise_lists(row: dict, counts: bool = True) -> dict:
    seed = row["seed"]
    lists = {}
    for prefix in ("test_", "test_best_") if "test_best_robust_acc" in row else ("test_",):
        lists[f"{prefix}class_natural_acc"] = class_list(row[f"{prefix}natural_acc"], seed)
        lists[f"{prefix}class_robust_acc"] = class_list(row[f"{prefix}robust_acc"], seed)
    lists["test_class_autoattack_acc"] = class_list(row["test_autoattack_acc"], seed)
    if counts:
        lists["test_class_count"] = [PER_CLASS] * CLASSES
        lists["test_class_autoattack_count"] = [PER_CLASS] * CLASSES
    return lists


def sweep_of(rows: list[dict], counts=lambda row: True) -> SweepRuns:
    runs = normalise_runs(pd.DataFrame(rows))
    return SweepRuns(name="rev", experiment_id="1", runs=runs, metric="val_robust_acc",
                     objectives=[("val_robust_acc", "max")],
                     classwise={r["run_id"]: classwise_lists(r, counts(r)) for r in rows})


def toy_rows(**params) -> list[dict]:
    return [run_row(m, s, **params) for m in METHODS for s in SEEDS]


@pytest.fixture(scope="module")
def summary():
    return summarize(sweep_of(toy_rows()))


@pytest.fixture(scope="module")
def outputs(summary, tmp_path_factory):
    out = tmp_path_factory.mktemp("reviewer")
    write_outputs(summary, out, title="Sweep rev")
    return out


def tidy_row(frame: pd.DataFrame, method: str, metric: str) -> pd.Series:
    rows = frame[frame["method"].eq(method) & frame["metric"].eq(metric)]
    assert len(rows) == 1, (method, metric)
    return rows.iloc[0]


def t_ci(values) -> tuple[float, float]:
    x = np.asarray(values, float)
    return stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))


# ------------------------------------------------------------------------------- intervals


def test_summary_csv_has_the_t_interval_of_every_cell(outputs):
    tidy = pd.read_csv(outputs / "summary.csv")
    assert {"ci_low", "ci_high", "wilson_low", "wilson_high", "wilson_n", "p_holm", "holm_n",
            "diff_ci_low", "diff_ci_high", "min_detectable_diff", "checkpoint"} <= set(tidy)
    for method in METHODS:
        row = tidy_row(tidy, method, "test_robust_acc")
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(t_ci(ROBUST[method]))
        assert row["checkpoint"] == "last"
        best = tidy_row(tidy, method, "test_best_robust_acc")
        want = t_ci(np.add(ROBUST[method], OVERFIT[method]))
        assert (best["ci_low"], best["ci_high"]) == pytest.approx(want)
        assert best["checkpoint"] == "best"


def test_wilson_interval_of_one_run_on_its_test_images(summary):
    tidy = summary.tidy
    for method in METHODS:
        # The whole split: 1000 images, at the cell's mean accuracy.
        row = tidy_row(tidy, method, "test_robust_acc")
        mean = np.mean(ROBUST[method])
        assert row["wilson_n"] == CLASSES * PER_CLASS
        assert (row["wilson_low"], row["wilson_high"]) == pytest.approx(
            proportion_confint(mean * 1000, 1000, method="wilson"))
        # The worst class: its 100 images.
        worst = tidy_row(tidy, method, "test_worst_class_robust_acc")
        assert worst["wilson_n"] == PER_CLASS
        assert (worst["wilson_low"], worst["wilson_high"]) == pytest.approx(
            proportion_confint(worst["mean"] * 100, 100, method="wilson"))
    # Not an accuracy on counted images: no binomial interval.
    assert tidy_row(tidy, "caat", "test_class_natural_acc_std")[["wilson_low", "wilson_n"]] \
        .isna().all()
    assert tidy_row(tidy, "caat", "test_pgd_autoattack_gap")[["wilson_low"]].isna().all()


def test_per_run_and_per_class_intervals(outputs):
    runs = pd.read_csv(outputs / "classwise_runs.csv")
    row = runs[runs["run_id"].eq("r-caat-1") & runs["kind"].eq("robust")
               & runs["checkpoint"].eq("last") & runs["class"].eq(3)].iloc[0]
    acc = class_list(ROBUST["caat"][1], 1)[3]
    assert row["acc"] == pytest.approx(acc) and row["count"] == PER_CLASS
    assert (row["wilson_low"], row["wilson_high"]) == pytest.approx(
        proportion_confint(round(acc * 100), 100, method="wilson"))
    # The worst class of each run and kind is marked (class 0 here: the lowest list value).
    worst = runs[runs["worst"]]
    assert set(worst["class"]) == {0}
    assert len(worst) == len(METHODS) * len(SEEDS) * (2 * 2 + 1)  # 2 checkpoints x 2 + AA

    cells = pd.read_csv(outputs / "classwise.csv")
    cell = cells[cells["method"].eq("caat") & cells["kind"].eq("robust")
                 & cells["checkpoint"].eq("last") & cells["class"].eq(3)].iloc[0]
    values = [class_list(ROBUST["caat"][s], s)[3] for s in SEEDS]
    assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(t_ci(values))
    # One run's count, not the three seeds' pooled: they share the same test images.
    assert cell["count"] == PER_CLASS
    assert (cell["wilson_low"], cell["wilson_high"]) == pytest.approx(
        proportion_confint(np.mean(values) * 100, 100, method="wilson"))
    assert set(cells["checkpoint"]) == {"last", "best"}


def test_runs_without_counts_get_no_wilson_interval_and_a_note():
    rows = toy_rows()
    summary = summarize(sweep_of(rows, counts=lambda r: r["method"] != "caat"))
    assert any("3 of 9 selected runs with class-wise results carry no per-class image "
               "counts" in n for n in summary.notes)
    assert math.isnan(tidy_row(summary.tidy, "caat", "test_robust_acc")["wilson_low"])
    assert tidy_row(summary.tidy, "trades", "test_robust_acc")["wilson_n"] == 1000
    per_run = summary.run_classwise
    assert per_run.loc[per_run["method"].eq("caat"), ["count", "wilson_low"]].isna().all().all()


def test_paired_differences_carry_their_interval_and_holm_per_table(summary):
    tidy = summary.tidy
    for method in ("pgd_at", "caat"):
        row = tidy_row(tidy, method, "test_robust_acc")
        diffs = np.subtract(ROBUST[method], ROBUST["trades"])
        assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx(t_ci(diffs))
        assert row["p"] == pytest.approx(stats.ttest_rel(ROBUST[method], ROBUST["trades"])
                                         .pvalue)
    compared = tidy[tidy["p"].notna()]
    for _checkpoint, family in compared.groupby("checkpoint"):
        # One table = one scenario's comparisons of one checkpoint.
        assert set(family["holm_n"]) == {len(family)}
        np.testing.assert_allclose(family["p_holm"],
                                   multipletests(family["p"], method="holm")[1], atol=1e-12)
    assert set(compared["checkpoint"]) == {"last", "best"}
    # Neither the reference nor the best checkpoint's own metrics are compared.
    assert tidy.loc[tidy["method"].eq("trades"), "p_holm"].isna().all()
    assert tidy.loc[tidy["metric"].isin(["best_epoch", "robust_overfit_gap"]), "p"].isna().all()


def test_the_difference_table_names_its_interval_and_comparison_count(summary, outputs):
    md = (outputs / "summary.md").read_text()
    n_last = int(tidy_row(summary.tidy, "caat", "test_robust_acc")["holm_n"])
    n_best = int(tidy_row(summary.tidy, "caat", "test_best_robust_acc")["holm_n"])
    assert f"Holm-adjusted over {n_last} comparisons in this table" in md
    assert f"Holm-adjusted over {n_best} comparisons in this table" in md
    row = tidy_row(summary.tidy, "caat", "test_robust_acc")
    cell = (f"{100 * row['diff_vs_trades']:+.2f} [{100 * row['diff_ci_low']:+.2f}, "
            f"{100 * row['diff_ci_high']:+.2f}] (p={row['p']:.3f}, Holm {row['p_holm']:.3f})")
    assert cell in md
    tex = (outputs / "summary.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 4  # results and differences, last and best
    assert f"(Holm over {n_last} comparisons)" in tex


# ---------------------------------------------------------------------- best and last


def test_best_and_last_both_shown_with_the_overfitting_gap(summary, outputs):
    for method in METHODS:
        gap = tidy_row(summary.tidy, method, "robust_overfit_gap")
        assert gap["mean"] == pytest.approx(np.mean(OVERFIT[method]))
        assert (gap["ci_low"], gap["ci_high"]) == pytest.approx(t_ci(OVERFIT[method]))
        epoch = tidy_row(summary.tidy, method, "best_epoch")
        assert epoch["mean"] == pytest.approx(7.0) and not epoch["best"]
    md = (outputs / "summary.md").read_text()
    assert "### best checkpoint (chosen on validation)" in md
    best_table = md.split("### best checkpoint (chosen on validation)")[1]
    assert "robust overfitting gap" in best_table and "best epoch" in best_table
    # The best epoch in epochs, not percent, and without an interval: the mean of 6, 7, 8.
    assert "| 7.0 |" in best_table and "7.0 [" not in best_table
    html = (outputs / "summary.html").read_text()
    assert "<h3>best checkpoint (chosen on validation)</h3>" in html


def test_runs_without_a_best_checkpoint_show_no_best_columns():
    rows = [{k: v for k, v in r.items() if not k.startswith("test_best_") and k != "best_epoch"}
            for r in toy_rows()]
    summary = summarize(sweep_of(rows))
    assert summary.best_metrics == ()
    assert not summary.tidy["metric"].str.startswith("test_best_").any()
    assert set(summary.tidy["checkpoint"]) == {"last"}


# --------------------------------------------------------------------------- checklist


def test_checklist_opens_summary_md_and_html_with_each_figure(summary, outputs):
    md = (outputs / "summary.md").read_text().splitlines()
    assert md[:3] == ["# Sweep rev", "", "## Reviewer's checklist"]
    lines = md[4:11]
    assert [line.split("]")[0] for line in lines] == ["- [met"] * 6 + ["- [not met"]
    text = "\n".join(lines)
    assert "configs chosen by val_robust_acc (max); best checkpoint by val_robust_acc" in text
    assert "seeds per cell: min 3, max 3 over 3 cells" in text
    assert "standard on 1000 of 1000 test images, in 9 of 9 runs" in text
    assert f"largest {100 * np.mean(GAP['caat']):.2f} points (clean/caat" in text
    assert "10 epochs for every method" in text
    assert "both in 9 of 9 runs" in text
    assert f"gap (best - last robust accuracy) {100 * np.mean(OVERFIT['pgd_at']):.2f}" in text
    # The smallest detectable difference: statsmodels' effect size at n = 3 times the sd of
    # the paired differences, largest over the two comparisons with TRADES.
    effect = TTestPower().solve_power(nobs=3, alpha=0.05, power=0.8)
    sds = [np.std(np.subtract(ROBUST[m], ROBUST["trades"]), ddof=1) for m in ("pgd_at", "caat")]
    assert f"robust {100 * effect * max(sds):.2f} points (largest of 2 paired" in text
    html = (outputs / "summary.html").read_text()
    assert html.index("<h2>Reviewer&#x27;s checklist</h2>") < html.index("<table")
    for line in lines:
        assert line[2:].replace("'", "&#x27;") in html


def test_checklist_items_that_fail_say_why():
    rows = toy_rows()
    for r in rows:
        if r["method"] == "caat":
            r.update(init_erm_epochs=5, eval_autoattack="fast")
    items = {i.name: i for i in summarize(sweep_of(rows)).checklist}
    budget = items["training budget per method"]
    assert budget.status == "not met"
    assert budget.figure.startswith("clean: PGD-AT 10, TRADES 10, CAAT 15 epochs")
    assert items["AutoAttack version and images"].status == "not met"
    assert "fast/standard on 1000 of 1000" in items["AutoAttack version and images"].figure


def test_selection_item_refuses_a_test_metric_and_tolerates_missing_params():
    runs = normalise_runs(pd.DataFrame(toy_rows(eval_best_metric="test_robust_acc")))
    item = selection_item([("val_robust_acc", "max")], runs)
    assert item.status == "not met" and "not validation: test_robust_acc" in item.figure
    assert selection_item([("test_natural_acc", "max")], runs.drop(
        columns=["eval_best_metric"])).status == "not met"
    old = runs.drop(columns=["eval_best_metric", "eval_keep_best"])
    item = selection_item([("val_robust_acc", "max")], old)
    assert item.status == "met" and "no eval.best_metric recorded" in item.figure
    # keep_best off: the best metric chooses nothing.
    off = runs.assign(eval_keep_best="False")
    assert selection_item([("val_robust_acc", "max")], off).status == "met"


def test_budget_item_warm_start_and_old_runs_are_unknown():
    runs = normalise_runs(pd.DataFrame(toy_rows()))
    warm = runs.assign(init_checkpoint=np.where(runs["method"].eq("caat"), "/ckpt/erm.pt",
                                                "None"))
    item = budget_item(warm)
    assert item.status == "unknown" and "CAAT start from init.checkpoint" in item.figure
    assert budget_item(runs.drop(columns="init_erm_epochs")).status == "unknown"
    assert budget_item(runs).status == "met"


def test_autoattack_item_on_a_subset_or_unknown_counts():
    rows = toy_rows()
    sweep = sweep_of(rows)
    for lists in sweep.classwise.values():
        lists["test_class_autoattack_count"] = [50] * CLASSES
    item = autoattack_item(sweep.runs, sweep.classwise)
    assert item.status == "not met" and "standard on 500 of 1000 test images" in item.figure
    for lists in sweep.classwise.values():
        del lists["test_class_autoattack_count"]
        lists["test_autoattack_indices"] = list(range(1000))
    assert autoattack_item(sweep.runs, sweep.classwise).status == "met"
    for lists in sweep.classwise.values():
        del lists["test_autoattack_indices"]
    assert autoattack_item(sweep.runs, sweep.classwise).status == "unknown"
    assert autoattack_item(sweep.runs.drop(columns="test_autoattack_acc"),
                           sweep.classwise).status == "not met"


def test_seed_gap_and_detectable_items_on_plain_tables():
    tidy = pd.DataFrame({"scenario": "s", "method": ["a", "b"], "metric": "test_robust_acc",
                         "n": [2, 5], "mean": [.4, .5], "std": [.01, .02],
                         "min_detectable_diff": [np.nan, np.nan]})
    seeds = seeds_item(tidy)
    assert seeds.status == "not met" and "min 2, max 5 over 2 cells" in seeds.figure
    assert "fewer in s/a" in seeds.figure
    assert gap_item(tidy).status == "unknown"
    gap = pd.DataFrame({"scenario": "s", "method": ["a", "b"], "metric":
                        "test_pgd_autoattack_gap", "mean": [0.03, 0.01], "n": 3})
    assert gap_item(gap).status == "met"  # exactly 3 points: the alarm does not fire either
    assert gap_item(gap.assign(mean=[0.031, 0.0])).status == "not met"
    # No paired comparison: two samples of each cell's seeds (statsmodels' TTestIndPower).
    from statsmodels.stats.power import TTestIndPower

    item = detectable_item(tidy, "trades")
    d5 = TTestIndPower().solve_power(nobs1=5, alpha=0.05, power=0.8, ratio=1)
    d2 = TTestIndPower().solve_power(nobs1=2, alpha=0.05, power=0.8, ratio=1)
    assert f"robust {100 * max(d5 * .02, d2 * .01):.2f} points (largest over 2 cells" in \
        item.figure
    tiny = tidy.assign(min_detectable_diff=[0.005, 0.009])
    assert detectable_item(tiny, "trades").status == "unknown"  # worst-class robust missing
    both = pd.concat([tiny, tiny.assign(metric="test_worst_class_robust_acc")])
    assert detectable_item(both, "trades").status == "met"


def test_analyze_prints_the_checklist(summary, tmp_path, monkeypatch, capsys):
    import sweeper.analysis
    import sweeper.cli

    # The command's printing alone: the analysis is this summary, nothing is logged.
    monkeypatch.setattr(sweeper.analysis, "analyze", lambda *a, **k: (summary, []))
    monkeypatch.setattr(sweeper.cli, "log_to_parent_run", lambda *a: None)
    assert sweeper.cli.main(["analyze", "rev", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("Reviewer's checklist:")
    assert out[start + 1:start + 8] == [f"  {item.line()}" for item in summary.checklist]
    assert out[start + 1].startswith("  [met] selection on validation only: configs chosen")


# ------------------------------------------------------------------------------- plots


def test_error_bars_are_the_interval_bounds_asymmetric_safe():
    bar = error_bar(50.0, 45.0, 60.0)
    np.testing.assert_allclose(bar, [[5.0], [10.0]])
    assert error_bar(50.0, math.nan, math.nan) is None
    np.testing.assert_allclose(error_bar([1.0, 2.0], [0.5, math.nan], [2.0, math.nan]),
                               [[0.5, 0.0], [1.0, 0.0]])


def test_tradeoff_plot_draws_the_t_intervals(summary, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from sweeper.analysis import plot_tradeoff

    calls = []
    original = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        calls.append((x, y, kwargs.get("xerr"), kwargs.get("yerr")))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    plot_tradeoff(summary, tmp_path / "t.png")
    by_y = {round(y, 6): yerr for _, y, _, yerr in calls}
    low, high = t_ci(ROBUST["caat"])
    mean = 100 * np.mean(ROBUST["caat"])
    np.testing.assert_allclose(by_y[round(mean, 6)], [[mean - 100 * low], [100 * high - mean]])


def test_tied_worst_classes_are_all_marked_and_the_smaller_count_counts():
    from sweeper.analysis import cell_wilson, run_classwise_table

    selected = pd.DataFrame({"run_id": ["r"], "scenario": ["s"], "method": ["m"], "seed": [0]})
    lists = {"r": {"test_class_robust_acc": [0.5, 0.3, 0.3, float("nan")],
                   "test_class_count": [10, 40, 20, 0]}}
    runs = run_classwise_table(selected, lists)
    assert list(runs["worst"]) == [False, True, True, False]
    # A class without test images has no accuracy and no interval.
    assert runs["wilson_low"].isna().tolist() == [False, False, False, True]
    agg = pd.DataFrame({"scenario": ["s"], "method": ["m"], "mean": [0.3],
                        "metric": ["test_worst_class_robust_acc"]})
    row = cell_wilson(agg, runs).iloc[0]
    assert row["wilson_n"] == 20  # the tied worst class with fewer images: the wider interval
    assert (row["wilson_low"], row["wilson_high"]) == pytest.approx(
        proportion_confint(6, 20, method="wilson"))


def test_classwise_plot_draws_each_classs_t_interval(summary, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from sweeper.analysis._plots import plot_classwise

    calls = []
    original = Axes.bar

    def spy(self, x, height, *args, **kwargs):
        calls.append((kwargs.get("label"), np.asarray(height, float), kwargs.get("yerr")))
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    assert plot_classwise(summary, "clean", tmp_path / "c.png") is not None
    # The first panel is natural accuracy; CAAT's class 0 over its three seeds.
    label, heights, yerr = next(c for c in calls if c[0] == "CAAT")
    seeds = [100 * class_list(NATURAL["caat"][s], s)[0] for s in SEEDS]
    low, high = t_ci(seeds)
    np.testing.assert_allclose(heights[0], np.mean(seeds))
    np.testing.assert_allclose(yerr[:, 0], [np.mean(seeds) - low, high - np.mean(seeds)])
