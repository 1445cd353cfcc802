"""CAAT's pieces: the meta step, chosen vs both directions, multipliers, sample bounds."""

import pytest
import torch
from method_support import build_method
from torch import nn

from trainables import methods
from trainables.methods.caat import (
    caat_features,
    caat_loss,
    combination_weights,
)
from trainables.methods.caat_parts import (
    loss_rank_directions,
    random_directions,
    rescale_perturbation,
)
from trainables.methods.multipliers import (
    ClassMultipliers,
    MultiplierConfig,
    class_error_gaps,
    class_weights,
    project_multipliers,
)


def setup(arch="small_cnn", num_classes=4, seed=0, **method):
    knobs = {"steps": 3, "eps": 0.1, "meta_interval": 10_000, **method}
    model, caat, batch = build_method("caat", num_classes=num_classes, n=24, side=8,
                                      meta_per_class=8, arch=arch, seed=seed, **knobs)
    model.train()
    return model, caat, batch


def snapshot(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("knobs", [{}, {"directions": "both"}, {"bound_mode": "sample"}])
def test_meta_step_lowers_its_meta_loss_and_changes_only_the_meta_net(knobs):
    # A soft temperature so the weights have gradients; a meta lr large enough to see.
    model, method, batch = setup(temperature=1.0, meta_lr=0.05, **knobs)
    terms = method.terms(batch, for_meta_step=True)
    model_before, meta_before = snapshot(model), snapshot(method.meta.net)
    losses = []
    for _ in range(4):
        torch.manual_seed(7)  # the same meta batch and attack starts every time
        losses.append(method.meta_step(terms, lr=0.5).loss)
    assert losses[-1] < losses[0], losses
    for k, v in snapshot(model).items():
        assert torch.equal(v, model_before[k]), f"model {k} changed"
    assert all(p.grad is None for p in model.parameters())
    changed = [k for k, v in snapshot(method.meta.net).items()
               if not torch.equal(v, meta_before[k])]
    assert any(k.endswith("weight") for k in changed)


class FixedChoice(nn.Module):
    """A stand-in meta-net: even positions adversarial, odd ones anti-adversarial."""

    def observe(self, feats):
        pass

    def forward(self, feats):
        out = torch.zeros(len(feats), 2)
        out[0::2, 0] = 1.0
        out[1::2, 1] = 1.0
        return out


def test_chosen_and_both_give_the_same_loss_where_the_choice_is_hard():
    # A BatchNorm-free model: with train-mode BatchNorm the two modes also differ through
    # the batch statistics of the perturbed forward, which is not what is tested here.
    losses, fracs = {}, {}
    for directions in ("chosen", "both"):
        model, method, batch = setup(arch="mlp", directions=directions, temperature=1e-3)
        method.meta.net = FixedChoice()
        torch.manual_seed(3)
        out = method.step(batch, lr=0.1)
        losses[directions], fracs[directions] = out.loss.item(), out.sums["frac_anti"]
    assert fracs["chosen"] == fracs["both"] == 12
    assert losses["chosen"] == pytest.approx(losses["both"], rel=1e-6, abs=1e-7)


def test_soft_choices_make_the_modes_differ():
    # The same check with a soft temperature: `chosen` is an approximation only there.
    losses = {}
    for directions in ("chosen", "both"):
        model, method, batch = setup(arch="mlp", directions=directions, temperature=3.0)
        method.meta.net = FixedChoice()
        torch.manual_seed(3)
        losses[directions] = method.step(batch, lr=0.1).loss.item()
    assert losses["chosen"] != pytest.approx(losses["both"], rel=1e-4)


def test_multipliers_move_weight_and_bound_to_the_classes_with_larger_gaps():
    y = torch.arange(400) % 4
    nat = torch.ones(400, dtype=torch.bool)
    nat[(y == 2) & (torch.arange(400) % 3 == 0)] = False  # class 2: 1/3 natural error
    rob = nat.clone()
    rob[torch.arange(400) % 8 == 1] = False  # half of class 1: 1/2 boundary error
    gap0, gap1 = class_error_gaps(nat, rob, y, 4, tolerance=0.01)
    assert gap0.argmax() == 2 and gap1.argmax() == 1
    mult = ClassMultipliers(4, MultiplierConfig(0.01, 0.5, 0.5, 0.5, 2.5, True, True),
                            torch.device("cpu"))
    mult.step(gap0, gap1)
    assert mult.c0.argmax() == 2 and mult.c0[2] > 0.25
    assert mult.c1.argmax() == 1 and mult.c1[1] > 0.25
    # FRL's rule: a class whose boundary error is below the average shrinks to the floor.
    assert mult.scale.argmax() == 1 and mult.scale[1] > 1
    assert mult.scale[0].item() == pytest.approx(0.98) and mult.lam[2, 0] < 0
    assert mult.c0.sum().item() == pytest.approx(1.0)
    # Classes below the average get no push; repeated pushes stay within the limits.
    for _ in range(50):
        mult.step(gap0, gap1)
    assert mult.lam[0].sum() <= 0.5 + 1e-6 and (mult.c0 >= 0).all()
    assert mult.scale.max() <= 2.5


def test_project_multipliers_and_class_weights():
    lam = project_multipliers(torch.tensor([-1.0, 0.6, 0.6]), 0.6)
    assert torch.allclose(lam, torch.tensor([0.0, 0.3, 0.3]))
    w = class_weights(torch.tensor([0.0, 0.3, 0.3]))
    assert torch.allclose(w, torch.tensor([1 / 3 - 0.2, 1 / 3 + 0.1, 1 / 3 + 0.1]))


def test_frl_multipliers_update_on_the_meta_set_each_epoch():
    torch.manual_seed(0)
    _, method, batch = setup()
    frl = methods.build("frl", method.model, method.cfg.model_copy(update={
        "method": method.cfg.method.model_copy(update={"name": "frl", "tolerance": 0.0})}),
        method.data)
    frl.epoch_start(0)
    stats = frl.epoch_end(0)
    assert set(stats) == {"class_weight_max", "bound_scale_max", "bound_scale_min"}
    assert not torch.equal(frl.multipliers.lam, torch.zeros_like(frl.multipliers.lam))


def test_sample_bound_mode_keeps_every_eps_in_its_range():
    model, method, batch = setup(bound_mode="sample", bound_range=[0.5, 1.5])
    out = torch.tensor([[0.0, 0.0, -1e4], [0.0, 0.0, 1e4], [0.0, 0.0, 0.0]])
    eps = method.bounds(batch.y[:3], out)
    assert torch.allclose(eps, torch.tensor([0.05, 0.15, 0.1]))
    terms = method.terms(batch, for_meta_step=True)
    assert ((terms.eps_i >= 0.05 - 1e-7) & (terms.eps_i <= 0.15 + 1e-7)).all()
    dist = (terms.x_pert.adv - batch.x).abs().flatten(1).max(1).values
    assert (dist <= terms.eps_i + 1e-6).all()
    # The meta step reaches the bound output: its row of the last layer moves.
    method.cfg.method.temperature = 1.0
    last = method.meta.net.net[-1].weight
    before = last[2].clone()
    torch.manual_seed(1)
    method.meta_step(terms, lr=0.5)
    assert not torch.equal(last[2], before)


def test_rescale_perturbation_is_differentiable_in_the_bound():
    x = torch.full((2, 1, 2, 2), 0.5)
    x_pert = x + torch.tensor([0.1, -0.05]).view(2, 1, 1, 1)
    eps_new = torch.tensor([0.2, 0.1], requires_grad=True)
    out = rescale_perturbation(x, x_pert, torch.tensor([0.1, 0.1]), eps_new)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0.7, 0.45]))
    out.sum().backward()
    assert torch.allclose(eps_new.grad, torch.tensor([4.0, -2.0]))


