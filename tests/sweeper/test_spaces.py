"""Search-space files: shipped spaces parse and expand; each kind of bad file exits 2 with
one line naming the field, and leaves nothing in storage or MLflow."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from sweep_support import tiny_space, write_space

from sweeper.cli import main
from sweeper.spaces import Distribution, load_space, parse_space
from trainables.config import validate
from trainables.errors import ConfigError

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.mark.parametrize("name, n_cells, first", [
    ("quick.yaml", 8, "pair-0.2_ir-1_eps-0.1/erm"),
    ("theory.yaml", 31, "clean_ir-1_eps-0.05/erm"),
    ("cifar10_noise.yaml", 20, "uniform-0.2_ir-1_eps-0.03137/pgd_at"),
    ("cifar10_imbalance.yaml", 20, "clean_ir-10_eps-0.03137/pgd_at"),
    ("cifar10_bounds.yaml", 17, "pair-0.4_ir-1_eps-0.01569/pgd_at"),
])
def test_shipped_spaces_parse_and_expand(name, n_cells, first):
    plan = load_space(SPACES / name)
    assert len(plan.cells) == n_cells
    assert plan.cells[0].id == first
    assert len({c.id for c in plan.cells}) == n_cells


def test_checkpoints_kept_per_trial():
    assert load_space(SPACES / "quick.yaml").space.keep_checkpoints == 2
    for name in ("cifar10_noise.yaml", "cifar10_imbalance.yaml", "cifar10_bounds.yaml"):
        assert load_space(SPACES / name).space.keep_checkpoints == 3


def test_quick_space_is_the_cpu_demo():
    plan = load_space(SPACES / "quick.yaml")
    assert plan.name == "quick"
    assert [c.id for c in plan.cells] == [
        f"{s}/{m}" for s in ("pair-0.2_ir-1_eps-0.1", "clean_ir-10_eps-0.1")
        for m in ("erm", "pgd_at", "trades", "caat")]
    cfg = plan.trial_config(plan.cells[0], {}, None)
    assert cfg["dataset"]["name"] == "fashion_mnist"
    assert plan.space.resources.gpu == 0 and plan.space.confirm.seeds == [1, 2]


def test_tuning_trials_skip_the_test_split_only_when_asked(tmp_path):
    from sweeper.search import SWEEP_KEY, CellSearcher

    for tune_test, expected in ((True, "every"), (False, "none")):
        plan = parse_space(tiny_space(confirm={"seeds": [1], "tune_test": tune_test}))
        searcher = CellSearcher(plan, f"sqlite:///{tmp_path}/{tune_test}.db")
        tune = searcher.suggest("t1")
        assert tune[SWEEP_KEY]["phase"] == "tune" and tune["eval"].get("test", "every") == expected
        # The confirmation runs, which the tables read, always evaluate test.
        confirm = plan.trial_config(plan.cells[0], {}, 1)
        assert confirm["eval"].get("test", "every") == "every"


AA = {"autoattack": "fast", "autoattack_samples": 300}


def _eval(cfg: dict) -> dict:
    """AutoAttack's settings in a trial config (a searcher's, with its sweep entry, too)."""
    from sweeper.search import SWEEP_KEY

    trial = validate({k: v for k, v in cfg.items() if k != SWEEP_KEY})
    return trial.eval.model_dump(include={"autoattack", "autoattack_samples"})


def test_confirm_eval_reaches_confirmation_trials_only(tmp_path):
    from sweeper.search import SWEEP_KEY, CellSearcher

    plan = parse_space(tiny_space(confirm={"seeds": [1, 2], "tune_test": False, "eval": AA}))
    assert plan.space.confirm.overrides() == {"eval.autoattack": "fast",
                                              "eval.autoattack_samples": 300}
    cell = plan.cells[0]
    assert _eval(plan.trial_config(cell, {}, None, tuning=True)) == {
        "autoattack": "none", "autoattack_samples": 1000}
    assert _eval(plan.trial_config(cell, {"optim.lr": 0.05}, 1)) == AA
    # The searcher's path: tuning trials first, then each cell's confirmation trials.
    searcher = CellSearcher(plan, f"sqlite:///{tmp_path}/optuna.db")
    tuning = [searcher.suggest(f"t{i}") for i in range(4)]
    assert {c[SWEEP_KEY]["phase"] for c in tuning} == {"tune"}
    assert all(_eval(c)["autoattack"] == "none" and c["eval"]["test"] == "none" for c in tuning)
    for i in range(4):
        searcher.on_trial_complete(f"t{i}", {"epoch": 3, "val_robust_acc": 0.1 * i})
    confirm = [searcher.suggest(f"c{i}") for i in range(4)]
    assert [c[SWEEP_KEY]["phase"] for c in confirm] == ["confirm"] * 4
    assert all(_eval(c) == AA and c["eval"].get("test", "every") == "every" for c in confirm)
    assert sorted(c["runtime"]["seed"] for c in confirm) == [1, 1, 2, 2]


def test_a_space_without_confirm_eval_gives_the_configs_it_always_gave():
    # What a sweep launched before `confirm.eval` resumes with (its manifest's space text).
    text = yaml.safe_dump(tiny_space())
    plan = parse_space(yaml.safe_load(text), text=text)
    assert plan.space.confirm.eval == {} and plan.space.confirm.overrides() == {}
    for tuning in (True, False):
        cfg = plan.trial_config(plan.cells[0], {}, 1, tuning=tuning)
        assert cfg == {**plan.cells[0].config, "runtime": {**plan.cells[0].config["runtime"],
                                                           "seed": 1}}


@pytest.mark.parametrize("name, mode, samples", [
    ("quick.yaml", "fast", 100), ("cifar10_noise.yaml", "standard", "all"),
    ("cifar10_imbalance.yaml", "standard", "all"), ("cifar10_bounds.yaml", "standard", "all")])
def test_shipped_spaces_run_autoattack_in_confirmation_only(name, mode, samples):
    plan = load_space(SPACES / name)
    for cell in plan.cells:
        tune = validate(plan.trial_config(cell, {}, None, tuning=True)).eval
        confirm = validate(plan.trial_config(cell, {}, plan.space.confirm.seeds[0])).eval
        assert tune.autoattack == "none"
        assert (confirm.autoattack, confirm.autoattack_samples) == (mode, samples)
        assert confirm.test != "none"


def test_cells_expand_with_ids_spaces_and_fixed_values():
    space = tiny_space(
        methods=["erm", "trades", "caat"],
        scenarios=[{"noise_type": "pair", "noise_rate": 0.4},
                   {"imbalance_ratio": 10, "eps": 0.2},
                   {"name": "wide", "bound_mode": "sample", "bound_range": [0.5, 2.0],
                    "methods": ["caat"]}],
        search={"all": {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
                        "method.steps": 3},
                "trades": {"method.beta": {"type": "categorical", "choices": [1.0, 6.0]},
                           "method.steps": 4}},
        resources={"cpu": 2})
    plan = parse_space(space)
    assert [c.id for c in plan.cells] == [
        "pair-0.4_ir-1_eps-0.1/erm", "pair-0.4_ir-1_eps-0.1/trades",
        "pair-0.4_ir-1_eps-0.1/caat", "clean_ir-10_eps-0.2/erm",
        "clean_ir-10_eps-0.2/trades", "clean_ir-10_eps-0.2/caat", "wide/caat"]
    erm, trades, caat = plan.cells[:3]
    assert set(erm.space) == {"optim.lr"} and set(trades.space) == {"optim.lr", "method.beta"}
    # A method's own block wins over `all`; a knob under `all` goes to the methods that
    # have it (ERM has no attack); torch threads follow the trial's CPUs.
    assert erm.config["method"] == {"name": "erm"}
    assert trades.config["method"]["steps"] == 4 and caat.config["method"]["steps"] == 3
    assert erm.config["runtime"]["threads"] == 2
    # A scenario's eps goes to the methods that attack, and names the scenario for all.
    assert plan.cells[4].config["method"]["eps"] == 0.2
    assert "eps" not in plan.cells[3].config["method"]
    assert plan.cells[6].config["method"]["bound_range"] == [0.5, 2.0]
    cfg = plan.trial_config(trades, {"optim.lr": 0.05, "method.beta": 6.0}, seed=3)
    assert cfg["optim"]["lr"] == 0.05 and cfg["method"]["beta"] == 6.0
    assert cfg["runtime"]["seed"] == 3 and cfg["scenario"]["noise_rate"] == 0.4


def test_a_space_searching_knobs_its_methods_never_read_is_refused():
    # The space of the issue: every cell would search knobs with no effect.
    space = tiny_space(search={"trades": {"method.meta_lr": {"type": "float", "low": 1e-4,
                                                               "high": 1e-2},
                                          "method.reweight_rate": 0.1},
                               "erm": {"method.beta": {"type": "float", "low": 1, "high": 6}}})
    with pytest.raises(ConfigError) as err:
        parse_space(space)
    assert str(err.value).startswith(
        "space: search.trades.method.meta_lr: not a knob of method 'trades'; allowed: "
        "method.beta, method.eps, method.step_size, method.steps, optim.batch_size")
    assert "\n" not in str(err.value)
    # Under `all`, in base and in a scenario, a knob no method of the sweep has is refused.
    for where, edit in (("search.all.method.meta_lr", {"search": {"all": {"method.meta_lr": 0.1}}}),
                        ("base: method.tolerance", {"base": {"method": {"tolerance": 0.1}}}),
                        ("scenarios[0]: method.bound_range",
                         {"scenarios": [{"bound_range": [0.5, 1.5]}]})):
        with pytest.raises(ConfigError, match=re.escape(where) + ": not a knob of any method "
                           r"of this sweep \(erm, trades\)"):
            parse_space({**tiny_space(), **edit})


def test_caat_direction_policy_and_meta_knobs_are_searched_like_any_knob():
    space = tiny_space(methods=["caat"], search={"caat": {
        "method.direction_policy": {"type": "categorical",
                                    "choices": ["meta", "random", "loss_rank"]},
        "method.anti_fraction": {"type": "float", "low": 0.1, "high": 0.5},
        "method.meta_temperature": {"type": "categorical", "choices": [None, 1.0]},
        "method.meta_init": "random"}})
    space["search"].pop("trades")
    plan = parse_space(space)
    [cell] = plan.cells
    assert set(cell.space) >= {"method.direction_policy", "method.anti_fraction",
                               "method.meta_temperature"}
    cfg = plan.trial_config(cell, {"method.direction_policy": "loss_rank",
                                   "method.anti_fraction": 0.3,
                                   "method.meta_temperature": None, "optim.lr": 0.05}, seed=1)
    method = validate(cfg).method
    assert (method.direction_policy, method.anti_fraction, method.meta_temperature,
            method.meta_init) == ("loss_rank", 0.3, None, "random")


def test_cell_with_nothing_to_search_runs_one_tuning_trial():
    space = tiny_space(trials_per_cell=5)
    space["search"] = {}
    plan = parse_space(space)
    assert all(plan.n_tune(c) == 1 for c in plan.cells)


@pytest.mark.parametrize("spec, kind", [
    ({"type": "float", "low": 0.01, "high": 1.0, "log": True}, "FloatDistribution"),
    ({"type": "float", "low": 0.0, "high": 1.0, "step": 0.25}, "FloatDistribution"),
    ({"type": "int", "low": 1, "high": 10}, "IntDistribution"),
    ({"type": "categorical", "choices": ["chosen", "both"]}, "CategoricalDistribution"),
])
def test_distributions_become_optuna_distributions(spec, kind):
    assert type(Distribution.model_validate(spec).to_optuna()).__name__ == kind


def _edit(path, value):
    def apply(space):
        node = space
        for key in path[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return apply


_DELETE = object()
LR = ("search", "all", "optim.lr")
BETA = ("search", "trades", "method.beta")

BAD = [
    ("unknown top-level key", _edit(("trials",), 3), "trials: unknown key; allowed: asha, base"),
    ("missing methods", _edit(("methods",), _DELETE), "methods: required"),
    ("no scenarios", _edit(("scenarios",), []), "scenarios: List should have at least 1"),
    ("unknown method", _edit(("methods",), ["erm", "fgsm"]),
     "methods[1]: unknown 'fgsm'; allowed: "),
    ("method listed twice", _edit(("methods",), ["erm", "erm"]), "methods: lists a method twice"),
    ("search block of another method", _edit(("search", "caat"), {}),
     "search.caat: not a method of this sweep; allowed: all, erm, trades"),
    ("unknown knob", _edit(("search", "trades", "method.betta"), 1.0),
     "search.trades.method.betta: not a knob of method 'trades'; allowed: method.beta"),
    ("scenario key searched", _edit(("search", "all", "scenario.noise_rate"), 0.1),
     "search.all.scenario.noise_rate: unknown or not searchable"),
    ("epochs searched", _edit(("search", "all", "optim.epochs"), 5),
     "search.all.optim.epochs: set per cell"),
    ("bad distribution type", _edit(BETA, {"type": "gaussian", "low": 1, "high": 2}),
     "search.trades.method.beta: type: allowed: 'float', 'int' or 'categorical'"),
    ("low above high", _edit(BETA, {"type": "float", "low": 5, "high": 1}),
     "search.trades.method.beta: needs low <= high"),
    ("log with low <= 0", _edit(LR, {"type": "float", "low": 0, "high": 1, "log": True}),
     "search.all.optim.lr: log scale needs low > 0"),
    ("categorical without choices", _edit(BETA, {"type": "categorical"}),
     "categorical needs a non-empty `choices` list"),
    ("mapping without type", _edit(BETA, {"low": 1, "high": 2}),
     "search.trades.method.beta: a distribution needs `type`"),
    ("float space on an int knob", _edit(("search", "trades", "method.steps"),
                                         {"type": "float", "low": 1, "high": 4}),
     "cell pair-0.2_ir-1_eps-0.1/trades with method.steps=2.5: method.steps:"),
    ("space reaches an invalid value", _edit(BETA, {"type": "float", "low": -1, "high": 2}),
     "cell pair-0.2_ir-1_eps-0.1/trades with method.beta=-1.0: method.beta: Input should be "
     "greater than or equal to 0"),
    ("bad base config", _edit(("base", "optim", "epochs"), 0),
     "base: optim.epochs: Input should be greater than or equal to 1"),
    ("unknown base key", _edit(("base", "optim", "lrate"), 0.1),
     "base: optim.lrate: unknown key; allowed: batch_size"),
    ("inconsistent scenario", _edit(("scenarios",), [{"noise_rate": 0.3}]),
     "scenarios[0]: scenario: noise_rate > 0 needs noise_type"),
    ("bad noise type", _edit(("scenarios",), [{"noise_type": "salt"}]),
     "scenarios[0].noise_type: allowed: 'none', 'uniform', 'pair' or 'flip2'"),
    ("duplicate scenario names", _edit(("scenarios",), [{"imbalance_ratio": 2}] * 2),
     "scenarios[1]: same name 'clean_ir-2_eps-0.1' as scenarios[0]"),
    ("scenario method not in sweep", _edit(("scenarios",), [{"methods": ["caat"]}]),
     "scenarios[0].methods: 'caat' is not in `methods`; allowed: erm, trades"),
    ("selection on test split", _edit(("selection",), {"metric": "test_robust_acc"}),
     "selection.metric: allowed: 'val_robust_acc'"),
    ("trials per cell 0", _edit(("trials_per_cell",), 0),
     "trials_per_cell: Input should be greater than or equal to 1"),
    ("keep no checkpoints", _edit(("keep_checkpoints",), 0),
     "keep_checkpoints: Input should be greater than or equal to 1"),
    ("gpu share", _edit(("resources",), {"gpu": 1.5}),
     "resources.gpu: needs a fraction of one GPU or a whole number"),
    ("repeated seeds", _edit(("confirm",), {"seeds": [1, 1]}), "confirm.seeds: needs distinct"),
    ("no run tests", _edit(("confirm",), {"seeds": [], "tune_test": False}),
     "confirm: tune_test: false needs confirmation seeds"),
    ("bad sweep name", _edit(("name",), "my sweep"), "name: String should match pattern"),
    ("unknown confirm.eval key", _edit(("confirm",), {"seeds": [1], "eval": {"autoatack": "fast"}}),
     "space.yaml: confirm.eval.autoatack: unknown key; allowed: autoattack, autoattack_best, "
     "autoattack_samples, autoattack_targets, batch_size, best_metric, eps, every, keep_best, "
     "max_samples, step_size, steps, test"),
    ("bad confirm.eval value", _edit(("confirm",), {"seeds": [1], "eval": {"autoattack": "full"}}),
     "space.yaml: confirm.eval.autoattack: allowed: 'none', 'fast' or 'standard'"),
    ("confirm.eval out of range", _edit(("confirm",), {"eval": {"autoattack_samples": 0}}),
     "space.yaml: confirm.eval.autoattack_samples: expected a number of test images >= 1, "
     "or all; got 0"),
    ("confirmation without test", _edit(("confirm",), {"eval": {"test": "none"}}),
     "space.yaml: confirm.eval.test: none would leave the confirmation runs, which the tables "
     "read, without test metrics; allowed: every, final"),
    ("confirm.eval without seeds", _edit(("confirm",), {"seeds": [], "eval": {"steps": 5}}),
     "space.yaml: confirm.eval: applies to confirmation trials only, and confirm.seeds is empty"),
    ("autoattack in tuning", _edit(("base", "eval", "autoattack"), "fast"),
     "space.yaml: cell pair-0.2_ir-1_eps-0.1/erm: eval.autoattack: fast would run in tuning "
     "trials too; ask for AutoAttack in confirmation trials only, under confirm.eval (confirm: "
     "{eval: {autoattack: fast}})"),
    ("missing data", _edit(("base", "dataset"), {"name": "cifar10",
                                                  "data_dir": "/nonexistent/cifar"}),
     "dataset.data_dir: no "),
]


@pytest.mark.parametrize("label, edit, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_space_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, label, edit,
                                                           expected):
    space = copy.deepcopy(tiny_space())
    edit(space)
    path = write_space(tmp_path / "space.yaml", space)
    assert _launch(tmp_path, path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert err.startswith("caat-sweep launch: error: ")
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize("text, expected", [
    ("methods: [erm\n", "malformed YAML"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
])
def test_unreadable_space_exits_2(tmp_path, capsys, text, expected):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    assert _launch(tmp_path, path) == 2
    assert expected in capsys.readouterr().err
    _assert_nothing_written(tmp_path)


def test_missing_space_file_exits_2(tmp_path, capsys):
    assert _launch(tmp_path, tmp_path / "nope.yaml") == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    _assert_nothing_written(tmp_path)


def test_bad_fault_injection_spec_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAAT_FAIL_AT_EPOCH", "two")
    path = write_space(tmp_path / "space.yaml", tiny_space())
    assert _launch(tmp_path, path) == 2
    assert "CAAT_FAIL_AT_EPOCH: 'two': expected EPOCH" in capsys.readouterr().err
    _assert_nothing_written(tmp_path)


def test_launch_refuses_a_name_already_in_storage(tmp_path, capsys):
    from sweeper.storage import Manifest

    Manifest(name="tiny", storage=str(tmp_path / "runs"), tracking_uri="sqlite:///x.db",
             space_text="", space_source="").save()
    path = write_space(tmp_path / "space.yaml", tiny_space())
    assert _launch(tmp_path, path) == 2
    assert "--name: a sweep 'tiny' exists" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_status_and_resume_of_unknown_sweep_exit_2(tmp_path, capsys):
    assert main(["status", "nope", "--storage", str(tmp_path / "runs")]) == 2
    assert "sweep 'nope': not found" in capsys.readouterr().err
    assert main(["resume", "nope", "--storage", str(tmp_path / "runs")]) == 2
    assert "sweep 'nope': not found" in capsys.readouterr().err


def test_parse_errors_name_the_source_file(tmp_path):
    path = write_space(tmp_path / "s.yaml", {**tiny_space(), "trials_per_cell": -1})
    with pytest.raises(ConfigError, match=r"s\.yaml: trials_per_cell"):
        load_space(path)
    assert yaml.safe_load(path.read_text())["trials_per_cell"] == -1


def _launch(tmp_path: Path, space: Path) -> int:
    return main(["launch", str(space), "--storage", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--quiet"])


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
