"""The analysis' pure steps on plain DataFrames: selection, aggregation, paired test, Pareto
front, best-per-column, factor grouping. Expected values are worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from sweeper.analysis import (
    NothingToAnalyse,
    Summary,
    SweepRuns,
    aggregate,
    best_flags,
    class_direction_table,
    class_means_at_last,
    class_means_by_epoch,
    coverage,
    describe_scenario,
    direction_frame,
    direction_tables,
    factor_series,
    normalise_runs,
    paired_test,
    paired_tests,
    pareto_front,
    plot_caat_directions,
    select_runs,
    summarize,
    tex_escape,
)


def run(cell, seed, phase="confirm", outcome="completed", status="FINISHED", trial=None, **m):
    scenario, method = cell.split("/")
    return {"run_id": f"r-{cell}-{phase}-{seed}-{trial}", "trial_id": trial or f"{cell}-{seed}",
            "cell": cell, "scenario": scenario, "method": method, "seed": seed, "phase": phase,
            "outcome": outcome, "status": status, "error": None, **m}


def frame(*rows):
    return normalise_runs(pd.DataFrame(rows))


# ----------------------------------------------------------------------------- selection


def test_confirmation_runs_win_over_better_tuning_runs():
    runs = frame(
        run("a/erm", 0, "tune", val_robust_acc=0.9, test_natural_acc=0.99, trial="t1"),
        run("a/erm", 0, test_natural_acc=0.80, val_robust_acc=0.1),
        run("a/erm", 1, test_natural_acc=0.82, val_robust_acc=0.1),
        run("a/erm", 2, outcome="pruned", test_natural_acc=0.0, val_robust_acc=0.1),
    )
    sel = select_runs(runs, "val_robust_acc", "max")
    assert sorted(sel["test_natural_acc"]) == [0.80, 0.82]
    assert set(sel["source"]) == {"confirm"}


@pytest.mark.parametrize("mode, expected", [("max", "t2"), ("min", "t3")])
def test_best_tuning_run_by_the_selection_metric_and_mode(mode, expected):
    runs = frame(
        run("a/erm", 0, "tune", trial="t1", val_loss=0.5),
        run("a/erm", 1, "tune", trial="t2", val_loss=0.9),
        run("a/erm", 2, "tune", trial="t3", val_loss=0.1),
        # Pruned, failed and running trials never count, however good their metric.
        run("a/erm", 3, "tune", "pruned", trial="t4", val_loss=5.0),
        run("a/erm", 4, "tune", "failed", "FAILED", trial="t5", val_loss=-5.0),
        run("a/erm", 5, "tune", None, "RUNNING", trial="t6", val_loss=-9.0),
    )
    sel = select_runs(runs, "val_loss", mode)
    assert list(sel["trial_id"]) == [expected]
    assert list(sel["source"]) == ["best tune"]


def test_best_tuning_ties_go_to_the_earlier_trial_and_nan_never_wins():
    runs = frame(run("a/erm", 0, "tune", trial="t9", m=0.5),
                 run("a/erm", 1, "tune", trial="t2", m=0.5),
                 run("a/erm", 2, "tune", trial="t1", m=np.nan))
    assert list(select_runs(runs, "m")["trial_id"]) == ["t2"]


def test_cells_with_nothing_finished_are_left_out():
    runs = frame(run("a/erm", 0, "tune", "pruned", m=0.5), run("b/erm", 0, "tune", m=0.1))
    assert list(select_runs(runs, "m")["cell"]) == ["b/erm"]


def test_scenario_and_method_fall_back_to_the_cell_tag():
    runs = frame({"run_id": "x", "trial_id": "x", "cell": "s1/caat", "seed": "3",
                  "phase": "confirm", "outcome": "completed", "status": "FINISHED"})
    assert (runs.at[0, "scenario"], runs.at[0, "method"], runs.at[0, "seed"]) == ("s1", "caat", 3)


def test_coverage_counts_each_state_per_cell():
    runs = frame(run("a/erm", 0), run("a/erm", 1, outcome="pruned"),
                 run("a/erm", 2, outcome="failed", status="FAILED"),
                 run("a/erm", 3, outcome=None, status="RUNNING"),
                 run("a/erm", 4, outcome=None, status="KILLED"),
                 run("a/erm", 5, outcome=None, status="FAILED"))
    row = coverage(runs).loc["a/erm"]
    assert row.to_dict() == {"completed": 1, "pruned": 1, "failed": 2, "running": 1,
                             "interrupted": 1}


# --------------------------------------------------------------------------- aggregation


def test_aggregate_mean_sample_std_and_n():
    sel = frame(run("a/erm", 0, test_natural_acc=0.80), run("a/erm", 1, test_natural_acc=0.84),
                run("a/erm", 2, test_natural_acc=0.88), run("a/caat", 0, test_natural_acc=0.5))
    sel["source"] = "confirm"
    agg = aggregate(sel, ["test_natural_acc"]).set_index("method")
    assert agg.at["erm", "mean"] == pytest.approx(0.84)
    assert agg.at["erm", "std"] == pytest.approx(0.04)  # sqrt((.04^2 + 0 + .04^2) / 2)
    assert agg.at["erm", "n"] == 3
    assert agg.at["caat", "n"] == 1 and math.isnan(agg.at["caat", "std"])


# --------------------------------------------------------------------------- paired test


def test_paired_t_test_by_hand():
    # Differences 0.03, 0.02, 0.04 (seeds 0..2): mean 0.03, sd 0.01, t = 0.03 / (0.01/sqrt 3).
    a = pd.Series([0.83, 0.84, 0.88], index=[0, 1, 2])
    b = pd.Series([0.80, 0.82, 0.84], index=[0, 1, 2])
    res = paired_test(a, b)
    t = 0.03 / (0.01 / math.sqrt(3))
    assert res["n_pairs"] == 3
    assert res["mean_diff"] == pytest.approx(0.03)
    assert res["t"] == pytest.approx(t)
    # Two-sided p of Student's t with 2 degrees of freedom: 1 - |t| / sqrt(2 + t^2).
    assert res["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))


def test_paired_test_pairs_by_seed_only():
    # Seed 5 has no partner; seeds 1 and 2 pair up (listed in a different order).
    a = pd.Series([0.5, 0.7, 0.9], index=[5, 2, 1])
    b = pd.Series([0.6, 0.65, 0.1], index=[1, 2, 7])
    res = paired_test(a, b)
    assert res["n_pairs"] == 2
    # Differences 0.3 (seed 1) and 0.05 (seed 2): t = 0.175 / (0.25/sqrt2 / sqrt2) = 1.4,
    # one degree of freedom: p = 1 - (2/pi) atan(|t|).
    assert res["mean_diff"] == pytest.approx(0.175)
    assert res["t"] == pytest.approx(1.4)
    assert res["p"] == pytest.approx(1 - 2 / math.pi * math.atan(1.4))


def test_paired_test_needs_two_pairs_and_varying_differences():
    one = paired_test(pd.Series([0.5], index=[0]), pd.Series([0.4], index=[0]))
    assert one["n_pairs"] == 1 and one["mean_diff"] == pytest.approx(0.1)
    assert math.isnan(one["t"]) and math.isnan(one["p"]) and ">= 2" in one["note"]
    same = paired_test(pd.Series([0.7, 0.72]), pd.Series([0.6, 0.62]))
    assert math.isnan(same["t"]) and "identical" in same["note"]
    assert same["mean_diff"] == pytest.approx(0.1)


def test_paired_tests_without_reference_or_with_best_tuning_runs_say_why():
    sel = frame(run("a/erm", 0, m=0.5), run("a/erm", 1, m=0.6),
                run("b/erm", 0, "tune", m=0.5), run("b/trades", 0, "tune", m=0.4))
    sel["source"] = ["confirm", "confirm", "best tune", "best tune"]
    tests = paired_tests(sel, "trades", ["m"]).set_index("scenario")
    assert tests.at["a", "note"] == "no trades runs in this scenario"
    assert "not applicable" in tests.at["b", "note"]
    assert tests["t"].isna().all() and tests["mean_diff"].isna().all()


# --------------------------------------------------------------------------- Pareto, best


def test_pareto_front_by_hand():
    pts = pd.DataFrame({"method": ["erm", "pgd", "trades", "caat", "twin", "bad", "nan"],
                        "natural": [0.90, 0.80, 0.82, 0.85, 0.85, 0.85, np.nan],
                        "robust": [0.05, 0.40, 0.45, 0.44, 0.44, 0.40, 0.99]})
    front = pareto_front(pts)
    # pgd is dominated by trades (both higher); bad by caat (equal natural, higher robust);
    # caat and its exact twin dominate neither each other (not > on either) -> both stay.
    assert list(pts["method"][front]) == ["erm", "trades", "caat", "twin"]


def test_best_flags_max_for_accuracy_min_for_spread_and_ties_all_marked():
    agg = pd.DataFrame({"scenario": "s", "method": ["a", "b", "c"] * 2,
                        "metric": ["test_natural_acc"] * 3 + ["test_boundary_error"] * 3,
                        "mean": [0.8, 0.9, 0.9, 0.3, 0.2, np.nan]})
    assert list(best_flags(agg)) == [False, True, True, False, True, False]


# ------------------------------------------------------------------------------ factors


def test_factor_series_groups_scenarios_into_lines():
    sc = pd.DataFrame({"scenario": ["c1", "u2", "u4", "p4", "c10", "u2i10"],
                       "noise_type": ["none", "uniform", "uniform", "pair", "none", "uniform"],
                       "noise_rate": [0, 0.2, 0.4, 0.4, 0, 0.2],
                       "imbalance_ratio": [1, 1, 1, 1, 10, 10]})
    # The noise-free scenario is the rate-0 point of every noise type's line.
    assert factor_series(sc, "noise_rate") == {
        "pair noise, balanced": ["c1", "p4"],
        "uniform noise, balanced": ["c1", "u2", "u4"],
        "uniform noise, imbalance ratio 10": ["c10", "u2i10"],
    }
    assert factor_series(sc, "imbalance_ratio") == {"no label noise": ["c1", "c10"],
                                                    "uniform noise 20%": ["u2", "u2i10"]}


def test_describe_scenario_and_tex_escape():
    row = pd.Series({"noise_type": "pair", "noise_rate": 0.4, "imbalance_ratio": 100.0})
    assert describe_scenario(row) == "pair noise 40%, imbalance ratio 100"
    assert describe_scenario(pd.Series({"noise_type": "none", "noise_rate": 0.0,
                                        "imbalance_ratio": 1.0})) == "no label noise, balanced"
    assert tex_escape("pgd_at 20% & co") == r"pgd\_at 20\% \& co"


def test_summarize_with_nothing_finished_raises_a_clear_error():
    runs = frame(run("a/erm", 0, outcome=None, status="RUNNING"),
                 run("a/caat", 0, outcome="pruned"))
    with pytest.raises(NothingToAnalyse, match="nothing to analyse yet: 1 trial running, 0 "
                                               "completed, 1 pruned, 0 failed"):
        summarize(SweepRuns(name="x", experiment_id="1", runs=runs))


def test_factor_series_separates_bounds_and_skips_ambiguous_groups():
    sc = pd.DataFrame({"scenario": ["c", "u", "c2", "u2", "x"],
                       "noise_type": ["none", "uniform", "none", "uniform", "none"],
                       "noise_rate": [0, 0.2, 0, 0.2, 0], "imbalance_ratio": [1, 1, 1, 1, 10],
                       "eps": [0.1, 0.1, 0.2, 0.2, 0.1]})
    assert factor_series(sc, "noise_rate") == {
        "uniform noise, balanced, eps 0.1": ["c", "u"],
        "uniform noise, balanced, eps 0.2": ["c2", "u2"]}
    assert factor_series(sc, "imbalance_ratio") == {"no label noise, eps 0.1": ["c", "x"]}
    # Two scenarios at the same noise rate on one would-be line: no line at all.
    twins = sc.drop(columns="eps")
    assert factor_series(twins, "noise_rate") == {}


# ------------------------------------------------------------- CAAT direction diagnostics


def caat_selected():
    return frame(run("imb/caat", 0), run("imb/caat", 1), run("imb/caat", 2), run("imb/erm", 0),
                 run("bal/caat", 0))


def test_class_direction_table_reads_histories_nan_and_bare_last_lists():
    sel = caat_selected()
    ids = list(sel["run_id"])
    classwise = {
        # history: epoch 2 is the last; JSON null and NaN (a class without samples) -> NaN
        ids[0]: {"train_class_frac_anti_by_epoch": [[0.1, 0.2], [0.3, None]],
                 "train_class_frac_anti": [0.3, None],
                 "train_class_mean_eps_by_epoch": [[0.1, 0.2], [0.1, math.nan]]},
        # a last-epoch list without its history: no epoch, but it counts as the last one
        ids[1]: {"train_class_mean_eps": [0.3, 0.4]},
        # ids[2] has no artifact; the ERM run's lists are not CAAT's diagnostics
        ids[3]: {"train_class_frac_anti_by_epoch": [[0.9, 0.9]]},
    }
    table = class_direction_table(sel, classwise)
    assert set(table["run_id"]) == {ids[0], ids[1]}
    frac = table[table["metric"].eq("train_class_frac_anti")].sort_values(["epoch", "class"])
    assert list(frac["epoch"]) == [1, 1, 2, 2] and list(frac["class"]) == [0, 1, 0, 1]
    assert frac["value"].iloc[:3].tolist() == [0.1, 0.2, 0.3] and math.isnan(frac["value"].iloc[3])
    assert frac["last"].tolist() == [False, False, True, True]
    by_epoch = class_means_by_epoch(table, "train_class_frac_anti")
    assert by_epoch.loc[2.0, 0] == 0.3 and math.isnan(by_epoch.loc[2.0, 1])
    # Last epoch per run, NaN left out: class 0 (0.1 + 0.3) / 2, class 1 only 0.4.
    last = class_means_at_last(table, "train_class_mean_eps")
    assert last.to_dict() == {0: pytest.approx(0.2), 1: pytest.approx(0.4)}
    eps = table[table["metric"].eq("train_class_mean_eps") & table["run_id"].eq(ids[1])]
    assert eps["epoch"].isna().all() and eps["last"].all()


def test_direction_tables_keep_only_the_selected_runs():
    sel = caat_selected()
    history = direction_frame([
        {"run_id": sel["run_id"][0], "scenario": "imb", "method": "caat", "seed": 0,
         "metric": "frac_anti", "epoch": 1, "value": 0.5},
        {"run_id": "not-selected", "scenario": "imb", "method": "caat", "seed": 0,
         "metric": "frac_anti", "epoch": 1, "value": 0.9}])
    sweep = SweepRuns(name="x", experiment_id="1", runs=sel, directions=history)
    kept, classes = direction_tables(sweep, sel)
    assert kept["value"].tolist() == [0.5] and not len(classes)
    kept, _ = direction_tables(SweepRuns(name="x", experiment_id="1", runs=sel), sel)
    assert not len(kept)


def direction_summary(history, class_table):
    scenarios = pd.DataFrame({"scenario": ["bal", "imb"], "noise_type": ["none", "none"],
                              "noise_rate": [0.0, 0.0], "imbalance_ratio": [1.0, 10.0],
                              "dataset": ["gmm", "gmm"]})
    return Summary(tidy=pd.DataFrame(), selected=caat_selected(), scenarios=scenarios,
                   classwise=pd.DataFrame(), notes=[], directions=history,
                   class_directions=class_table)


def test_caat_direction_plot_only_when_the_cell_logged_something(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    sel = caat_selected()
    ids = list(sel["run_id"])
    lists = {"train_class_frac_anti_by_epoch": [[0.1, 0.2], [0.3, 0.4]],
             "train_class_mean_eps_by_epoch": [[0.1, 0.2], [0.1, 0.3]]}
    classes = class_direction_table(sel, {ids[0]: lists, ids[4]: lists})
    summary = direction_summary(direction_frame([]), classes)
    # Nothing logged per epoch and balanced: no per-class panel, so no (empty) figure.
    assert plot_caat_directions(summary, "bal", tmp_path / "bal.png") is None
    assert not (tmp_path / "bal.png").exists()
    # Imbalanced: the per-class panels alone make a plot.
    assert plot_caat_directions(summary, "imb", tmp_path / "imb.png") == tmp_path / "imb.png"
    assert (tmp_path / "imb.png").read_bytes()[:4] == b"\x89PNG"
    # Per-epoch shares on the balanced cell make one; NaN-only values do not.
    nan_only = direction_frame([{"run_id": ids[4], "scenario": "bal", "method": "caat",
                                 "seed": 0, "metric": "frac_anti", "epoch": 1,
                                 "value": math.nan}])
    assert plot_caat_directions(direction_summary(nan_only, classes), "bal",
                                tmp_path / "nan.png") is None
    shares = direction_frame([{"run_id": ids[4], "scenario": "bal", "method": "caat",
                               "seed": 0, "metric": "frac_anti", "epoch": e, "value": v}
                              for e, v in ((1, 0.2), (2, 0.4))])
    assert plot_caat_directions(direction_summary(shares, classes), "bal",
                                tmp_path / "bal.png") == tmp_path / "bal.png"


# ------------------------------------------------------------- a sweep at each phase


def _phase_runs(phase: str) -> pd.DataFrame:
    """Four cells (two noise rates, two methods) of a sweep with `confirm.tune_test: false`
    (tuning runs log no test_*), as MLflow holds them at each phase boundary."""
    from sweeper.analysis._model import METRICS

    test = {m: 0.3 + 0.1 * i for i, m in enumerate(METRICS)}
    rows = []
    for scenario, rate in (("u2", 0.2), ("u4", 0.4)):
        factors = {"noise_type": "uniform", "noise_rate": rate, "imbalance_ratio": 1,
                   "eval_steps": 10, "eval_eps": 0.1}
        for cell in (f"{scenario}/trades", f"{scenario}/caat"):
            running = phase == "tuning"
            rows += [run(cell, i, "tune", None if running and i else "completed",
                         "RUNNING" if running and i else "FINISHED", trial=f"{cell}-t{i}",
                         val_robust_acc=0.3 + 0.1 * i, **factors) for i in range(2)]
            n_confirmed = {"tuning": 0, "tuned": 0, "confirming": 1, "done": 2}[phase]
            if cell.endswith("caat") and phase == "confirming":
                n_confirmed = 0  # one method's confirmation ahead of the other's
            rows += [run(cell, seed, val_robust_acc=0.35, **factors,
                         **{k: v + 0.01 * seed for k, v in test.items()})
                     for seed in range(n_confirmed)]
    return frame(*rows)


@pytest.mark.parametrize("phase", ["tuning", "tuned", "confirming", "done"])
def test_a_sweep_analyses_at_every_phase_boundary(phase, tmp_path):
    from sweeper.analysis import write_outputs

    sweep = SweepRuns(name="x", experiment_id="1", runs=_phase_runs(phase),
                      metric="val_robust_acc")
    summary = summarize(sweep)
    files = write_outputs(summary, tmp_path)
    assert all(f.exists() for f in files)
    md = (tmp_path / "summary.md").read_text()
    # Which attack "robust" means, in the table's caption, not only on the plot's axis.
    assert "Robust: accuracy under PGD-10 with random start at eps 0.1" in md
    pending = [n for n in summary.notes if "confirmation pending" in n]
    if phase in ("tuning", "tuned"):
        # Nothing carries a test metric yet: the table is all n/a, and the note says why
        # instead of claiming n = 1.
        assert pending and "u2/caat" in pending[0] and "u4/trades" in pending[0]
        assert "tuning runs skip the test split" in md
        assert not any("(n = 1" in n for n in summary.notes)
    elif phase == "confirming":
        assert pending and "u4/caat" in pending[0] and "u4/trades" not in pending[0]
        assert (tmp_path / "vs_noise_rate.png").exists()
    else:
        assert not pending
        agg = summary.tidy.set_index(["scenario", "method", "metric"])
        assert agg.at[("u4", "caat", "test_natural_acc"), "n"] == 2


def test_a_one_panel_figure_keeps_its_whole_title():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sweeper.analysis._plots import fit_title

    fig, _ = plt.subplots(1, 1, figsize=(5.2, 5.2))  # the trade-off plot of one scenario
    title = fit_title(fig, "Natural vs robust test accuracy (mean ± std over seeds; upper "
                      "right is better)")
    fig.tight_layout()
    fig.canvas.draw()
    box = title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    plt.close(fig)