def test_caat_loss_and_features_by_hand():
    ce, kl, ce_anti = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.4])
    w_adv, w_anti = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    c0, c1 = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    expected = (0.75 * 1.0) / 1.0 + 6 * (0.5 * 0.5) / 1.0 + (0.4) / 2
    assert caat_loss(w_adv, w_anti, ce, kl, ce_anti, c0, c1, 6.0).item() == pytest.approx(expected)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    f = caat_features(logits, torch.tensor([0.3567]), torch.tensor([0]),
                      torch.tensor([1.5, 0.0, 0.0]), torch.tensor([0.2, 0.3, 0.5]))
    norm = ((0.3 ** 2) + 0.2 ** 2 + 0.1 ** 2) ** 0.5
    neg_entropy = 0.7 * torch.log(torch.tensor(0.7)) + 0.2 * torch.log(torch.tensor(0.2)) \
        + 0.1 * torch.log(torch.tensor(0.1))
    assert torch.allclose(f, torch.tensor([[0.3567, 1.5, norm, 0.5, neg_entropy.item(), 0.2]]),
                          atol=1e-4)


def test_class_mean_loss_feature_is_updated_every_epoch():
    model, method, batch = setup()
    method.epoch_start(0)
    before = method.class_mean_loss.clone()
    terms_ce = method.terms(batch).ce.detach()
    method.epoch_start(0)  # reset the running sums; step() accumulates them
    method.step(batch, lr=0.0)
    method.epoch_end(0)
    assert not torch.equal(method.class_mean_loss, before)
    for c in range(4):
        assert method.class_mean_loss[c] == pytest.approx(terms_ce[batch.y == c].mean().item(),
                                                          rel=0.2)


