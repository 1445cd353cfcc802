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
does. `bound_mode: sample` adds a third meta-net output that scales each sample's eps
within `bound_range` (the class remargin is then off: the meta-net owns the bounds).

Departures from the original code, each a fix: BatchNorm modes are restored after attacks;
the class mean-loss feature is updated every epoch; the meta loss uses the meta batch's own
class weights; any number of classes; pixel-space bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainables.attacks import ce_per_sample, kl_per_sample, pgd
from trainables.meta import NUM_CAAT_FEATURES, caat_features, call_with, model_params
from trainables.methods import register
from trainables.methods.base import Batch, MethodData, StepResult
from trainables.methods.frl import MultiplierMethod, weighted_trades_loss
from trainables.methods.metalearner import MetaLearner
from trainables.methods.trades import attack_target


def caat_loss(w_adv: torch.Tensor, w_anti: torch.Tensor, ce_clean: torch.Tensor,
              kl_adv: torch.Tensor, ce_anti: torch.Tensor, c0_y: torch.Tensor,
              c1_y: torch.Tensor, beta: float) -> torch.Tensor:
    """CAAT's combined loss from per-sample terms (pure)."""
    return (weighted_trades_loss(ce_clean, kl_adv, c0_y, c1_y, beta, w_adv)
            + (w_anti * ce_anti).mean())


def combination_weights(out: torch.Tensor,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_adv, w_anti) from the meta-net's first two outputs: softmax at temperature T."""
    w = F.softmax(out[:, :2] / temperature, dim=1)
    return w[:, 0], w[:, 1]


