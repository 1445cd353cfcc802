import pytest
import torch

from trainables import methods, models
from trainables.config import load_config
from trainables.methods import Batch, MethodData

BASELINES = ["erm", "pgd_at", "trades"]


def make(name: str, num_classes: int = 10, **method):
    torch.manual_seed(0)
    cfg = load_config({"dataset": {"name": "synthetic"},
                       "method": {"name": name, "steps": 3, "eps": 0.05, **method}})
    model = models.build("small_cnn", num_classes, 1, input_shape=(1, 16, 16))
    x = torch.rand(32, 1, 16, 16)
    y = torch.arange(32) % num_classes
    data = MethodData(num_classes=num_classes, train_labels=y,
                      class_counts=torch.bincount(y, minlength=num_classes),
                      meta_x=x[:num_classes], meta_y=y[:num_classes], device=x.device)
    return model, methods.build(name, model, cfg, data), Batch(x=x, y=y, idx=torch.arange(32))


@pytest.mark.parametrize("name", BASELINES)
def test_loss_decreases_on_a_small_batch(name):
    model, method, batch = make(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    losses = []
    for _ in range(20):
        model.train()
        loss = method.step(batch, lr=0.02).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", BASELINES)
def test_runs_on_100_classes(name):
    model, method, batch = make(name, num_classes=100)
    out = method.step(batch, lr=0.1)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_with_beta_zero_is_clean_cross_entropy():
    model, method, batch = make("trades", beta=0.0)
    model.train()
    loss = method.step(batch, lr=0.1).loss
    expected = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_unknown_method_lists_valid_names():
    model, _, _ = make("erm")
    with pytest.raises(ValueError, match="allowed: .*erm.*pgd_at.*trades"):
        methods.build("nope", model, load_config(), None)
