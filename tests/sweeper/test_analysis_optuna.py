"""What the cells' Optuna studies add to `caat-sweep analyze` (issue 13): importances,
config fronts (tuning and confirmed), infeasible configs, the interactive views, and which
confirmed config the tables report when a cell confirmed several.

The sweeps are written by hand: an MLflow store (`analysis_store.StoreWriter`) and an SQLite
Optuna storage whose studies, one per cell, hold trials with known values. Every expected
front is recomputed here by a brute-force double loop, independently of `sweeper.pareto`.
"""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import optuna
import pandas as pd
import pytest
from analysis_store import METRIC_KEYS, StoreWriter, build_store

from sweeper.analysis import best_confirmed, cell_importances, normalise_runs, select_runs
from sweeper.cli import main

OBJECTIVES = [("val_natural_acc", "max"), ("val_robust_acc", "max")]
CONSTRAINTS = {"val_natural_acc": {"min": 0.5}}
SPACE = {"method.beta": optuna.distributions.FloatDistribution(1.0, 10.0, log=True),
         "optim.lr": optuna.distributions.FloatDistribution(0.01, 0.2, log=True)}

# Tuning trials per cell: (Ray trial id, state, (natural, robust) or None, constraint
# violations or None (none recorded), params).
COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"


def _t(tid, state, values, params, violations="auto"):
    if violations == "auto" and values is not None:
        violations = [CONSTRAINTS["val_natural_acc"]["min"] - values[0]]
    return tid, state, values, None if violations == "auto" else violations, params


TUNING = {
    "clean/caat": [
        _t("caat_t0", COMPLETE, (.80, .40), {"method.beta": 2.0, "optim.lr": 0.05}),
        _t("caat_t1", COMPLETE, (.70, .50), {"method.beta": 6.0, "optim.lr": 0.05}),
        _t("caat_t2", COMPLETE, (.75, .45), {"method.beta": 4.0, "optim.lr": 0.10}),
        _t("caat_t3", COMPLETE, (.60, .42), {"method.beta": 3.0, "optim.lr": 0.15}),
        # Best robust of all, but breaks natural >= 0.5: never on a front.
        _t("caat_t4", COMPLETE, (.40, .60), {"method.beta": 9.0, "optim.lr": 0.02}),
        # Stopped by ASHA after looking great: never on a front.
        _t("caat_t5", PRUNED, None, {"method.beta": 5.0, "optim.lr": 0.03}),
        _t("caat_t6", FAIL, None, {"method.beta": 1.5, "optim.lr": 0.18}),
        # The same values as t0: equal configs are both on the front.
        _t("caat_t7", COMPLETE, (.80, .40), {"method.beta": 2.2, "optim.lr": 0.06}),
        # Equal natural to t1 and worse robust: dominated.
        _t("caat_t8", COMPLETE, (.70, .48), {"method.beta": 7.0, "optim.lr": 0.04}),
    ],
    "clean/trades": [
        _t("trades_t0", COMPLETE, (.72, .41), {"method.beta": 3.0, "optim.lr": 0.05}),
        _t("trades_t1", COMPLETE, (.55, .46), {"method.beta": 8.0, "optim.lr": 0.08}),
        _t("trades_t2", COMPLETE, (.52, .40), {"method.beta": 5.0, "optim.lr": 0.12}),
        # No violations recorded although the sweep has constraints: infeasible to its
        # sampler, so to the analysis too.
        _t("trades_t3", COMPLETE, (.90, .90), {"method.beta": 1.2, "optim.lr": 0.01},
           violations=None),
        _t("trades_t4", PRUNED, None, {"method.beta": 2.0, "optim.lr": 0.02}),
    ],
    # One completed trial: a front of one, no importance (a note says why).
    "noisy20/caat": [
        _t("noisy_t0", COMPLETE, (.65, .30), {"method.beta": 2.0, "optim.lr": 0.05}),
        _t("noisy_t1", PRUNED, None, {"method.beta": 3.0, "optim.lr": 0.07}),
    ],
}
# Confirmation runs: cell -> tuned_by -> [(natural, robust) per seed].
CONFIRMED = {
    "clean/caat": {"caat_t0": [(.79, .38), (.81, .40), (.80, .42)],
                   "caat_t1": [(.70, .49), (.68, .51), (.72, .50)],  # best mean robust: .50
                   "caat_t2": [(.69, .47), (.70, .48), (.68, .49)]},  # dominated by t1
    "clean/trades": {"trades_t0": [(.70, .40), (.72, .42)],
                     "trades_t1": [(.48, .45), (.50, .47)]},  # mean natural .49: infeasible
    # No study (nothing searched): one config, no params.
    "clean/erm": {"erm_t0": [(.90, .05), (.91, .04)]},
}