def sample_bound_scale(out: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-sample bound scale in [lo, hi] from the meta-net's third output (pure)."""
    return lo + (hi - lo) * torch.sigmoid(out[:, 2])


def rescale_perturbation(x: torch.Tensor, x_pert: torch.Tensor, eps_used: torch.Tensor,
                         eps_new: torch.Tensor) -> torch.Tensor:
    """x + (x_pert - x) * eps_new / eps_used, clipped to [0, 1]: the same perturbation
    stretched to another bound, differentiable in eps_new (how the meta-net learns bounds)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    unit = (x_pert - x) / eps_used.clamp_min(1e-12).view(shape)
    return (x + unit * eps_new.view(shape)).clamp(0.0, 1.0)


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
    w_adv: torch.Tensor
    w_anti: torch.Tensor
    eps_i: torch.Tensor
    x_pert: _Perturbed
    logits: torch.Tensor  # clean, train mode, with graph
    ce: torch.Tensor  # per-sample terms, with graph
    kl: torch.Tensor
    ce_anti: torch.Tensor


@register
class CAAT(MultiplierMethod, MetaLearner):
    name = "caat"
    meta_in = NUM_CAAT_FEATURES

    def __init__(self, model, cfg, data: MethodData) -> None:
        self.meta_out = 3 if cfg.method.bound_mode == "sample" else 2
        super().__init__(model, cfg, data)
        if cfg.method.bound_mode == "sample":
            self.multipliers.cfg.remargin = False
        c = data.num_classes
        # Before any epoch has been seen: the loss of a uniform guess.
        self.class_mean_loss = torch.full((c,), math.log(c), device=data.device)
        self._loss_sum = torch.zeros(c, device=data.device)
        self._count = torch.zeros(c, device=data.device)

    # ---------------------------------------------------------------------- epoch hooks

    def epoch_start(self, epoch: int) -> None:
        super().epoch_start(epoch)
        self._loss_sum.zero_()
        self._count.zero_()

    def epoch_end(self, epoch: int) -> dict[str, float]:
        seen = self._count > 0
        self.class_mean_loss = torch.where(seen, self._loss_sum / self._count.clamp_min(1),
                                           self.class_mean_loss)
        return super().epoch_end(epoch)

    # ------------------------------------------------------------------------ the step

    def bounds(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps_i per sample: class-scaled, or meta-learned within bound_range."""
        if self.cfg.method.bound_mode == "sample":
            lo, hi = self.cfg.method.bound_range
            return self.eps * sample_bound_scale(out, lo, hi)
        return self.eps * self.multipliers.scale[y]

    def perturb(self, x: torch.Tensor, y: torch.Tensor, anti: torch.Tensor,
                eps_i: torch.Tensor, both: bool) -> _Perturbed:
        """One signed PGD: each sample in its chosen direction, or (``both``) every sample
        in both directions, as one PGD over the batch stacked twice (samples do not
        interact in the attack's eval mode, and one big batch runs faster than two)."""
        target = attack_target(self.model, x)
        # TRADES' tiny Gaussian start, one per sample, shared by both directions: `chosen`
        # and `both` start every sample from the same point, so they agree where the
        # choice is hard.
        start = 0.001 * torch.randn_like(x)
        if both:
            anti = torch.cat([torch.zeros_like(anti), torch.ones_like(anti)])
            x, y, target = torch.cat([x, x]), torch.cat([y, y]), torch.cat([target, target])
            eps_i, start = torch.cat([eps_i, eps_i]), torch.cat([start, start])
        x_pert = pgd(self.model, x,
                     lambda lg: torch.where(anti, ce_per_sample(lg, y), kl_per_sample(lg, target)),
                     eps=eps_i, step_size=self.step_size, steps=self.cfg.method.steps,
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

    def terms(self, batch: Batch) -> _Terms:
        """Everything the loss and the meta step need from one batch (one attack)."""
        x, y = batch.x, batch.y
        logits = self.model(x)
        ce = ce_per_sample(logits, y)
        feats = caat_features(logits.detach(), ce.detach(), y, self.class_mean_loss,
                              self.data.class_prior)
        with torch.no_grad():
            out = self.meta_net(feats)
        w_adv, w_anti = combination_weights(out, self.cfg.method.temperature)
        eps_i = self.bounds(y, out)
        x_pert = self.perturb(x, y, w_anti > w_adv, eps_i,
                              both=self.cfg.method.directions == "both")
        kl, ce_anti = self.perturbed_terms(self.model, x_pert, y, logits)
        return _Terms(x=x, y=y, feats=feats, w_adv=w_adv, w_anti=w_anti, eps_i=eps_i,
                      x_pert=x_pert, logits=logits, ce=ce, kl=kl, ce_anti=ce_anti)

    def step(self, batch: Batch, lr: float) -> StepResult:
        t, m = self.terms(batch), self.multipliers
        loss = caat_loss(t.w_adv, t.w_anti, t.ce, t.kl, t.ce_anti, m.c0[t.y], m.c1[t.y],
                         self.cfg.method.beta)
        # The meta-net update takes effect from the next batch: this batch's examples were
        # made for the weights above, and its loss must use the same ones.
        if self.meta_due():
            self.caat_meta_step(t, lr)
        self._loss_sum.index_add_(0, t.y, t.ce.detach())
        self._count += torch.bincount(t.y, minlength=len(self._count))
        return StepResult(loss, sums={"frac_anti": float((t.w_anti > t.w_adv).sum())})

    # ------------------------------------------------------------------- the meta step

    def caat_meta_step(self, t: _Terms, lr: float) -> float:
        """Meta step on this batch. The training-loss terms (ce, kl, ce_anti) are reused
        from the real forward (their graph is kept), so the virtual step costs no forward,
        except in `sample` bound mode, where the examples are re-stretched to the meta-net's
        differentiable bounds and forwarded again (with the real model's buffers spared)."""
        m, beta, temperature = self.multipliers, self.cfg.method.beta, self.cfg.method.temperature
        y = t.y
        out = self.meta_net(t.feats)
        w_adv, w_anti = combination_weights(out, temperature)
        kl, ce_anti = t.kl, t.ce_anti
        if self.cfg.method.bound_mode == "sample":
            eps_g = self.bounds(y, out)
            params = model_params(self.model)

            def stretch(v: torch.Tensor) -> torch.Tensor:
                return rescale_perturbation(t.x, v, t.eps_i, eps_g)

            adv = stretch(t.x_pert.adv)
            stretched = _Perturbed(adv, adv if t.x_pert.shared else stretch(t.x_pert.anti))
            kl, ce_anti = self.perturbed_terms(lambda v: call_with(self.model, params, v),
                                               stretched, y, t.logits)
        virtual_loss = caat_loss(w_adv, w_anti, t.ce, kl, ce_anti, m.c0[y], m.c1[y], beta)

        xm, ym = self.meta_batch()
        eps_m = self.eps * (m.scale[ym] if self.cfg.method.bound_mode == "class"
                            else torch.ones_like(ym, dtype=t.x.dtype))
        # The meta batch's examples are made at the current weights (constants for the
        # meta gradient); both kinds for every meta sample: the meta loss is the full form.
        meta_pert = self.perturb(xm, ym, torch.zeros_like(ym, dtype=torch.bool), eps_m,
                                 both=True)

        def meta_loss_at(params):
            fwd = lambda v: call_with(self.model, params, v)  # noqa: E731
            lm = fwd(xm)
            kl_m, ce_anti_m = self.perturbed_terms(fwd, meta_pert, ym, lm)
            ones = torch.ones_like(ce_anti_m)
            return caat_loss(ones, ones, ce_per_sample(lm, ym), kl_m, ce_anti_m, m.c0[ym],
                             m.c1[ym], beta)

        return self.meta_step(virtual_loss, meta_loss_at, lr)

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {**MultiplierMethod.state_dict(self), **MetaLearner.state_dict(self),
                "class_mean_loss": self.class_mean_loss.clone()}

    def load_state_dict(self, state: dict) -> None:
        MultiplierMethod.load_state_dict(self, state)
        MetaLearner.load_state_dict(self, state)
        self.class_mean_loss = state["class_mean_loss"].to(self.class_mean_loss.device)
