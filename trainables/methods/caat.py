"""CAAT (Zhou, Yang and Wu, AAAI 2023): adversaries and anti-adversaries in one batch.

Per batch, a meta-net reads six features of each sample and, through a softmax at a low
temperature, gives it weights (w_adv, w_anti): nearly a hard choice between an adversarial
example (TRADES-KL, ascending) and an anti-adversarial one (CE, descending), each inside
the sample's own bound eps_i. The loss is

    sum(w_adv*c0[y]*CE)/sum(c0[y]) + beta*sum(w_adv*c1[y]*KL)/sum(c1[y]) + mean(w_anti*CE_anti)

with FRL class multipliers c0, c1 and bound scales s (eps_i = eps * s[y_i]) updated once
per epoch on the clean meta set. Every `meta_interval` batches the meta-net takes a meta
step: a virtual SGD step of the model on that loss, the same loss form on a clean meta
batch at the virtual weights, and an Adam step of the meta-net.

`directions: chosen` attacks each sample only in its chosen direction (one signed PGD per
batch, the cost of TRADES); `both` computes both examples for every sample, as the original
does. A batch that feeds a meta step always gets both: the meta gradient of a sample's
weights compares its two losses, and the unchosen one must be measured on its own example.
`bound_mode: sample` adds a third meta-net output that scales each sample's eps within
`bound_range` (the class remargin is then off: the meta-net owns the bounds).

Where the original's meta-net does not learn (README, "What CAAT's meta-net learns"): its
saturated T = 0.001 softmax leaves one or two samples a meta gradient (here it flows
straight-through a softmax at `meta_temperature`); its random init sends a batch to one side
by the seed's coin flip (`meta_init: adversarial` starts as TRADES with FRL multipliers); its
train-mode BatchNorm makes a choice depend on the batch (`meta_norm: running`);
`direction_policy: random | loss_rank` are ablations that keep everything else. Fixes of the
original code: BatchNorm modes restored after attacks; the class mean-loss feature updated
every epoch; the meta batch's own class weights; any number of classes; pixel-space bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from trainables.attacks import ce_per_sample, kl_per_sample, pgd
from trainables.knobs import (
    BoundStep,
    MarginLimit,
    MetaInterval,
    MetaKnobs,
    MetaLR,
    MetaWeightDecay,
    MultiplierKnobs,
    TradesKnobs,
)
from trainables.meta import AtParams, MetaStepStats, Params, call_with, model_params
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.caat_parts import (
    anti_preference,
    loss_rank_directions,
    random_directions,
    rescale_perturbation,
    sample_bound_scale,
)
from trainables.methods.metalearner import MetaLearner, meta_state_of
from trainables.methods.multipliers import (
    ClassMultipliers,
    MultiplierConfig,
    bound_step_size,
    measure_attacks,
)
from trainables.methods.trades_common import attack_target, weighted_trades_loss


class CAATKnobs(MetaKnobs, MultiplierKnobs, TradesKnobs):
    """CAAT's knobs: the attack and beta (TRADES), FRL's multipliers, the meta-learning,
    and the direction and bound choices. The original's values, where the defaults go
    beyond it: `meta_temperature: null`, `meta_init: random`, `meta_norm: batch`,
    `directions: both`, `meta_interval: 50`."""

    name: Literal["caat"] = "caat"
    # Adam 1e-4 with weight decay 5e-4 as CAAT.py (the lr chosen on validation among 1e-2,
    # 1e-3, 1e-4); a meta step every 20 batches, not 50: equal on validation at a quarter of
    # the cost (README); scales up to 2.5 and a fixed step at class bounds, as utils.py.
    meta_interval: MetaInterval = 20
    meta_lr: MetaLR = 1e-4
    meta_weight_decay: MetaWeightDecay = 5e-4
    margin_limit: MarginLimit = 2.5
    bound_step: BoundStep = "fixed"
    temperature: float = Field(default=0.001, gt=0.0, description=(
        "the training softmax of (w_adv, w_anti); 0.001: nearly a hard choice"))
    meta_temperature: float | None = Field(default=1.0, gt=0.0, description=(
        "the softmax the meta gradient flows through; null: the training one (original)"))
    meta_init: Literal["adversarial", "random"] = Field(default="adversarial", description=(
        "adversarial: every sample starts adversarial; random: PyTorch's init (original)"))
    meta_norm: Literal["running", "batch"] = Field(default="running", description=(
        "feature standardisation: running statistics, or train-mode BatchNorm (original)"))
    direction_policy: Literal["meta", "random", "loss_rank"] = Field(default="meta", description=(
        "who picks each sample's side: the meta-net, or an ablation (caat_parts.py)"))
    anti_fraction: float = Field(default=0.2, ge=0.0, le=1.0, description=(
        "anti-adversarial share of the random and loss_rank policies"))
    directions: Literal["chosen", "both"] = Field(default="chosen", description=(
        "chosen: attack each sample in its side only; both: both examples (original)"))
    bound_mode: Literal["class", "sample"] = Field(default="class", description=(
        "class: FRL's class bounds; sample: a meta-net output scales each sample's eps"))
    bound_range: tuple[float, float] = Field(default=(0.5, 1.5), description=(
        "[lo, hi] of the per-sample bound scale (bound_mode: sample)"))

    @model_validator(mode="after")
    def _range_ordered(self) -> CAATKnobs:
        lo, hi = self.bound_range
        if not 0 < lo <= hi:
            raise ValueError("bound_range must be [lo, hi] with 0 < lo <= hi")
        return self


# `meta_init: adversarial`: the adversarial logit starts this many meta temperatures above
# the anti one, for every sample: hard at the training temperature, while the
# straight-through softmax still passes a gradient (w_anti = sigmoid(-1) = 0.27 there).
# Without straight-through, the margin is this many output units (saturated at T = 0.001).
ADVERSARIAL_INIT_MARGIN = 1.0
# A weight counts as saturated (no meta gradient to speak of) outside this band.
ACTIVE_BAND = (0.01, 0.99)

NUM_CAAT_FEATURES = 6


def caat_features(logits: torch.Tensor, ce: torch.Tensor, y: torch.Tensor,
                  class_mean_loss: torch.Tensor, class_prior: torch.Tensor) -> torch.Tensor:
    """The six per-sample features CAAT's meta-net sees, shape (B, 6) (pure).

    CE; last epoch's mean CE of the sample's (observed) class; ||onehot(y) - p||;
    margin p_y - max_{k != y} p_k; sum_k p_k log p_k (negative entropy); class prior.
    """
    p = F.softmax(logits, dim=1)
    onehot = F.one_hot(y, logits.shape[1]).to(p.dtype)
    p_y = (p * onehot).sum(1)
    p_other = p.masked_fill(onehot.bool(), float("-inf")).max(1).values
    neg_entropy = (p * F.log_softmax(logits, dim=1)).sum(1)
    return torch.stack([ce, class_mean_loss[y], (onehot - p).norm(dim=1), p_y - p_other,
                        neg_entropy, class_prior[y].to(p.dtype)], dim=1)


def caat_loss(w_adv: torch.Tensor, w_anti: torch.Tensor, ce_clean: torch.Tensor,
              kl_adv: torch.Tensor, ce_anti: torch.Tensor, c0_y: torch.Tensor,
              c1_y: torch.Tensor, beta: float) -> torch.Tensor:
    """CAAT's combined loss from per-sample terms (pure)."""
    return (weighted_trades_loss(ce_clean, kl_adv, c0_y, c1_y, beta, w_adv)
            + (w_anti * ce_anti).mean())