def _test_metrics(natural, robust):
    out = dict.fromkeys(METRIC_KEYS, 0.1)
    out.update(natural_acc=natural, robust_acc=robust)
    return out


def write_studies(url: str, tuning: dict, objectives=OBJECTIVES, constraints=CONSTRAINTS):
    storage = optuna.storages.RDBStorage(url)
    for cell, trials in tuning.items():
        study = optuna.create_study(storage=storage, study_name=cell, directions=[
            "maximize" if mode == "max" else "minimize" for _, mode in objectives])
        study.set_metric_names([m for m, _ in objectives])
        study.set_user_attr("scenario", cell.split("/")[0])
        study.set_user_attr("method", cell.split("/")[1])
        study.set_user_attr("constraints", constraints)
        for tid, state, values, violations, params in trials:
            attrs = {"ray_trial_id": tid}
            if violations is not None:
                attrs["constraint_violations"] = violations
            study.add_trial(optuna.trial.create_trial(
                state=getattr(optuna.trial.TrialState, state), params=params,
                distributions={k: SPACE[k] for k in params},
                values=list(values) if values is not None else None, user_attrs=attrs))


def write_sweep(w: StoreWriter, name: str, tuning: dict, confirmed: dict, tags: dict,
                metric="val_robust_acc") -> None:
    exp, parent = w.sweep(name, metric=metric, tags=tags)
    for cell, trials in tuning.items():
        scenario, method = cell.split("/")
        for seed, (tid, state, values, _v, _p) in enumerate(trials):
            outcome = {COMPLETE: "completed", PRUNED: "pruned", FAIL: "failed"}[state]
            test = _test_metrics(*values) if values else None
            w.trial(exp, parent, name, scenario, method, seed, "tune", outcome, test,
                    trial_id=tid)
    for cell, groups in confirmed.items():
        scenario, method = cell.split("/")
        for tuned_by, seeds in groups.items():
            for seed, values in enumerate(seeds):
                w.trial(exp, parent, name, scenario, method, seed, "confirm", "completed",
                        _test_metrics(*values), tags={"tuned_by": tuned_by})


