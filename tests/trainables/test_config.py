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


@pytest.mark.parametrize("method, interval, lr", [("caat", 20, 1e-4), ("mwn", 50, 1e-3),
                                                  ("trades", 50, 1e-3)])
def test_meta_defaults_are_per_method_and_resolved(method, interval, lr):
    cfg = load_config({"method": {"name": method}})
    assert cfg.method.meta_interval is None and cfg.method.meta_lr is None
    assert (cfg.meta_interval, cfg.meta_lr) == (interval, lr)
    resolved = cfg.resolved()["method"]
    assert (resolved["meta_interval"], resolved["meta_lr"]) == (interval, lr)
    # A value in the config wins, whatever the method.
    cfg = load_config({"method": {"name": method, "meta_interval": 7, "meta_lr": 0.01}})
    assert (cfg.meta_interval, cfg.meta_lr) == (7, 0.01)


def test_caat_meta_knobs_validate():
    with pytest.raises(ConfigError, match="method.direction_policy: allowed: 'meta'"):
        load_config({"method": {"direction_policy": "oracle"}})
    with pytest.raises(ConfigError, match="method.anti_fraction: Input should be less than"):
        load_config({"method": {"anti_fraction": 1.5}})
    with pytest.raises(ConfigError, match="method.meta_temperature: Input should be greater"):
        load_config({"method": {"meta_temperature": 0}})
    assert load_config({"method": {"meta_temperature": None}}).method.meta_temperature is None


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config({"method": {"beta": 1.0}},
                      ["method.beta=6", "method.name=pgd_at", "optim.nesterov=false",
                       "method.bound_range=[0.2, 2.0]", "dataset.train_size=null"])
    assert cfg.method.beta == 6.0 and cfg.method.name == "pgd_at"
    assert cfg.optim.nesterov is False
    assert cfg.method.bound_range == (0.2, 2.0)
    assert cfg.dataset.train_size is None


def test_flatten_round_trips_dotted_names():
    flat = flatten(load_config().resolved())
    assert "method.beta" in flat and "runtime.seed" in flat
    assert isinstance(flat["dataset.shape"], list)


@pytest.mark.parametrize("raw, overrides, expected", [
    ({"method": {"betaa": 1}}, [], "method.betaa: unknown key; allowed: "),
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