def combination_weights(out: torch.Tensor, temperature: float,
                        meta_temperature: float | None = None) -> torch.Tensor:
    """(B, 2) weights (w_adv, w_anti) from the meta-net's first two outputs (pure).

    The values are the softmax at ``temperature``. With ``meta_temperature``, the gradient is
    that of the softmax at ``meta_temperature`` (straight-through): the hard choice made at a
    tiny temperature keeps a meta gradient for every sample, not only the one or two whose
    outputs sit within a few temperatures of each other.
    """
    w = F.softmax(out[:, :2] / temperature, dim=1)
    if meta_temperature is None:
        return w
    soft = F.softmax(out[:, :2] / meta_temperature, dim=1)
    return w.detach() + soft - soft.detach()


def anti_margin(out: torch.Tensor) -> torch.Tensor:
    """Each sample's anti-adversarial score: the pre-softmax margin, > 0 means anti (pure)."""
    return out[:, 1] - out[:, 0]


class _Perturbed:
    """The perturbed inputs of one batch: one signed example each, or both kinds."""

    def __init__(self, adv: torch.Tensor, anti: torch.Tensor) -> None:
        self.adv, self.anti = adv, anti

    @property
    def shared(self) -> bool:
        return self.adv is self.anti


@dataclass
class _Terms:
    x: torch.Tensor
    y: torch.Tensor
    feats: torch.Tensor
    out: torch.Tensor  # the meta-net's outputs the batch was decided with (no graph)
    w: torch.Tensor  # (B, 2) combination weights the batch trains with (constants)
    anti: torch.Tensor  # (B,) bool: the direction each sample was attacked in
    score: torch.Tensor  # (B,) anti score (meta-net margin, or the ablation's rank/draw)
    eps_i: torch.Tensor
    x_pert: _Perturbed
    logits: torch.Tensor  # clean, train mode, with graph
    ce: torch.Tensor  # per-sample terms, with graph
    kl: torch.Tensor
    ce_anti: torch.Tensor