# The single-objective sweep: (Ray trial id, val_robust_acc); two tie for the best.
SINGLE = {"clean/caat": [("so_t0", .40), ("so_t1", .55), ("so_t2", .55), ("so_t3", .30)]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("optuna-sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    w = StoreWriter(uri, root / "artifacts")
    studies = f"sqlite:///{root / 'optuna.db'}"
    write_studies(studies, TUNING)
    write_sweep(w, "mo", TUNING, CONFIRMED, {
        "objectives": "val_natural_acc:max,val_robust_acc:max", "optuna_storage": studies})

    single = f"sqlite:///{root / 'single.db'}"
    write_studies(single, {cell: [(tid, COMPLETE, (v,), [], {"method.beta": 1.0 + i,
                                                               "optim.lr": 0.01 * (i + 1)})
                                  for i, (tid, v) in enumerate(trials)]
                           for cell, trials in SINGLE.items()},
                  objectives=[("val_robust_acc", "max")], constraints={})
    exp, parent = w.sweep("so", tags={"objectives": "val_robust_acc:max",
                                      "optuna_storage": single})
    for i, (tid, value) in enumerate(SINGLE["clean/caat"]):
        w.trial(exp, parent, "so", "clean", "caat", i, "tune", "completed",
                _test_metrics(.7, value), trial_id=tid)
    for seed in range(2):
        w.trial(exp, parent, "so", "clean", "caat", seed, "confirm", "completed",
                _test_metrics(.7, .5 + .01 * seed), tags={"tuned_by": "so_t1"})

    # A sweep whose studies are gone (another machine, a moved directory).
    exp, parent = w.sweep("moved", tags={"optuna_storage": f"sqlite:///{root / 'gone.db'}"})
    w.trial(exp, parent, "moved", "clean", "caat", 0, "confirm", "completed",
            _test_metrics(.8, .4))
    return uri, root


def _analyze(store, name, out, capsys):
    uri, _root = store
    assert main(["analyze", name, "--out", str(out), "--tracking-uri", uri]) == 0
    return capsys.readouterr()


@pytest.fixture(scope="module")
def analysed(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "mo"
    assert main(["analyze", "mo", "--out", str(out), "--tracking-uri", store[0]]) == 0
    return out


# ------------------------------------------------------------------ the brute-force fronts


def dominates(a, b, modes) -> bool:
    better = [x > y if m == "max" else x < y for x, y, m in zip(a, b, modes, strict=True)]
    worse = [x < y if m == "max" else x > y for x, y, m in zip(a, b, modes, strict=True)]
    return any(better) and not any(worse)


def brute_front(points: dict, modes) -> set:
    """Ids of the points no other point dominates (O(n^2), on purpose)."""
    return {i for i, p in points.items()
            if not any(dominates(q, p, modes) for j, q in points.items() if j != i)}


def feasible(values) -> bool:
    return values[0] >= CONSTRAINTS["val_natural_acc"]["min"]


def expected_fronts() -> dict:
    modes = [m for _, m in OBJECTIVES]
    out = {}
    for cell, trials in TUNING.items():
        points = {tid: values for tid, state, values, violations, _ in trials
                  if state == COMPLETE and violations is not None and feasible(values)}
        out[cell, "tuning"] = brute_front(points, modes)
    for cell, groups in CONFIRMED.items():
        means = {tid: tuple(sum(v[k] for v in seeds) / len(seeds) for k in range(2))
                 for tid, seeds in groups.items()}
        out[cell, "confirmed"] = brute_front({t: v for t, v in means.items() if feasible(v)},
                                             modes)
    return out


# ---------------------------------------------------------------------------------- tests


def test_the_brute_force_fronts_are_what_the_data_was_written_for():
    # Guards the hand-made data: it must exercise ties, domination and infeasibility.
    fronts = expected_fronts()
    assert fronts["clean/caat", "tuning"] == {"caat_t0", "caat_t1", "caat_t2", "caat_t7"}
    assert fronts["clean/caat", "confirmed"] == {"caat_t0", "caat_t1"}
    assert fronts["clean/trades", "tuning"] == {"trades_t0", "trades_t1"}
    assert fronts["clean/trades", "confirmed"] == {"trades_t0"}


def test_pareto_configs_are_exactly_the_brute_force_fronts(analysed):
    table = pd.read_csv(analysed / "pareto_configs.csv")
    got = {key: set(group["trial_id"]) for key, group in table.groupby(["cell", "source"])}
    assert got == {k: v for k, v in expected_fronts().items() if v}
    # Pruned, failed and infeasible trials never appear.
    assert not set(table["trial_id"]) & {"caat_t4", "caat_t5", "caat_t6", "trades_t3",
                                         "trades_t4", "noisy_t1", "trades_t1_confirmed"}


def test_pareto_configs_carry_values_params_and_seeds(analysed):
    table = pd.read_csv(analysed / "pareto_configs.csv").set_index(["cell", "source",
                                                                    "trial_id"])
    assert list(table.columns) == ["scenario", "method", "number", "n_seeds",
                                   "val_natural_acc", "val_robust_acc", "method.beta",
                                   "optim.lr"]
    row = table.loc["clean/caat", "confirmed", "caat_t1"]
    assert row["n_seeds"] == 3
    assert row["val_natural_acc"] == pytest.approx(.70)
    assert row["val_robust_acc"] == pytest.approx(.50)
    # The params of the tuning trial the confirmation runs re-ran, and its number.
    assert (row["method.beta"], row["optim.lr"], row["number"]) == (6.0, 0.05, 1)
    tuning = table.loc["clean/caat", "tuning", "caat_t2"]
    assert (tuning["n_seeds"], tuning["val_robust_acc"], tuning["method.beta"]) == (1, .45, 4.0)
    erm = table.loc["clean/erm", "confirmed", "erm_t0"]
    assert erm["n_seeds"] == 2 and math.isnan(erm["method.beta"])


def test_infeasible_configs_say_which_constraint_they_break(analysed):
    table = pd.read_csv(analysed / "infeasible_configs.csv")
    got = {(r.cell, r.source, r.trial_id): r.broken for r in table.itertuples()}
    assert got == {("clean/caat", "tuning", "caat_t4"): "val_natural_acc needs >= 0.5",
                   ("clean/trades", "tuning", "trades_t3"): "no constraint values recorded",
                   ("clean/trades", "confirmed", "trades_t1"): "val_natural_acc needs >= 0.5"}
    mean = table.set_index("trial_id").at["trades_t1", "val_natural_acc"]
    assert mean == pytest.approx(.49)


def test_importances_sum_to_one_with_a_row_per_param(analysed):
    table = pd.read_csv(analysed / "importance.csv")
    assert list(table.columns) == ["cell", "scenario", "method", "objective", "param",
                                   "importance"]
    groups = table.groupby(["cell", "objective"])
    assert set(groups.groups) == {(c, m) for c in ("clean/caat", "clean/trades")
                                  for m, _ in OBJECTIVES}
    for _key, group in groups:
        assert sorted(group["param"]) == sorted(SPACE)
        assert group["importance"].sum() == pytest.approx(1.0)
        assert (group["importance"] >= 0).all()


def test_importance_follows_each_objective_s_direction():
    # The 4 best configs of objective a (maximised) share x and spread over y; the 4 worst
    # share y. Objective b (minimised) has the same values, so its best are a's worst. PED-
    # ANOVA explains the lowest targets: read with the wrong sign, a's importances would
    # explain its worst configs and name y.
    import numpy as np

    rng = np.random.RandomState(0)
    unit = optuna.distributions.FloatDistribution(0, 1)
    study = optuna.create_study(directions=["maximize", "minimize"])
    rows = [((.01 + .02 * i, .1 + .28 * i), 10 + i) for i in range(4)]
    rows += [((.1 + .28 * i, .5 + .01 * i), -10 - i) for i in range(4)]
    rows += [((float(x), float(y)), float(v)) for x, y, v in rng.rand(32, 3)]
    for (x, y), v in rows:
        study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y},
                                                  distributions={"x": unit, "y": unit},
                                                  values=[v, v]))
    (a, imp_a), (b, imp_b) = cell_importances(study, [("a", "max"), ("b", "min")])
    assert (a, b) == ("a", "b")
    assert imp_a["x"] > 0.8 > imp_a["y"]
    assert imp_b["y"] > 0.8 > imp_b["x"]


