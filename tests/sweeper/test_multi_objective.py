"""Trade-off-aware search: the selection's schema, Pareto fronts, and a searcher that confirms
a spread of a cell's Pareto configs, keeps stopped trials PRUNED and honours constraints."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import optuna
import pytest
from sweep_support import tiny_space

from sweeper.pareto import non_dominated, spread
from sweeper.search import SWEEP_KEY, CellScheduler, CellSearcher
from sweeper.spaces import parse_space
from trainables.errors import ConfigError

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
TWO = {"metrics": ["val_natural_acc", "val_robust_acc"], "modes": ["max", "max"]}
CELL_ERM, CELL_TRADES = "pair-0.2_ir-1_eps-0.1/erm", "pair-0.2_ir-1_eps-0.1/trades"


# ------------------------------------------------------------------------------ schema


def test_single_metric_selection_means_what_it_meant():
    sel = parse_space(tiny_space()).space.selection
    assert sel.objectives == [("val_robust_acc", "max")] and not sel.multi
    assert sel.primary == ("val_robust_acc", "max")
    sel = parse_space(tiny_space(selection={"metric": "val_natural_acc", "mode": "min"})
                      ).space.selection
    assert sel.objectives == [("val_natural_acc", "min")]


def test_two_objectives_with_prune_on_and_a_constraint():
    space = parse_space(tiny_space(selection={
        **TWO, "prune_on": "val_robust_acc",
        "constraints": {"val_natural_acc": {"min": 0.7}}})).space
    sel = space.selection
    assert sel.multi and sel.primary == ("val_robust_acc", "max") and space.top_k == 3
    assert sel.violations({"val_natural_acc": 0.75}) == [pytest.approx(-0.05)]
    assert sel.violations({"val_natural_acc": 0.6}) == [pytest.approx(0.1)]
    assert sel.violations({}) == [float("inf")]


@pytest.mark.parametrize(("selection", "extra", "message"), [
    ({"metrics": ["val_natural_acc"]}, {}, "at least 2 items"),
    ({"metrics": ["val_natural_acc", "val_natural_acc"]}, {}, "lists a metric twice"),
    ({**TWO, "modes": ["max"]}, {}, "needs one per metric"),
    ({**TWO, "prune_on": "val_boundary_error"}, {}, "not one of the metrics"),
    ({"metric": "val_robust_acc", "metrics": TWO["metrics"]}, {}, "not both"),
    ({"metric": "val_robust_acc", "prune_on": "val_robust_acc"}, {}, "go with `metrics`"),
    ({"metrics": ["val_natural_acc", "test_robust_acc"]}, {}, "selection.metrics"),
    ({**TWO, "constraints": {"val_natural_acc": {}}}, {}, "needs `min`, `max` or both"),
    ({}, {"optuna": {"sampler": "nsga2"}}, "nsga2 is for two or three objectives"),
    ({}, {"confirm": {"top_k": 2}}, "top_k > 1 needs selection.metrics"),
])
def test_bad_selections_are_refused_in_one_line(selection, extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_space(tiny_space(selection=selection, **extra) if selection
                    else tiny_space(**extra))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ fronts


def _brute_front(points, modes):
    signs = [1 if m == "max" else -1 for m in modes]
    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if i == j:
                continue
            better_or_equal = all(s * a >= s * b for s, a, b in zip(signs, q, p, strict=True))
            better = any(s * a > s * b for s, a, b in zip(signs, q, p, strict=True))
            dominated |= better_or_equal and better
        out.append(not dominated)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_non_dominated_matches_brute_force(seed):
    rng = random.Random(seed)
    k = rng.choice([2, 3])
    modes = [rng.choice(["max", "min"]) for _ in range(k)]
    # Few distinct values: ties and duplicates are common.
    points = [[rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(k)]
              for _ in range(rng.randint(1, 30))]
    assert list(non_dominated(points, modes)) == _brute_front(points, modes)


def test_spread_keeps_both_ends_and_spaces_the_rest():
    front = [[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.3, 0.7], [0.1, 0.9]]
    picks = spread(front, ["max", "max"], 3)
    assert [front[i] for i in picks] == [[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]]
    assert spread(front, ["max", "max"], 1) == [0]
    assert sorted(spread(front, ["max", "max"], 9)) == list(range(5))


# ---------------------------------------------------------------------------- searcher


def _result(epoch: int, natural: float | None = None, robust: float | None = None) -> dict:
    out = {"epoch": epoch, "training_iteration": epoch}
    if natural is not None:
        out |= {"val_natural_acc": natural, "val_robust_acc": robust}
    return out


def _erm(**top) -> dict:
    """A one-cell space (ERM: only the learning rate to search)."""
    space = tiny_space(methods=["erm"], **top)
    del space["search"]["trades"]
    return space


def _study(url: str, cell: str):
    return optuna.load_study(study_name=cell, storage=url)


def test_searcher_confirms_a_spread_of_the_pareto_set(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = parse_space(_erm(trials_per_cell=7, selection=TWO,
                                  confirm={"seeds": [1, 2], "top_k": 2}))
    searcher = CellSearcher(plan, url, CellScheduler(plan))
    tuning = {f"t{i}": searcher.suggest(f"t{i}") for i in range(7)}
    assert all(c[SWEEP_KEY]["phase"] == "tune" for c in tuning.values())
    # (natural, robust) at the last epoch; t4 is stopped early with a value that would
    # dominate everything, t5 fails, t6 misses an objective.
    ends = {"t0": _result(3, 0.90, 0.10), "t1": _result(3, 0.60, 0.40),
            "t2": _result(3, 0.50, 0.30), "t3": _result(3, 0.20, 0.60),
            "t4": _result(1, 0.99, 0.99), "t6": {"epoch": 3, "val_natural_acc": 0.95}}
    for t, result in ends.items():
        searcher.on_trial_complete(t, result)
    searcher.on_trial_complete("t5", None, error=True)
    # Front of t0, t1, t3 (t2 is dominated by t1); 2 picks spread along it: both ends.
    assert [t for t, _ in searcher.confirm_configs(CELL_ERM)] == ["t0", "t3"]
    confirm = [searcher.suggest(f"c{i}") for i in range(4)]
    assert [(c[SWEEP_KEY]["tuned_by"], c["runtime"]["seed"]) for c in confirm] == [
        ("t0", 1), ("t0", 2), ("t3", 1), ("t3", 2)]
    assert confirm[0]["optim"]["lr"] == tuning["t0"]["optim"]["lr"]
    assert searcher.suggest("c4") == CellSearcher.FINISHED

    searcher.flush()
    study = _study(url, CELL_ERM)
    assert study.metric_names == ["val_natural_acc", "val_robust_acc"]
    assert [t.state.name for t in study.trials] == [
        "COMPLETE", "COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "FAIL", "FAIL"]
    # The stopped trial never enters Optuna's front either.
    assert sorted(t.number for t in study.best_trials) == [0, 1, 3]


def test_constraints_keep_infeasible_configs_out_of_confirmation(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = parse_space(_erm(
        trials_per_cell=3, confirm={"seeds": [1]},
        selection={"metric": "val_robust_acc",
                   "constraints": {"val_natural_acc": {"min": 0.5}}}))
    searcher = CellSearcher(plan, url)
    for t in ("t0", "t1", "t2"):
        searcher.suggest(t)
    searcher.on_trial_complete("t0", _result(3, 0.40, 0.60))  # most robust, too inaccurate
    searcher.on_trial_complete("t1", _result(3, 0.55, 0.45))  # <- best feasible
    searcher.on_trial_complete("t2", _result(3, 0.80, 0.30))
    assert searcher.suggest("c0")[SWEEP_KEY]["tuned_by"] == "t1"
    searcher.flush()
    study = _study(url, CELL_ERM)
    assert [t.user_attrs["constraint_violations"] for t in study.trials] == [
        [pytest.approx(0.1)], [pytest.approx(-0.05)], [pytest.approx(-0.3)]]
    # Optuna's own record of them: its front leaves out the infeasible trial.
    assert [t.number for t in study.best_trials] == [1]


def test_no_feasible_config_means_no_confirmation(tmp_path):
    plan = parse_space(_erm(
        trials_per_cell=2, confirm={"seeds": [1]},
        selection={**TWO, "constraints": {"val_natural_acc": {"min": 0.9}}}))
    searcher = CellSearcher(plan, f"sqlite:///{tmp_path / 'optuna.db'}")
    for t, nat in (("t0", 0.5), ("t1", 0.6)):
        searcher.suggest(t)
        searcher.on_trial_complete(t, _result(3, nat, 0.3))
    assert searcher.suggest("c0") == CellSearcher.FINISHED
    assert searcher.confirm_skipped() == [CELL_ERM]


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_each_sampler_drives_a_multi_objective_study(tmp_path, sampler):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    plan = parse_space(tiny_space(methods=["trades"], trials_per_cell=12, selection=TWO,
                                  optuna={"sampler": sampler, "n_startup_trials": 4,
                                          "population_size": 4}))
    searcher = CellSearcher(plan, url)
    rng = random.Random(0)
    for i in itertools.count():
        config = searcher.suggest(f"t{i}")
        if config is None or config == CellSearcher.FINISHED or \
                config[SWEEP_KEY]["phase"] != "tune":
            break
        searcher.on_trial_complete(f"t{i}", _result(3, rng.random(), rng.random()))
        searcher.save(str(tmp_path / "state"))  # verdicts reach the study as the sweep goes
    searcher.flush()
    used = searcher._study(plan.cells[0]).study.sampler
    assert type(used).__name__ == {"tpe": "TPESampler", "nsga2": "NSGAIISampler",
                                   "random": "RandomSampler"}[sampler]
    study = _study(url, CELL_TRADES)
    assert len(study.trials) == 12 and all(t.state.name == "COMPLETE" for t in study.trials)
    # Sampled, not replayed (NSGA-II's crossover and mutation may return a parent whole, so
    # more distinct configs than its first generation is what shows it sampling).
    configs = {(t.params["optim.lr"], t.params["method.beta"]) for t in study.trials}
    assert len(configs) >= (5 if sampler == "nsga2" else 12)


# ------------------------------------------------------------------- a whole sweep


@pytest.mark.slow
def test_theory_tradeoff_sweep_end_to_end(ray_local, tmp_path):
    """search_spaces/theory_tradeoff.yaml at test size: two objectives and a constraint,
    through launch, confirmation of Pareto configs and analyze, artifacts in MLflow."""
    import pandas as pd
    import yaml
    from mlflow.tracking import MlflowClient
    from sweep_support import write_space

    from sweeper.cli import main
    from sweeper.contract import RAY_TRIAL_ATTR
    from sweeper.tracking import Tracker

    space = yaml.safe_load((SPACES / "theory_tradeoff.yaml").read_text())
    space["base"]["dataset"].update(n_train=600, n_test=300)
    space["base"]["scenario"] = {"meta_per_class": 10, "val_per_class": 30}
    space["base"]["method"]["steps"] = 3
    space["base"]["optim"]["epochs"] = 4
    space["base"]["eval"].update(steps=5)
    space["scenarios"] = space["scenarios"][:1]
    space["methods"] = ["trades", "caat"]
    del space["search"]["frl"]
    space["trials_per_cell"] = 8
    space["asha"]["grace_period"] = 2
    space["selection"]["constraints"] = {"val_natural_acc": {"min": 0.3}}
    space["optuna"]["n_startup_trials"] = 4
    space["confirm"]["seeds"] = [1, 2]
    path = write_space(tmp_path / "tradeoff.yaml", space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["launch", str(path), "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", uri, "--quiet"]) == 0
    out = tmp_path / "analysis"
    assert main(["analyze", "theory_tradeoff", "--out", str(out), "--tracking-uri", uri]) == 0

    runs = Tracker(uri, "theory_tradeoff").trial_runs()
    confirmed = {}
    for r in runs:
        if r.data.tags["phase"] == "confirm":
            confirmed.setdefault(r.data.tags["cell"], set()).add(r.data.tags["tuned_by"])
    assert set(confirmed) == {"clean_ir-1_eps-0.1/trades", "clean_ir-1_eps-0.1/caat"}

    importance = pd.read_csv(out / "importance.csv")
    sums = importance.groupby(["cell", "objective"])["importance"].sum()
    assert len(sums) == 2 * 2 and sums.to_numpy() == pytest.approx(1.0)

    fronts = pd.read_csv(out / "pareto_configs.csv")
    url = f"sqlite:///{tmp_path / 'runs' / 'theory_tradeoff' / 'optuna.db'}"
    modes = ["max", "max"]
    for cell in confirmed:
        study = optuna.load_study(study_name=cell, storage=url)
        feasible = [t for t in study.trials if t.state.name == "COMPLETE"
                    and all(c <= 0 for c in t.user_attrs["constraint_violations"])]
        mask = _brute_front([t.values for t in feasible], modes)
        expected = {t.user_attrs[RAY_TRIAL_ATTR] for t, keep in zip(feasible, mask, strict=True)
                    if keep}
        listed = fronts[(fronts.cell == cell) & (fronts.source == "tuning")]
        assert set(listed.trial_id) == expected, cell
        # The cell confirmed configs of its tuning front: all of it, or top_k spread along
        # it. (How many the front holds depends on how the trials came out; a front of one
        # config that dominates the rest is a legitimate outcome at this size.)
        assert confirmed[cell] <= expected
        assert len(confirmed[cell]) == min(space["confirm"]["top_k"], len(expected)), cell

    parent = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("caat-sweep/theory_tradeoff").experiment_id],
        "tags.role = 'parent'")[0]
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id, "analysis")}
    assert {"analysis/summary.html", "analysis/importance.csv",
            "analysis/pareto_configs.csv"} <= logged


# ------------------------------------------------------------------- the studies' storage


def test_study_storage_defaults_to_sqlite_in_a_local_sweep_and_needs_a_url_otherwise(tmp_path):
    from sweeper import storage as st

    assert st.study_storage(str(tmp_path / "s")) == f"sqlite:///{tmp_path / 's' / 'optuna.db'}"
    assert st.study_storage("s3://bucket/s", "postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ConfigError, match=r"--optuna-storage: the sweep's storage "
                                          r"s3://bucket/s is not a local directory"):
        st.study_storage("s3://bucket/s")
    with pytest.raises(ConfigError, match="--optuna-storage: 'optuna.db' is not a database URL"):
        st.study_storage(str(tmp_path), "optuna.db")


def test_launch_refuses_a_bad_study_storage_before_writing_anything(tmp_path, capsys):
    from sweep_support import write_space

    from sweeper.cli import main
    from sweeper.search import check_study_storage

    space = write_space(tmp_path / "space.yaml", tiny_space())
    args = ["launch", str(space), "--storage", str(tmp_path / "runs"), "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main([*args, "--optuna-storage", "optuna.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a database URL" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    # A database that already holds one of the sweep's cells (another sweep's) is refused.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name=CELL_TRADES, storage=url)
    with pytest.raises(ConfigError, match=r"already holds studies of this sweep's cells "
                                          rf"\({CELL_TRADES}\)"):
        check_study_storage(url, parse_space(tiny_space()))
    with pytest.raises(ConfigError, match="--optuna-storage: cannot open nosuchdb://x"):
        check_study_storage("nosuchdb://x", parse_space(tiny_space()))
