"""FAAL (Zhang et al., CVPR 2024, "Towards Fairness-Aware Adversarial Learning").

FAAL fine-tunes an adversarially trained model for a few epochs with class weights chosen
per batch by distributionally robust optimisation: the worst distribution ``p`` over the
classes within a KL ball around the uniform one, scored by each class's adversarial margin.
One trial runs both parts, so budgets compare with other methods epoch for epoch:

    epochs [0, E - finetune_epochs)   pre-training: the project's `pgd_at` or `trades` step
    the last `finetune_epochs`        FAAL: per batch, margins -> worst p -> weighted loss

The official code (TrustAI/FAAL, `ft_prn.py`, `FAAL.py`) fine-tunes a downloaded PGD-AT or
TRADES model for 2 epochs and solves the inner problem with CVXPY. Its problem is

    max_p  sum_i p[y_i] * m[y_i]   s.t.  p >= 0,  sum_c p_c = 1,  KL(q || p) <= r

with q uniform, m_c the batch mean of class c's margin max_{k != y} softmax_k - softmax_y
and the sum over the batch's samples, so class c scores a_c = n_c * m_c (n_c its samples
in the batch). `worst_class_weights` solves it in closed form (KKT of this direction of
the KL, KL(q || p): p_c proportional to q_c / (nu - a_c), nu > max a, found by bisection
so the constraint holds with equality). The batch loss is C * sum_i p[y_i] * loss_i / B.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from trainables.attacks import ce_per_sample, kl_per_sample, pgd_ce
from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, StepResult
from trainables.methods.pgd_at import PGDAT
from trainables.methods.trades import TRADES
from trainables.methods.trades_common import trades_examples

# The 1-D search: each round cuts the log-bracket 63-fold; 9 rounds pass float64's resolution.
GRID_POINTS, SEARCH_ROUNDS = 64, 9


class FAALKnobs(TradesKnobs):
    name: Literal["faal"] = "faal"
    finetune_epochs: int = Field(default=2, ge=1, description=(
        "the trial's last epochs that fine-tune with FAAL (the code: 2); the ones before "
        "pre-train with `pretrain`; all of them when the trial is no longer"))
    pretrain: Literal["pgd_at", "trades"] = Field(default="pgd_at", description=(
        "the adversarial training before the fine-tune (the code's PGD or TRADES models)"))
    finetune_loss: Literal["at", "trades"] = Field(default="at", description=(
        "FAAL's per-sample loss: CE on PGD examples (FAAL_AT, the code's runs) or TRADES' "
        "CE(clean) + beta * KL (FAAL_TRADES)"))
    kl_radius: float = Field(default=0.5, ge=0.0, description=(
        "r: the KL(uniform || p) ball of the class distribution (the code's --scale); 0: "
        "uniform weights, i.e. the plain loss"))


# ------------------------------------------------------------------------------- maths

def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample probability margin: the largest other class's softmax minus the label's
    (pure; > 0 where the sample is misclassified)."""
    p = F.softmax(logits, dim=1)
    label = p.gather(1, y[:, None]).squeeze(1)
    others = p.scatter(1, y[:, None], float("-inf"))
    return others.max(dim=1).values - label


