import pytest

from trainables.config import flatten, load_config, read_yaml
from trainables.errors import ConfigError


def test_empty_config_trains_fashion_mnist_with_dataset_eps():
    cfg = load_config()
    assert cfg.dataset.name == "fashion_mnist"
    assert cfg.train_eps == pytest.approx(0.1)
    assert cfg.eval_eps == cfg.train_eps
    assert cfg.eval_step_size == pytest.approx(0.025)
    resolved = cfg.resolved()
    assert resolved["method"]["eps"] == pytest.approx(0.1)
    assert resolved["eval"]["steps"] == 20


def test_cifar_default_eps_is_8_over_255():
    assert load_config({"dataset": {"name": "cifar10"}}).train_eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("method, knobs", [
    ("caat", {"meta_interval": 20, "meta_lr": 1e-4, "meta_weight_decay": 5e-4,
              "margin_limit": 2.5, "bound_step": "fixed"}),
    ("mwn", {"meta_interval": 50, "meta_lr": 1e-3, "meta_weight_decay": 1e-4}),
    ("frl", {"margin_limit": 3.0, "bound_step": "max_bound"})])
def test_defaults_are_per_method_and_resolved(method, knobs):
    cfg = load_config({"method": {"name": method}})
    resolved = cfg.resolved()["method"]
    for key, value in knobs.items():
        assert getattr(cfg.method, key) == value and resolved[key] == value, key
    # A value in the config wins.
    given = {k: v for k, v in {"meta_interval": 7, "margin_limit": 1.5}.items() if k in knobs}
    cfg = load_config({"method": {"name": method, **given}})
    assert {k: getattr(cfg.method, k) for k in given} == given


@pytest.mark.parametrize("method, has", [("erm", set()), ("pgd_at", {"eps", "step_size", "steps"}),
                                         ("trades", {"eps", "step_size", "steps", "beta"}),
                                         ("mwn", {"meta_interval", "meta_lr"})])
def test_a_method_holds_only_its_own_knobs(method, has):
    resolved = load_config({"method": {"name": method}}).resolved()["method"]
    assert has <= set(resolved) - {"name"}
    assert not {"beta", "meta_lr", "tolerance", "temperature"} - has & set(resolved)
    if method == "erm":
        assert resolved == {"name": "erm"}


def test_caat_meta_knobs_validate():
    caat = {"name": "caat"}
    with pytest.raises(ConfigError, match="method.direction_policy: allowed: 'meta'"):
        load_config({"method": {**caat, "direction_policy": "oracle"}})
    with pytest.raises(ConfigError, match="method.anti_fraction: Input should be less than"):
        load_config({"method": {**caat, "anti_fraction": 1.5}})
    with pytest.raises(ConfigError, match="method.meta_temperature: Input should be greater"):
        load_config({"method": {**caat, "meta_temperature": 0}})
    with pytest.raises(ConfigError, match=r"method: bound_range must be \[lo, hi\]"):
        load_config({"method": {**caat, "bound_range": [2, 1]}})
    assert load_config({"method": {**caat, "meta_temperature": None}}).method.meta_temperature \
        is None


def test_a_knob_of_another_method_names_the_method_and_lists_its_knobs():
    with pytest.raises(ConfigError) as err:
        load_config({"method": {"name": "trades", "meta_lr": 0.01}})
    assert str(err.value) == ("method.meta_lr: unknown key for method 'trades'; allowed: beta, "
                              "eps, step_size, steps")
    with pytest.raises(ConfigError, match="method.beta: unknown key for method 'erm'; it has "
                                          "no knobs"):
        load_config({"method": {"beta": 6}}, ["method.name=erm"])


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config({"method": {"beta": 1.0}},
                      ["method.beta=6", "method.name=caat", "optim.nesterov=false",
                       "method.bound_range=[0.2, 2.0]", "dataset.train_size=null"])
    assert cfg.method.beta == 6.0 and cfg.method.name == "caat"
    assert cfg.optim.nesterov is False
    assert cfg.method.bound_range == (0.2, 2.0)
    assert cfg.dataset.train_size is None


def test_flatten_round_trips_dotted_names():
    flat = flatten(load_config().resolved())
    assert "method.beta" in flat and "runtime.seed" in flat
    assert isinstance(flat["dataset.shape"], list)


@pytest.mark.parametrize("raw, overrides, expected", [
    ({"method": {"betaa": 1}}, [], "method.betaa: unknown key for method 'trades'; allowed: "),
    ({"foo": {}}, [], "foo: unknown key; allowed: dataset, eval"),
    ({"optim": {"epochs": "many"}}, [], "optim.epochs:"),
    ({"optim": {"lr": -1}}, [], "optim.lr: Input should be greater than 0"),
    ({"scenario": {"noise_rate": 1.5}}, [], "scenario.noise_rate:"),
    ({"scenario": {"noise_type": "gaussian"}}, [], "scenario.noise_type: allowed: 'none'"),
    ({"scenario": {"noise_rate": 0.2}}, [], "noise_rate > 0 needs noise_type"),
    ({"method": {"name": "sgd"}}, [], "method.name: unknown 'sgd'; allowed: "),
    ({"dataset": {"name": "mnist"}}, [], "dataset.name: unknown 'mnist'; allowed: "),
    ({"model": {"arch": "vgg"}}, [], "model.arch: unknown 'vgg'; allowed: "),
    ({}, ["method.beta"], "expected KEY=VALUE"),
    ({"method": {"beta": 1}}, ["method.beta.x=1"], "method.beta: is a value"),
    ([1, 2], [], "expected a mapping"),
])
def test_bad_configs_fail_with_one_line_naming_the_field(raw, overrides, expected):
    if isinstance(raw, list):
        from trainables.config import validate

        with pytest.raises(ConfigError) as err:
            validate(raw)
    else:
        with pytest.raises(ConfigError) as err:
            load_config(raw, overrides)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ConfigError) as err:
        load_config({"method": {"name": "nope"}})
    for name in ("erm", "pgd_at", "trades"):
        assert name in str(err.value)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method:\n  name: erm\n  beta: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+ malformed YAML"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="no such file"):
        read_yaml(tmp_path / "missing.yaml")


def test_shipped_trial_configs_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parents[2] / "search_spaces" / "trials").glob("*.yaml"))
    assert {f.stem for f in files} >= {"fashion_mnist", "cifar10"}
    for f in files:
        load_config(f)


def test_a_config_recorded_before_methods_owned_their_knobs_still_reads():
    from trainables.config import recorded_config, same_config

    # What the flat schema wrote for an ERM trial: every method's knobs.
    old = {"method": {"name": "erm", "eps": 0.1, "steps": 5, "beta": 6.0, "meta_lr": 1e-3},
           "optim": {"epochs": 2}}
    with pytest.raises(ConfigError, match="unknown key for method 'erm'"):
        load_config(old)
    cfg = load_config(recorded_config(old))
    assert cfg.resolved()["method"] == {"name": "erm"} and cfg.optim.epochs == 2
    # The same config, recorded then and resolved now; another value is another config.
    stored = load_config({"method": {"name": "trades", "beta": 3.0}}).resolved()
    stored["method"].update(meta_lr=1e-3, tolerance=0.05)
    assert same_config(stored, load_config({"method": {"name": "trades", "beta": 3.0}}).resolved())
    assert not same_config(stored, load_config({"method": {"name": "trades"}}).resolved())
    assert not same_config(None, load_config().resolved())
