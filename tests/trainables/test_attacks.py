"""Signed L-inf PGD: bounds, directions, mixed signs, gradients and BatchNorm mode handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.attacks import (
    ce_per_sample,
    eval_mode,
    kl_per_sample,
    pgd,
    pgd_ce,
    pgd_trades,
)
from trainables.models import build

SHAPE = (1, 12, 12)
N = 32


def _cnn(num_classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build("small_cnn", num_classes, SHAPE[0], input_shape=SHAPE)


def _data(seed: int = 1, n: int = N, num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return x, y


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return ce_per_sample(model(x), y)


def test_ce_and_kl_per_sample_match_reference():
    torch.manual_seed(0)
    logits, other = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    ref_ce = -torch.log_softmax(logits, 1)[torch.arange(5), y]
    assert torch.allclose(ce_per_sample(logits, y), ref_ce, atol=1e-6)
    p, q = torch.softmax(other, 1), torch.softmax(logits, 1)
    ref_kl = (p * (p.log() - q.log())).sum(1)
    assert torch.allclose(kl_per_sample(logits, other), ref_kl, atol=1e-6)
    assert torch.allclose(kl_per_sample(other, other), torch.zeros(5), atol=1e-6)


def test_kl_treats_clean_as_constant_unless_asked():
    torch.manual_seed(0)
    adv, clean = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    kl_per_sample(adv, clean).sum().backward()
    assert clean.grad is None and adv.grad is not None
    kl_per_sample(adv, clean, detach_clean=False).sum().backward()
    assert clean.grad is not None and clean.grad.abs().sum() > 0


def test_per_sample_eps_bounds_and_pixel_range():
    model = _cnn()
    x, y = _data()
    eps = torch.linspace(0.0, 0.3, N)
    x_adv = pgd_ce(model, x, y, eps=eps, step_size=0.05, steps=7)
    dist = (x_adv - x).abs().flatten(1).amax(1)
    assert torch.all(dist <= eps + 1e-6)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # The large bounds are actually used (not a trivially small perturbation).
    assert torch.all(dist[eps > 0.1] > 0.5 * eps[eps > 0.1])
    assert not x_adv.requires_grad


@pytest.mark.parametrize("random_start", ["uniform", "normal", "none"])
def test_eps_zero_returns_x_exactly(random_start):
    model = _cnn()
    x, y = _data()
    eps = torch.full((N,), 0.1)
    eps[::3] = 0.0
    x_adv = pgd_ce(model, x, y, eps=eps, step_size=0.05, steps=3, random_start=random_start,
                   sign=torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0))
    assert torch.equal(x_adv[::3], x[::3])
    assert torch.equal(pgd_ce(model, x, y, eps=0.0, step_size=0.05, steps=3), x)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30) -> nn.Module:
    """A few full-batch Adam steps: confident-ish predictions, so attacks move CE clearly."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        ce_per_sample(model(x), y).mean().backward()
        opt.step()
    return model.eval()


def test_adversarial_raises_and_anti_adversarial_lowers_ce():
    x, y = _data()
    model = _fit(_cnn(), x, y)
    clean = _ce(model, x, y)
    kw = {"eps": 0.1, "step_size": 0.02, "steps": 10, "random_start": "none"}
    adv = _ce(model, pgd_ce(model, x, y, sign=1.0, **kw), y)
    anti = _ce(model, pgd_ce(model, x, y, sign=-1.0, **kw), y)
    assert adv.mean() > clean.mean() + 1.0
    assert anti.mean() < 0.5 * clean.mean()
    assert (adv > clean).float().mean() >= 0.9
    assert (anti < clean).float().mean() >= 0.9


def test_mixed_sign_matches_separate_runs():
    model = _cnn()
    x, y = _data()
    sign = torch.where(torch.rand(N, generator=torch.Generator().manual_seed(5)) < 0.5, 1.0, -1.0)
    eps = torch.linspace(0.02, 0.2, N)
    kw = {"eps": eps, "step_size": eps / 4, "steps": 5}
    mixed = pgd_ce(model, x, y, sign=sign, random_start="none", **kw)
    up = pgd_ce(model, x, y, sign=1.0, random_start="none", **kw)
    down = pgd_ce(model, x, y, sign=-1.0, random_start="none", **kw)
    expected = torch.where(sign.view(-1, 1, 1, 1) > 0, up, down)
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert 0 < (sign > 0).sum() < N

    # Same with a random start drawn from equally seeded generators.
    def run(s):
        g = torch.Generator().manual_seed(11)
        return pgd_ce(model, x, y, sign=s, random_start="uniform", generator=g, **kw)

    expected = torch.where(sign.view(-1, 1, 1, 1) > 0, run(1.0), run(-1.0))
    assert torch.allclose(run(sign), expected, atol=1e-6)