class CAAT(Method):
    """CAAT with two components: FRL's class multipliers (``self.multipliers``) and the
    meta-learner of the directions and bounds (``self.meta``)."""

    name = "caat"
    knobs = CAATKnobs

    def __init__(self, model, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        m = cfg.method
        sample_bounds = m.bound_mode == "sample"
        # The virtual step is the model optimiser's next one (CAAT's `MetaSGD`, loaded
        # with the optimiser's state: momentum, Nesterov and weight decay).
        self.meta = MetaLearner(model, cfg, data, in_features=NUM_CAAT_FEATURES,
                                out_features=3 if sample_bounds else 2, norm=m.meta_norm,
                                virtual="optimizer")
        multiplier_cfg = MultiplierConfig.from_config(cfg)
        if sample_bounds:  # the meta-net owns the bounds: no class remargin
            multiplier_cfg = replace(multiplier_cfg, remargin=False)
        self.multipliers = ClassMultipliers(data.num_classes, multiplier_cfg, data.device)
        if m.meta_init == "adversarial":
            self._init_adversarial()
        c = data.num_classes
        # Before any epoch has been seen: the loss of a uniform guess.
        self.class_mean_loss = torch.full((c,), math.log(c), device=data.device)
        self._loss_sum = torch.zeros(c, device=data.device)
        self._count = torch.zeros(c, device=data.device)

    def _init_adversarial(self) -> None:
        """Every sample adversarial, whatever its features: a zero output layer and a bias
        that favours the adversarial logit (and a mid-range bound in `sample` mode). The
        hidden layer keeps its random init, so the output layer's meta gradient is not 0."""
        head = self.meta.net.head
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = ADVERSARIAL_INIT_MARGIN * (self.cfg.method.meta_temperature or 1.0)

    @property
    def _gradient_temperature(self) -> float:
        """The temperature of the softmax the meta gradient flows through."""
        m = self.cfg.method
        return m.meta_temperature if m.meta_temperature is not None else m.temperature

    @property
    def meta_learns(self) -> bool:
        """Whether the meta-net has anything to learn: the directions, or the bounds."""
        m = self.cfg.method
        return m.direction_policy == "meta" or m.bound_mode == "sample"

    # ---------------------------------------------------------------------- epoch hooks

    def epoch_start(self, epoch: int) -> None:
        self.multipliers.update(self.model, self.data.meta_x, self.data.meta_y,
                                **measure_attacks(self.cfg), epoch=epoch)
        self.meta.epoch_start()
        self._loss_sum.zero_()
        self._count.zero_()

    def epoch_end(self, epoch: int) -> dict[str, float]:
        seen = self._count > 0
        self.class_mean_loss = torch.where(seen, self._loss_sum / self._count.clamp_min(1),
                                           self.class_mean_loss)
        return {**self.multipliers.stats, **self.meta.epoch_stats()}

    # ------------------------------------------------------------------------ the step

    def bounds(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps_i per sample: class-scaled, or meta-learned within bound_range."""
        if self.cfg.method.bound_mode == "sample":
            lo, hi = self.cfg.method.bound_range
            return self.eps * sample_bound_scale(out, lo, hi)
        return self.eps * self.multipliers.scale[y]

    def directions(self, out: torch.Tensor, ce: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anti, score) per sample, from the meta-net's outputs or the ablation policy."""
        m = self.cfg.method
        if m.direction_policy == "random":
            return random_directions(len(y), m.anti_fraction, device=y.device)
        if m.direction_policy == "loss_rank":
            return loss_rank_directions(ce.detach(), y, m.anti_fraction, self.data.num_classes)
        score = anti_margin(out)
        return score > 0, score

    def perturb(self, x: torch.Tensor, y: torch.Tensor, anti: torch.Tensor,
                eps_i: torch.Tensor, both: bool, model: nn.Module | None = None) -> _Perturbed:
        """One signed PGD: each sample in its chosen direction, or (``both``) every sample
        in both directions, as one PGD over the batch stacked twice (samples do not
        interact in the attack's eval mode, and one big batch runs faster than two).
        ``model``: the network to attack, the trial's model by default."""
        model = self.model if model is None else model
        step = bound_step_size(self.step_size, self.eps, eps_i, self.cfg.method.bound_step)
        target = attack_target(model, x)
        # TRADES' tiny Gaussian start, one per sample, shared by both directions: `chosen`
        # and `both` start every sample from the same point, so they agree where the
        # choice is hard.
        start = 0.001 * torch.randn_like(x)
        if both:
            anti = torch.cat([torch.zeros_like(anti), torch.ones_like(anti)])
            x, y, target = torch.cat([x, x]), torch.cat([y, y]), torch.cat([target, target])
            eps_i, start = torch.cat([eps_i, eps_i]), torch.cat([start, start])
        x_pert = pgd(model, x,
                     lambda lg: torch.where(anti, ce_per_sample(lg, y), kl_per_sample(lg, target)),
                     eps=eps_i, step_size=step, steps=self.cfg.method.steps,
                     sign=torch.where(anti, -1.0, 1.0).to(x.dtype), init_delta=start)
        if both:
            x_adv, x_anti = x_pert.chunk(2)
            return _Perturbed(x_adv, x_anti)
        return _Perturbed(x_pert, x_pert)

    def perturbed_terms(self, forward, x_pert: _Perturbed, y: torch.Tensor,
                        logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL of the adversarial examples, CE of the anti-adversarial ones) per sample."""
        logits_adv = forward(x_pert.adv)
        logits_anti = logits_adv if x_pert.shared else forward(x_pert.anti)
        return (kl_per_sample(logits_adv, logits, detach_clean=False),
                ce_per_sample(logits_anti, y))

    def terms(self, batch: Batch, for_meta_step: bool = False) -> _Terms:
        """Everything the loss and the meta step need from one batch."""
        x, y, m = batch.x, batch.y, self.cfg.method
        logits = self.model(x)
        ce = ce_per_sample(logits, y)
        feats = caat_features(logits.detach(), ce.detach(), y, self.class_mean_loss,
                              self.data.class_prior)
        self.meta.net.observe(feats)
        with torch.no_grad():
            out = self.meta.net(feats)
        anti, score = self.directions(out, ce, y)
        if m.direction_policy == "meta":
            w = combination_weights(out, m.temperature)
        else:
            w = torch.stack([~anti, anti], dim=1).to(x.dtype)
        eps_i = self.bounds(y, out)
        both = m.directions == "both" or for_meta_step
        x_pert = self.perturb(x, y, anti, eps_i, both=both)
        if m.directions == "both":
            kl, ce_anti = self.perturbed_terms(self.model, x_pert, y, logits)
        else:
            # `chosen`: one forward of each sample's own example, as if only it were made.
            view = x_pert if x_pert.shared else _Perturbed(*(2 * [self._chosen(x_pert, anti)]))
            kl, ce_anti = self.perturbed_terms(self.model, view, y, logits)
        return _Terms(x=x, y=y, feats=feats, out=out, w=w, anti=anti, score=score, eps_i=eps_i,
                      x_pert=x_pert, logits=logits, ce=ce, kl=kl, ce_anti=ce_anti)

    @staticmethod
    def _chosen(x_pert: _Perturbed, anti: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_pert.adv.dim() - 1)
        return torch.where(anti.view(shape), x_pert.anti, x_pert.adv)

    def step(self, batch: Batch, lr: float) -> StepResult:
        meta_step = self.meta_learns and self.meta.due()
        t, m = self.terms(batch, for_meta_step=meta_step), self.multipliers
        loss = caat_loss(t.w[:, 0], t.w[:, 1], t.ce, t.kl, t.ce_anti, m.c0[t.y], m.c1[t.y],
                         self.cfg.method.beta)
        per_sample = {"anti": t.anti.to(t.x.dtype), "anti_score": t.score, "eps": t.eps_i}
        # The meta-net update takes effect from the next batch: this batch's examples were
        # made for the weights above, and its loss must use the same ones.
        if meta_step:
            stats = self.meta_step(t, lr)
            if stats.probe_grad is not None:
                per_sample["meta_pref"] = anti_preference(stats.probe_grad)
        self._loss_sum.index_add_(0, t.y, t.ce.detach())
        self._count += torch.bincount(t.y, minlength=len(self._count))
        sums = {"frac_anti": float(t.anti.sum())}
        if self.cfg.method.direction_policy == "meta":
            soft_anti = F.softmax(t.out[:, :2] / self._gradient_temperature, dim=1)[:, 1]
            lo, hi = ACTIVE_BAND
            sums["meta_active_frac"] = float(((soft_anti > lo) & (soft_anti < hi)).sum())
        return StepResult(loss, sums=sums, per_sample=per_sample)

    # ------------------------------------------------------------------- the meta step

    def meta_step(self, t: _Terms, lr: float) -> MetaStepStats:
        """Meta step on this batch (whose examples were made in both directions).

        When the meta-net chooses the directions, the stats carry the meta gradient of the
        (B, 2) combination weights (`anti_preference` reads it).
        """
        m, cm, y = self.multipliers, self.cfg.method, t.y
        out = self.meta.net(t.feats)
        if cm.direction_policy == "meta":
            w = combination_weights(out, cm.temperature, cm.meta_temperature)
        else:
            w = t.w
        kl, ce_anti = self.virtual_terms(t, out)
        virtual_loss = caat_loss(w[:, 0], w[:, 1], t.ce, kl, ce_anti, m.c0[y], m.c1[y],
                                 cm.beta)
        return self.meta.step(virtual_loss, self.meta_objective(), lr,
                              probe=w if w.requires_grad else None)

    def virtual_terms(self, t: _Terms, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL of the adversarial example, CE of the anti-adversarial one) of every sample,
        differentiable in the model's parameters (and in `sample` mode in the bounds).

        The clean terms are reused from the real forward (graph kept). The perturbed terms
        are too in `both` mode; in `chosen` mode both examples of every sample are forwarded
        again, at the real parameters with the real model's buffers spared. In `sample`
        bound mode the examples are re-stretched to the meta-net's differentiable bounds.
        """
        cm = self.cfg.method
        params = model_params(self.model)

        def fwd(v: torch.Tensor) -> torch.Tensor:
            return call_with(self.model, params, v)

        if cm.bound_mode == "sample":
            eps_g = self.bounds(t.y, out)
            stretched = _Perturbed(rescale_perturbation(t.x, t.x_pert.adv, t.eps_i, eps_g),
                                   rescale_perturbation(t.x, t.x_pert.anti, t.eps_i, eps_g))
            return self.perturbed_terms(fwd, stretched, t.y, t.logits)
        if cm.directions == "both":
            return t.kl, t.ce_anti
        return self.perturbed_terms(fwd, t.x_pert, t.y, t.logits)

    def meta_objective(self) -> Callable[[Params], torch.Tensor]:
        """The meta loss as a function of (virtual) parameters: CAAT's loss form with both
        terms for every sample of a random clean meta batch, whose examples are made at
        the virtual weights, as the original's `caat_adv(pseudo_model, meta_inputs, ...)`
        (constants for the meta gradient)."""
        m, cm = self.multipliers, self.cfg.method
        xm, ym = self.meta.batch()
        eps_m = self.eps * (m.scale[ym] if cm.bound_mode == "class"
                            else torch.ones_like(ym, dtype=xm.dtype))

        def meta_loss_at(params: Params) -> torch.Tensor:
            at_virtual = AtParams(self.model, {k: v.detach() for k, v in params.items()})
            meta_pert = self.perturb(xm, ym, torch.zeros_like(ym, dtype=torch.bool), eps_m,
                                     both=True, model=at_virtual)
            fwd = lambda v: call_with(self.model, params, v)  # noqa: E731
            lm = fwd(xm)
            kl_m, ce_anti_m = self.perturbed_terms(fwd, meta_pert, ym, lm)
            ones = torch.ones_like(ce_anti_m)
            return caat_loss(ones, ones, ce_per_sample(lm, ym), kl_m, ce_anti_m, m.c0[ym],
                             m.c1[ym], cm.beta)

        return meta_loss_at

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers.state_dict(), "meta": self.meta.state_dict(),
                "class_mean_loss": self.class_mean_loss.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers.load_state_dict(state["multipliers"])
        self.meta.load_state_dict(meta_state_of(state))
        self.class_mean_loss = state["class_mean_loss"].to(self.class_mean_loss.device)