# ------------------------------------------------------------- a split that is learned


@pytest.mark.parametrize("scale", [1.0, 1e3, -1e6])
def test_adversarial_init_sends_no_sample_anti_whatever_the_features(scale):
    _, method, batch = setup(meta_init="adversarial")
    torch.manual_seed(5)
    feats = scale * torch.randn(500, 6) + torch.linspace(-3, 3, 500).unsqueeze(1)
    method.meta.net.observe(feats)
    out = method.meta.net(feats)
    anti, _ = method.directions(out, feats[:, 0], torch.arange(500) % 4)
    assert not anti.any()
    # And a real first training batch trains every sample adversarially.
    assert method.step(batch, lr=0.1).sums["frac_anti"] == 0


def test_random_init_is_a_coin_flip_that_puts_a_batch_on_one_side():
    # The failure `meta_init: adversarial` fixes: at PyTorch's default init, nearly every
    # sample lands on the same side, and which side depends on the seed.
    sides = []
    for seed in range(8):
        _, method, batch = setup(meta_init="random", seed=seed)
        sides.append(method.step(batch, lr=0.1).sums["frac_anti"] / len(batch.y))
    assert min(sides) < 0.2 and max(sides) > 0.8, sides


def test_straight_through_keeps_a_meta_gradient_for_saturated_samples():
    out = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 0.9]], requires_grad=True)
    hard = combination_weights(out, temperature=1e-3)
    # Forward: the hard choice at the training temperature, with or without straight-through.
    st = combination_weights(out, temperature=1e-3, meta_temperature=1.0)
    assert torch.allclose(st, hard) and torch.allclose(hard[:2], torch.tensor([[1.0, 0], [0, 1]]))
    (g_hard,) = torch.autograd.grad(hard[:, 1].sum(), out)
    (g_st,) = torch.autograd.grad(st[:, 1].sum(), out)
    assert g_hard[:2].abs().max() < 1e-30  # saturated: no gradient at all without it
    soft = torch.softmax(out.detach(), dim=1)[:, 1]
    assert torch.allclose(g_st[:, 1], soft * (1 - soft))  # the softmax at T = 1
    assert (g_st[:2].abs() > 0.04).all()


def test_meta_step_moves_an_adversarially_initialised_net_only_with_straight_through():
    grads = {}
    for meta_temperature in (None, 1.0):
        _, method, batch = setup(meta_init="adversarial", meta_temperature=meta_temperature)
        terms = method.terms(batch, for_meta_step=True)
        head = method.meta.net.head.weight.clone()
        torch.manual_seed(1)
        stats = method.meta_step(terms, lr=0.5)
        grads[meta_temperature] = stats.grad_norm
        moved = not torch.equal(method.meta.net.head.weight, head)
        assert moved == (meta_temperature is not None)
        # The per-sample preference is read off the same backward pass.
        assert stats.probe_grad is not None and stats.probe_grad.shape == (len(batch.y), 2)
    assert grads[None] == 0.0 and grads[1.0] > 0


def test_running_norm_makes_a_choice_independent_of_the_rest_of_the_batch():
    outs = {}
    for norm in ("running", "batch"):
        _, method, _ = setup(meta_init="random", meta_norm=norm)
        torch.manual_seed(0)
        feats = torch.randn(64, 6)
        method.meta.net.observe(feats)
        with torch.no_grad():
            whole = method.meta.net(feats)[:8]
            part = method.meta.net(torch.cat([feats[:8], 5 + feats[8:16]]))[:8]
        outs[norm] = torch.allclose(whole, part)
    assert outs == {"running": True, "batch": False}