def class_scores(values: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """a_c = sum of ``values`` over the batch's samples of class c (pure): the code's
    objective sum_i p[y_i] * mean_{j: y_j = y_i} v_j is sum_c p_c * a_c; 0 for a class
    absent from the batch (whose weight then moves no loss)."""
    return torch.zeros(num_classes, dtype=values.dtype, device=values.device).index_add_(
        0, y, values)


def _kl_at(s: torch.Tensor, gap: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    # KL(q || p) at each s (...,) for p_c = q_c / (s + gap_c) normalised:
    # sum q log(s + gap) + log sum q / (s + gap).
    t = s[..., None] + gap
    return (prior * torch.log(t)).sum(-1) + torch.log((prior / t).sum(-1))


def worst_class_weights(scores: torch.Tensor, prior: torch.Tensor, radius: float,
                        rounds: int = SEARCH_ROUNDS) -> torch.Tensor:
    """argmax_p sum_c p_c * scores_c over the simplex with KL(prior || p) <= radius (pure).

    The stationarity condition gives p_c = lam * prior_c / (s + gap_c), gap_c = max(scores)
    - scores_c, for some s > 0, lam normalising; KL(prior || p(s)) falls from infinity
    (s -> 0) to 0 (s -> inf), so a 1-D search on log s meets the radius: a bracket, then
    ``rounds`` of a 64-point grid each (a bisection 6 halvings at a time, one vectorised
    evaluation per round). Unless the scores are all equal the constraint is active: a
    linear objective's maximiser on the simplex is a vertex, outside every KL(prior || .)
    ball. Returns the feasible end of the final bracket, in ``scores``' dtype and device;
    computed in float64.
    """
    a, q = scores.detach().double(), prior.detach().double().to(scores.device)
    gap = a.max() - a
    top = float(gap.max())
    if radius <= 0 or top == 0.0:
        return q.to(scores.dtype)
    # As s -> inf KL ~ Var_q(gap) / (2 s^2) <= top^2 / (8 s^2): this hi is feasible or close.
    log_hi = torch.tensor(top * (1.0 + radius ** -0.5), dtype=a.dtype, device=a.device).log()
    while _kl_at(log_hi.exp(), gap, q) > radius:
        log_hi = log_hi + 2.0
    log_lo = log_hi - 4.0
    while _kl_at(log_lo.exp(), gap, q) <= radius and log_lo > -700:
        log_lo = log_lo - 4.0
    for _ in range(rounds):
        grid = torch.linspace(0.0, 1.0, GRID_POINTS, dtype=a.dtype, device=a.device)
        grid = log_lo + (log_hi - log_lo) * grid
        # The first feasible point (the last one is): KL falls along the grid.
        first = int((_kl_at(grid.exp(), gap, q) <= radius).to(torch.int8).argmax())
        log_lo, log_hi = grid[max(first - 1, 0)], grid[first]
    p = q / (log_hi.exp() + gap)
    return (p / p.sum()).to(scores.dtype)


def faal_loss(per_sample: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """C * sum_i w[y_i] * loss_i / B (pure): uniform weights give the batch-mean loss."""
    return (per_sample * weights[y]).sum() * len(weights) / len(y)


# ------------------------------------------------------------------------------ method

class FAAL(Method):
    name = "faal"
    knobs = FAALKnobs

    def __init__(self, model, cfg, data) -> None:
        super().__init__(model, cfg, data)
        k = cfg.method
        self.pretrainer = (PGDAT if k.pretrain == "pgd_at" else TRADES)(model, cfg, data)
        self.first_finetune_epoch = max(0, cfg.optim.epochs - k.finetune_epochs)
        self.prior = torch.full((data.num_classes,), 1.0 / data.num_classes,
                                dtype=torch.float64)
        self.finetune = False
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        # The epoch's sum of the batches' weights (CPU float64), for epoch_end's diagnostics.
        self.weight_sum = torch.zeros(self.data.num_classes, dtype=torch.float64)
        self.weight_batches = 0

    def epoch_start(self, epoch: int) -> None:
        self.finetune = epoch >= self.first_finetune_epoch
        self._reset_epoch()

    def step(self, batch: Batch, lr: float) -> StepResult:
        if not self.finetune:
            return self.pretrainer.step(batch, lr)
        k, x, y = self.cfg.method, batch.x, batch.y
        if k.finetune_loss == "at":
            x_adv = pgd_ce(self.model, x, y, eps=self.eps, step_size=self.step_size,
                           steps=k.steps, random_start="uniform")
        else:
            x_adv = trades_examples(self.model, x, eps=self.eps, step_size=self.step_size,
                                    steps=k.steps)
        # Adversarial then clean train-mode forwards, as the code: in its AT mode the clean
        # logits are unused, but that forward still moves BatchNorm's running statistics.
        logits_adv = self.model(x_adv)
        if k.finetune_loss == "at":
            with torch.no_grad():
                self.model(x)
            per_sample = ce_per_sample(logits_adv, y)
        else:
            logits_clean = self.model(x)
            per_sample = ce_per_sample(logits_clean, y) + k.beta * kl_per_sample(
                logits_adv, logits_clean, detach_clean=False)
        scores = class_scores(margins(logits_adv.detach(), y), y, self.data.num_classes)
        # The 1-D search is a loop of scalar steps: on the CPU, one transfer per batch.
        w = worst_class_weights(scores.cpu(), self.prior, k.kl_radius)
        self.weight_sum += w.double()
        self.weight_batches += 1
        return StepResult(faal_loss(per_sample, y, w.to(per_sample)))

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        out: dict[str, Any] = {"faal_finetune": float(self.finetune)}
        if self.weight_batches:
            # Each class's mean weight over the epoch's batches, relative to uniform (1).
            mean = self.weight_sum / self.weight_batches * self.data.num_classes
            out.update({"class_weight_max": float(mean.max()),
                        "class_weight_min": float(mean.min()),
                        "train_class_faal_weight": mean.tolist()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"finetune": self.finetune, "weight_sum": self.weight_sum.clone(),
                "weight_batches": self.weight_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.finetune = bool(state["finetune"])
        self.weight_sum = state["weight_sum"].to(torch.float64).clone()
        self.weight_batches = int(state["weight_batches"])