def test_cells_without_importance_or_study_get_a_note(analysed):
    text = (analysed / "summary.md").read_text()
    notes = [line[2:] for line in text.splitlines() if line.startswith("- ")]
    assert any(n.startswith("noisy20/caat: no hyperparameter importance (1 completed tuning "
                            "trial(s), importance needs 2)") for n in notes)
    assert "no Optuna study (nothing searched, or not started) for: clean/erm" in notes


def test_tables_report_the_best_confirmed_config_and_say_so(analysed):
    sel = pd.read_csv(analysed / "selected_runs.csv")
    conf = sel[sel["source"].eq("confirm")]
    # Best mean val_robust_acc (the parent's metric): caat .50 (t1), trades .46 (t1).
    assert dict(conf.groupby("method")["tuned_by"].unique().map(list)) == {
        "caat": ["caat_t1"], "erm": ["erm_t0"], "trades": ["trades_t1"]}
    assert len(conf[conf["method"].eq("caat")]) == 3
    notes = (analysed / "summary.md").read_text()
    assert ("clean/caat: confirmed 3 configs; the tables report the one with the best mean "
            "val_robust_acc over its seeds (tuned by caat_t1)") in notes
    # trades' pick breaks the constraint on its confirmation means: said, not hidden.
    assert ("clean/trades: the config its tables report (tuned by trades_t1) breaks a "
            "constraint on its confirmation means: val_natural_acc needs >= 0.5") in notes
    summary = pd.read_csv(analysed / "summary.csv")
    natural = summary[summary["metric"].eq("test_natural_acc")
                      & summary["scenario"].eq("clean")].set_index("method")["mean"]
    assert natural["caat"] == pytest.approx(.70)  # t1's seeds only, not all nine runs


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs)["href"])


def test_interactive_views_exist_are_linked_and_hold_a_plotly_figure(analysed):
    parser = _Links()
    parser.feed((analysed / "summary.html").read_text())
    views = sorted(p for p in parser.links if p.startswith("optuna/"))
    expected = sorted(
        [f"optuna/clean_{m}_{v}.html" for m in ("caat", "trades")
         for v in ("parallel_coordinate", "contour_val_natural_acc", "contour_val_robust_acc",
                   "pareto_front")]
        # One completed trial: no importances, so no contour.
        + [f"optuna/noisy20_caat_{v}.html" for v in ("parallel_coordinate", "pareto_front")])
    assert views == expected
    for link in views:
        page = (analysed / link).read_text()
        assert re.search(r"Plotly\.newPlot\(", page)
        # Offline: plotly.js from the one bundle beside the pages, never a CDN.
        assert re.search(r'<script[^>]* src="plotly\.min\.js"', page)
        assert "cdn.plot.ly" not in page
    assert (analysed / "optuna" / "plotly.min.js").stat().st_size > 1_000_000
    assert "<h3>clean/caat</h3>" in (analysed / "summary.html").read_text()