def test_per_sample_step_size_zero_keeps_sample_fixed():
    model = _cnn()
    x, y = _data()
    step = torch.full((N,), 0.02)
    step[:4] = 0.0
    x_adv = pgd_ce(model, x, y, eps=0.1, step_size=step, steps=4, random_start="none")
    assert torch.equal(x_adv[:4], x[:4])
    assert not torch.equal(x_adv[4:], x[4:])


def test_random_start_is_reproducible_with_a_generator():
    model = _cnn()
    x, y = _data()

    def run(seed, start):
        return pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=0, random_start=start,
                      generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3, "uniform"), run(3, "uniform"))
    assert not torch.equal(run(3, "uniform"), run(4, "uniform"))
    normal = run(3, "normal")
    # 0.001 * N(0, 1) (then clipped to [0, 1]): tiny, far inside the eps ball.
    assert 0 < (normal - x).abs().max() < 0.01
    uniform = run(3, "uniform")
    assert (uniform - x).abs().max() > 0.05


def test_parameter_grads_untouched():
    model = _cnn()
    x, y = _data()
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=3)
    pgd_trades(model, x, torch.randn(N, 4), eps=0.1, step_size=0.02, steps=3)
    for p, g in zip(params, before, strict=True):
        if g is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, g)


def test_batchnorm_train_mode_restored_and_running_stats_untouched():
    model = _cnn().train()
    x, y = _data()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x_adv = pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=3)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # The attack used running statistics: per-sample results do not depend on the batch.
    half = pgd_ce(model, x[:5], y[:5], eps=0.1, step_size=0.02, steps=3, random_start="none")
    full = pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=3, random_start="none")
    assert torch.allclose(half, full[:5], atol=1e-6)
    assert x_adv.shape == x.shape


def test_eval_mode_model_stays_eval_and_mixed_modes_are_kept():
    model = _cnn().eval()
    x, y = _data()
    pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=2)
    assert not any(m.training for m in model.modules())

    model.train()
    frozen_bn = model.net[1]
    frozen_bn.eval()  # a deliberately frozen BatchNorm inside a training model
    pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=2)
    assert model.training and not frozen_bn.training
    assert model.net[5].training


def test_mode_restored_when_objective_raises():
    model = _cnn().train()
    x, _ = _data()

    def boom(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, x, boom, eps=0.1, step_size=0.02, steps=2)
    assert all(m.training for m in model.modules())


def test_trades_attack_increases_kl_from_zero():
    model = _cnn().eval()
    x, _ = _data()
    with torch.no_grad():
        logits_clean = model(x)
    assert torch.allclose(kl_per_sample(logits_clean, logits_clean), torch.zeros(N), atol=1e-6)
    x_adv = pgd_trades(model, x, logits_clean, eps=0.1, step_size=0.02, steps=5,
                       generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kl = kl_per_sample(model(x_adv), logits_clean)
    assert torch.all(kl > 1e-4)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6


def test_works_under_no_grad_and_on_a_linear_model():
    torch.manual_seed(0)
    model = build("linear", 3, 1, input_shape=(1, 1, 2))
    x = torch.rand(6, 1, 1, 2)
    y = torch.randint(0, 3, (6,))
    with torch.no_grad():
        x_adv = pgd_ce(model, x, y, eps=0.05, step_size=0.01, steps=10, random_start="none")
    assert (x_adv - x).abs().max() > 0
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6


def test_bad_arguments_are_rejected():
    model = _cnn()
    x, y = _data()
    with pytest.raises(ValueError, match="random_start"):
        pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=1, random_start="gauss")
    with pytest.raises(ValueError, match=r"eps: expected a float or a tensor of shape \(32,\)"):
        pgd_ce(model, x, y, eps=torch.ones(3), step_size=0.02, steps=1)
    with pytest.raises(ValueError, match="eps: must be >= 0"):
        pgd_ce(model, x, y, eps=-0.1, step_size=0.02, steps=1)
    with pytest.raises(ValueError, match="steps"):
        pgd_ce(model, x, y, eps=0.1, step_size=0.02, steps=-1)
    with pytest.raises(ValueError, match="per-sample loss"):
        pgd(model, x, lambda logits: ce_per_sample(logits, y).mean(), eps=0.1,
            step_size=0.02, steps=1)
