"""Model registry, in-model normalisation and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables import models
from trainables.models import (
    MODELS,
    build,
    count_parameters,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)

ALL_ARCHS = ["linear", "mlp", "preact_resnet18", "resnet32", "small_cnn", "wrn28_10"]
CHEAP_ARCHS = ["linear", "mlp", "resnet32", "small_cnn"]
HEAVY_ARCHS = ["preact_resnet18", "wrn28_10"]


def test_registry_holds_exactly_the_documented_archs():
    assert sorted(MODELS) == ALL_ARCHS


def test_unknown_arch_lists_allowed_names():
    with pytest.raises(ValueError) as err:
        build("resnet9000", 10)
    assert str(err.value) == (
        "model.arch: unknown 'resnet9000'; allowed: "
        "linear, mlp, preact_resnet18, resnet32, small_cnn, wrn28_10"
    )


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_flat_models_need_input_shape(arch):
    with pytest.raises(ValueError, match="input_shape"):
        build(arch, 10, 1)


def test_input_shape_must_match_in_channels():
    with pytest.raises(ValueError, match="in_channels"):
        build("mlp", 10, 3, input_shape=(1, 28, 28))


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        models.register_model("mlp")(lambda c, i, s: nn.Identity())


@pytest.mark.parametrize("arch", CHEAP_ARCHS)
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("hw", [28, 32])
def test_cheap_archs_forward_shape(arch, num_classes, in_channels, hw):
    torch.manual_seed(0)
    shape = (in_channels, hw, hw)
    model = build(arch, num_classes, in_channels, input_shape=shape).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def _first_conv_and_last_linear(model: nn.Module) -> tuple[nn.Conv2d, nn.Linear]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return convs[0], linears[-1]


@pytest.mark.parametrize("arch", HEAVY_ARCHS)
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_heavy_archs_build_with_right_io(arch, num_classes, in_channels):
    model = build(arch, num_classes, in_channels)
    conv, linear = _first_conv_and_last_linear(model)
    assert conv.in_channels == in_channels
    assert linear.out_features == num_classes


@pytest.mark.parametrize("arch", HEAVY_ARCHS)
def test_heavy_archs_single_forward(arch):
    torch.manual_seed(0)
    model = build(arch, 10, 3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_known_parameter_counts():
    # Published sizes: ResNet-32 ~0.46M, PreAct ResNet-18 ~11.2M, WRN-28-10 ~36.5M.
    assert count_parameters(build("resnet32", 10)) == pytest.approx(0.46e6, rel=0.02)
    assert count_parameters(build("preact_resnet18", 10)) == pytest.approx(11.17e6, rel=0.02)
    assert count_parameters(build("wrn28_10", 10)) == pytest.approx(36.48e6, rel=0.02)
    mlp = build("mlp", 3, 1, input_shape=(1, 1, 2))
    assert count_parameters(mlp) == (2 * 128 + 128) + (128 * 128 + 128) + (128 * 3 + 3)
    for p in mlp.net[1].parameters():
        p.requires_grad_(False)
    assert count_parameters(mlp, trainable_only=True) == (128 * 128 + 128) + (128 * 3 + 3)


@pytest.mark.parametrize("arch", CHEAP_ARCHS)
def test_normalisation_happens_inside_the_model(arch):
    torch.manual_seed(0)
    mean, std = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
    model = build(arch, 10, 3, input_shape=(3, 28, 28), mean=mean, std=std).eval()
    x = torch.rand(4, 3, 28, 28)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - m) / s), atol=1e-6)
        # And it is not the identity: raw pixels give a different answer.
        assert not torch.allclose(model(x), model.net(x), atol=1e-4)


def test_default_normalisation_is_half_half_and_broadcasts_one_value():
    model = build("small_cnn", 10, 3)
    assert model.spec["mean"] == [0.5, 0.5, 0.5] and model.spec["std"] == [0.5, 0.5, 0.5]
    x = torch.rand(2, 3, 28, 28)
    assert torch.allclose(model.normalize(x), 2 * x - 1)
    single = build("small_cnn", 10, 3, mean=[0.1], std=[0.2])
    assert single.spec["mean"] == [0.1] * 3 and single.spec["std"] == [0.2] * 3
    with pytest.raises(ValueError, match="model.mean"):
        build("small_cnn", 10, 3, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="model.std"):
        build("small_cnn", 10, 1, std=[0.0])


def test_spec_is_plain_types():
    model = build("mlp", 5, 1, input_shape=(1, 4, 4), mean=(0.1,), std=(0.3,))
    assert model.spec == {
        "arch": "mlp", "num_classes": 5, "in_channels": 1, "input_shape": [1, 4, 4],
        "mean": [0.1], "std": [0.3],
    }

    def plain(v):
        if isinstance(v, (list, dict)):
            vals = v.values() if isinstance(v, dict) else v
            return all(plain(u) for u in vals)
        return v is None or type(v) in (str, int, float)

    assert plain(model.spec)


@pytest.mark.parametrize("arch,shape", [("small_cnn", (1, 28, 28)), ("mlp", (1, 1, 2)),
                                        ("resnet32", (3, 32, 32))])
def test_checkpoint_round_trip(tmp_path, arch, shape):
    torch.manual_seed(0)
    model = build(arch, 7, shape[0], input_shape=shape, mean=[0.3] * shape[0],
                  std=[0.25] * shape[0])
    # Train-mode forwards move BatchNorm's running stats away from their defaults, so the
    # round trip checks buffers as well as parameters.
    model.train()
    with torch.no_grad():
        model(torch.rand(8, *shape))
    model.eval()
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, extra={"epoch": 3, "metrics": {"acc": 0.5}})
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert all(not m.training for m in loaded.modules())
    assert loaded.spec == model.spec
    x = torch.rand(5, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    payload = read_checkpoint(path)
    assert payload["epoch"] == 3 and payload["metrics"] == {"acc": 0.5}


def test_save_rejects_reserved_extra_keys_and_specless_models(tmp_path):
    model = build("linear", 3, 1, input_shape=(1, 1, 4))
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "a.pt", extra={"spec": {}})
    with pytest.raises(ValueError, match="spec"):
        save_checkpoint(nn.Linear(2, 2), tmp_path / "b.pt")


def test_non_checkpoint_files_give_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt: not a caat-sweeper checkpoint"):
        load_checkpoint(garbage)

    plain_tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), plain_tensor)
    with pytest.raises(ValueError, match="tensor.pt: not a caat-sweeper checkpoint"):
        load_checkpoint(plain_tensor)

    bare_state_dict = tmp_path / "state.pt"
    torch.save(nn.Linear(2, 2).state_dict(), bare_state_dict)
    with pytest.raises(ValueError, match="state.pt: not a caat-sweeper checkpoint"):
        load_checkpoint(bare_state_dict)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_with_unsafe_payload_is_refused(tmp_path):
    # A pickled arbitrary object must not be unpickled (weights_only loading).
    path = tmp_path / "unsafe.pt"
    model = build("linear", 3, 1, input_shape=(1, 1, 4))
    torch.save({"spec": model.spec, "state_dict": model.state_dict(), "obj": nn.Linear(1, 1)},
               path)
    with pytest.raises(ValueError, match="unsafe.pt: not a caat-sweeper checkpoint"):
        load_checkpoint(path)


def test_checkpoint_whose_weights_do_not_fit_the_spec(tmp_path):
    model = build("linear", 3, 1, input_shape=(1, 1, 4))
    path = tmp_path / "bad.pt"
    spec = dict(model.spec, num_classes=5)
    torch.save({"spec": spec, "state_dict": model.state_dict()}, path)
    with pytest.raises(ValueError, match="bad.pt: checkpoint does not rebuild"):
        load_checkpoint(path)