def test_a_meta_step_batch_gets_both_directions_and_trains_on_the_chosen_ones():
    _, method, batch = setup(arch="mlp", meta_interval=1)
    method.meta.net = FixedChoice()
    torch.manual_seed(3)
    plain = method.terms(batch)
    torch.manual_seed(3)
    full = method.terms(batch, for_meta_step=True)
    assert plain.x_pert.shared and not full.x_pert.shared
    # Where the choice is hard, training sees the same examples either way.
    assert torch.allclose(plain.kl, full.kl, atol=1e-6)
    assert torch.allclose(plain.ce_anti, full.ce_anti, atol=1e-6)
    # The anti examples lower the loss, the adversarial ones raise the KL.
    ce_adv_side = torch.nn.functional.cross_entropy(method.model(full.x_pert.adv), batch.y)
    ce_anti_side = torch.nn.functional.cross_entropy(method.model(full.x_pert.anti), batch.y)
    assert ce_anti_side < ce_adv_side


# --------------------------------------------------------------------------- ablations


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6, 1.0])
def test_random_policy_hits_its_anti_fraction(fraction):
    g = torch.Generator().manual_seed(0)
    anti, score = random_directions(20_000, fraction, generator=g)
    assert anti.float().mean().item() == pytest.approx(fraction, abs=0.015)
    assert torch.equal(anti, score > -fraction)  # higher score: anti
    # Drawn afresh every batch: two draws differ.
    again, _ = random_directions(20_000, fraction, generator=g)
    assert 0 < fraction < 1 and not torch.equal(anti, again) or fraction in (0.0, 1.0)


def test_loss_rank_picks_the_highest_losses_within_each_class():
    # Class 1's losses are all higher than class 0's: a global ranking would pick only
    # class 1, ranking within classes picks the top quarter of each.
    y = torch.tensor([0] * 8 + [1] * 8 + [2] * 4)
    ce = torch.cat([torch.arange(8.0), 100 + torch.arange(8.0), torch.tensor([5.0, 1, 3, 2])])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    anti, score = loss_rank_directions(ce[perm], y[perm], 0.25, num_classes=3)
    anti, score = anti[perm.argsort()], score[perm.argsort()]
    assert anti.nonzero().squeeze(1).tolist() == [6, 7, 14, 15, 16]
    assert anti.float().mean().item() == pytest.approx(0.25)
    assert torch.allclose(score[:8], (torch.arange(8.0) + 0.5) / 8)


@pytest.mark.parametrize("policy", ["random", "loss_rank"])
def test_ablation_policies_train_at_their_fraction_without_meta_steps(policy):
    _, method, batch = setup(direction_policy=policy, anti_fraction=0.5, meta_interval=1,
                             num_classes=4)
    meta_before = snapshot(method.meta.net)
    fracs = [method.step(batch, lr=0.1).sums["frac_anti"] / len(batch.y) for _ in range(4)]
    assert all(f == pytest.approx(0.5, abs=0.3) for f in fracs)
    if policy == "loss_rank":
        assert fracs == [0.5] * 4  # exactly half of each class's 6 samples
    # Nothing for the meta-net to learn: it never steps.
    assert all(torch.equal(v, meta_before[k]) for k, v in snapshot(method.meta.net).items()
               if not k.endswith(("mean", "var", "seen")))


# ------------------------------------------------------------------------------ state


def test_state_is_namespaced_by_component_and_old_flat_checkpoints_still_load():
    _, method, batch = setup(meta_interval=1)
    method.epoch_start(0)
    method.step(batch, lr=0.1)
    method.epoch_end(0)
    state = method.state_dict()
    assert set(state) == {"multipliers", "meta", "class_mean_loss"}
    assert set(state["meta"]) == {"net", "optimizer", "batches"}
    # The layout checkpoints had before the components: the meta-learner's state flat.
    flat = {"multipliers": state["multipliers"], "meta_net": state["meta"]["net"],
            "meta_optimizer": state["meta"]["optimizer"], "batches": state["meta"]["batches"],
            "class_mean_loss": state["class_mean_loss"]}
    _, fresh, _ = setup(meta_interval=1, seed=1)
    fresh.load_state_dict(flat)
    assert fresh.meta.batches == method.meta.batches == 1
    for k, v in method.meta.net.state_dict().items():
        assert torch.equal(fresh.meta.net.state_dict()[k], v), k
    assert torch.equal(fresh.multipliers.lam, method.multipliers.lam)
    assert fresh.meta.optimizer.state_dict()["state"].keys() == state["meta"]["optimizer"][
        "state"].keys()