def test_the_plots_are_written(analysed):
    for name in ("importance.png", "pareto_configs.png", "tradeoff.png"):
        assert (analysed / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (analysed / "summary.html").read_text()
    assert "<img src='pareto_configs.png'" in html and "<img src='importance.png'" in html


def test_a_single_objective_front_is_the_best_config(store, tmp_path, capsys):
    _analyze(store, "so", tmp_path, capsys)
    table = pd.read_csv(tmp_path / "pareto_configs.csv")
    best = max(v for _, v in SINGLE["clean/caat"])
    want = {("tuning", t) for t, v in SINGLE["clean/caat"] if v == best}
    assert {(r.source, r.trial_id) for r in table.itertuples()} == want | {("confirmed",
                                                                           "so_t1")}
    imp = pd.read_csv(tmp_path / "importance.csv")
    assert set(imp["objective"]) == {"val_robust_acc"}
    assert imp["importance"].sum() == pytest.approx(1.0)
    # No constraints: no infeasible_configs.csv; one objective: nothing 2-D to plot.
    assert not (tmp_path / "infeasible_configs.csv").exists()
    assert not (tmp_path / "pareto_configs.png").exists()
    assert sorted(p.name for p in (tmp_path / "optuna").glob("*.html")) == [
        "clean_caat_contour_val_robust_acc.html", "clean_caat_parallel_coordinate.html"]


NEW_OUTPUTS = {"importance.csv", "importance.png", "pareto_configs.csv", "pareto_configs.png",
               "infeasible_configs.csv", "optuna"}


def test_an_unreadable_study_storage_is_a_note_not_a_crash(store, tmp_path, capsys):
    err = _analyze(store, "moved", tmp_path, capsys).err
    assert "cannot read it (no such file" in err and "gone.db" in err
    assert not {p.name for p in tmp_path.iterdir()} & NEW_OUTPUTS
    # Reading never creates the database it looked for.
    assert not (store[1] / "gone.db").exists()


def test_an_older_sweep_without_studies_writes_what_it_always_did(tmp_path, capsys):
    uri = build_store(tmp_path / "store")
    out = tmp_path / "toy"
    assert main(["analyze", "toy", "--out", str(out), "--tracking-uri", uri]) == 0
    assert not {p.name for p in out.iterdir()} & NEW_OUTPUTS
    header = (out / "selected_runs.csv").read_text().splitlines()[0]
    assert "tuned_by" not in header
    assert "optuna" not in (out / "summary.html").read_text().lower()


# ---------------------------------------------------------------- select_runs, by hand


def _run(seed, tuned_by, value, trial):
    return {"run_id": f"r{trial}", "trial_id": trial, "cell": "s/caat", "scenario": "s",
            "method": "caat", "seed": seed, "phase": "confirm", "outcome": "completed",
            "status": "FINISHED", "error": None, "tuned_by": tuned_by, "val_robust_acc": value}


def test_select_runs_picks_the_tuned_by_group_with_the_best_mean():
    runs = normalise_runs(pd.DataFrame([
        _run(0, "t_b", .50, "c1"), _run(1, "t_b", .40, "c2"),  # mean .45
        _run(0, "t_a", .44, "c3"), _run(1, "t_a", .44, "c4"),  # mean .44
        _run(0, "t_c", .90, "c5"), _run(1, "t_c", math.nan, "c6"),  # mean .90 (NaN skipped)
    ]))
    assert set(select_runs(runs, "val_robust_acc", "max")["trial_id"]) == {"c5", "c6"}
    assert set(select_runs(runs, "val_robust_acc", "min")["trial_id"]) == {"c3", "c4"}


def test_best_confirmed_ties_go_to_the_earliest_tuning_trial_and_untagged_runs_stay_whole():
    runs = normalise_runs(pd.DataFrame([
        _run(0, "t_2", .5, "c1"), _run(0, "t_1", .5, "c2"), _run(1, "t_1", .5, "c3")]))
    assert set(best_confirmed(runs, "val_robust_acc")["trial_id"]) == {"c2", "c3"}
    old = runs.assign(tuned_by=None)
    assert best_confirmed(old, "val_robust_acc") is old
