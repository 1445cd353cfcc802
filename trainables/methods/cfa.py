"""CFA (Wei et al., CVPR 2023, "Class-wise Calibrated Fair Adversarial Training"): TRADES
with a bound and a beta per class, and fairness-aware weight averaging, as the official
code has it (PKU-ML/CFA `train.py`, `attack.py` and `utils.py`).

- CCM, calibrated margins: from the calibration start on, class c is attacked at
  eps_c = (ccm_lambda + r_c) * eps, r_c its robust accuracy on the training adversarial
  examples of the previous epoch (train mode, observed labels).
- CCR, calibrated regularisation: the code's loss is mean((1 - b_y) CE(x) + b_y KL(x, x_adv))
  with b_c = (ccr_lambda + r_c) beta / (1 + (ccr_lambda + r_c) beta), and b = beta / (1 +
  beta) for every class before the start: TRADES divided by 1 + beta. By default it is
  multiplied back by 1 + beta (`loss_scale: trades`), so that one optimiser setting means
  the same for `trades` and `cfa`; `loss_scale: code` keeps the code's scale.
- FAWA, fairness-aware weight averaging: after each epoch the model's worst-class robust
  accuracy on the validation split (the evaluation attack) is measured; only when it
  clears `fawa_threshold` does the average move, avg = decay * avg + (1 - decay) * model
  (the first such epoch copies the model). The average covers the whole state dict, batch
  norm statistics included.

Which weights are the result: the code keeps the average's checkpoints from half of the
schedule on, picked by robust plus worst-class robust accuracy on the test split. Here that
choice reads the validation split (`final_weights: fawa_best`): at the end of the last
epoch the best average is loaded into the model, which the trial then evaluates. An
average that never started (the gate never opened) leaves the trained model as it is.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from trainables.attacks import ce_per_sample, kl_per_sample
from trainables.knobs import TradesKnobs
from trainables.methods.base import Batch, Method, MethodData, StepResult
from trainables.methods.trades_common import trades_examples, weighted_trades_loss
from trainables.metrics import evaluate


class CFAKnobs(TradesKnobs):
    name: Literal["cfa"] = "cfa"
    ccm: bool = Field(default=True, description=(
        "calibrated margins: class bound (ccm_lambda + last epoch's class robust train "
        "accuracy) * eps"))
    ccr: bool = Field(default=True, description=(
        "calibrated regularisation: a TRADES beta per class from the same accuracies"))
    ccm_lambda: float = Field(default=0.5, ge=0.0, description=(
        "base of the class bound scale (CFA's --lambda-1)"))
    ccr_lambda: float = Field(default=0.5, ge=0.0, description=(
        "base of the class beta scale (CFA's --lambda-2)"))
    calibration_start: float = Field(default=0.05, ge=0.0, lt=1.0, description=(
        "fraction of optim.epochs before CCM and CCR start (CFA: epoch 10 of 200); at "
        "least one epoch, which measures the first accuracies"))
    fawa_decay: float = Field(default=0.88, ge=0.0, le=1.0, description=(
        "weight of the old average in each FAWA update (CFA's --decay-rate)"))
    fawa_threshold: float = Field(default=0.24, ge=0.0, le=1.0, description=(
        "worst-class validation robust accuracy the model must reach for FAWA to update"))
    final_weights: Literal["fawa_best", "fawa_last", "model"] = Field(
        default="fawa_best", description=(
            "the trial's result: the FAWA average with the best validation robust + "
            "worst-class robust accuracy from selection_start on, the last average, or the "
            "trained model (no averaging at all)"))
    loss_scale: Literal["trades", "code"] = Field(default="trades", description=(
        "trades: the loss times (1 + beta), which is TRADES' own loss until CCR starts, so "
        "optim.lr and weight_decay mean what they mean for trades; code: as CFA's code, "
        "mean((1 - b_y) CE + b_y KL), TRADES divided by 1 + beta"))
    selection_start: float = Field(default=0.5, ge=0.0, le=1.0, description=(
        "fraction of optim.epochs from which fawa_best considers averages (CFA: 0.5); the "
        "last epoch's always counts"))


# ------------------------------------------------------------------------------ the maths


def calibrated_eps(eps: float, class_robust: torch.Tensor, lam: float) -> torch.Tensor:
    """CCM's class bounds (lam + r_c) * eps (pure)."""
    return (lam + class_robust) * eps


def calibrated_beta(beta: float, class_robust: torch.Tensor, lam: float) -> torch.Tensor:
    """CCR's class weights of the KL term, s beta / (1 + s beta) with s = lam + r_c (pure)."""
    s = lam + class_robust
    return s * beta / (1 + s * beta)


def plain_beta(beta: float, num_classes: int, device: torch.device | None = None
               ) -> torch.Tensor:
    """The class betas without CCR: beta / (1 + beta) for every class."""
    return torch.full((num_classes,), beta / (1 + beta), device=device)


def cfa_trades_loss(ce: torch.Tensor, kl: torch.Tensor, beta_y: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    """scale * mean((1 - b_y) CE + b_y KL) over the batch (pure)."""
    ones = torch.ones_like(ce)
    return scale * weighted_trades_loss(ce, kl, ones, ones, 1.0, w=1 - beta_y, w_kl=beta_y)


def calibration_epoch(fraction: float, epochs: int) -> int:
    """The 0-based epoch CCM and CCR start at: round(fraction * epochs), and at least 1, as
    the first calibration needs a finished epoch's accuracies."""
    return max(1, round(fraction * epochs))


def class_rates(hits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-class hit rates; 0 for a class not seen (pure)."""
    return torch.where(counts > 0, hits / counts.clamp_min(1), torch.zeros_like(hits))


def fawa_gate(worst_class_robust: float, threshold: float) -> bool:
    """FAWA updates only when the worst class's validation robust accuracy clears this."""
    return worst_class_robust >= threshold


def fawa_update(average: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor],
                decay: float) -> dict[str, torch.Tensor]:
    """decay * average + (1 - decay) * state, entry by entry (pure); the state itself when
    there is no average yet. Integer entries (BatchNorm's batch counters) take the state's
    value: they count, they do not average."""
    if average is None:
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: (decay * average[k] + (1 - decay) * v).detach() if v.is_floating_point()
            else v.detach().clone() for k, v in state.items()}


def selection_index(result: dict[str, Any]) -> float:
    """How the code ranks checkpoints: robust accuracy plus worst-class robust accuracy."""
    return result["robust_acc"] + result["worst_class_robust_acc"]


# ---------------------------------------------------------------------------- the method


class CFA(Method):
    name = "cfa"
    knobs = CFAKnobs

    def __init__(self, model: nn.Module, cfg, data: MethodData) -> None:
        super().__init__(model, cfg, data)
        c, dev = data.num_classes, data.device
        m = cfg.method
        self.start = calibration_epoch(m.calibration_start, cfg.optim.epochs)
        self.class_eps = torch.full((c,), float(self.eps), device=dev)
        self.class_beta = plain_beta(m.beta, c, dev)
        # The robust hits and samples per class of the epoch under way, and the last
        # finished epoch's rates (what the next calibration reads).
        self.hits = torch.zeros(c, device=dev)
        self.counts = torch.zeros(c, device=dev)
        self.class_robust = torch.zeros(c, device=dev)
        self.average: dict[str, torch.Tensor] | None = None
        self.best: dict[str, torch.Tensor] | None = None
        self.best_index = float("-inf")
        self.updates = 0
        self._shell: nn.Module | None = None  # a model to evaluate averages in

    # ------------------------------------------------------------------ epoch hooks

    def epoch_start(self, epoch: int) -> None:
        m, c = self.cfg.method, self.data.num_classes
        calibrate = epoch >= self.start
        self.class_eps = (calibrated_eps(self.eps, self.class_robust, m.ccm_lambda)
                          if m.ccm and calibrate
                          else torch.full_like(self.class_eps, float(self.eps)))
        self.class_beta = (calibrated_beta(m.beta, self.class_robust, m.ccr_lambda)
                           if m.ccr and calibrate else plain_beta(m.beta, c, self.data.device))
        self.hits.zero_()
        self.counts.zero_()

    def step(self, batch: Batch, lr: float) -> StepResult:
        x, y, m = batch.x, batch.y, self.cfg.method
        x_adv = trades_examples(self.model, x, eps=self.class_eps[y], step_size=self.step_size,
                                steps=m.steps)
        logits, logits_adv = self.model(x), self.model(x_adv)
        with torch.no_grad():  # the calibration's accuracies: the train-mode outputs
            c = self.data.num_classes
            self.hits += torch.bincount(y, weights=(logits_adv.argmax(1) == y).float(),
                                        minlength=c)
            self.counts += torch.bincount(y, minlength=c).float()
        loss = cfa_trades_loss(ce_per_sample(logits, y),
                               kl_per_sample(logits_adv, logits, detach_clean=False),
                               self.class_beta[y],
                               1 + m.beta if m.loss_scale == "trades" else 1.0)
        return StepResult(loss)

    def epoch_end(self, epoch: int) -> dict[str, Any]:
        self.class_robust = class_rates(self.hits, self.counts)
        out: dict[str, Any] = {
            "cfa_class_eps": self.class_eps.tolist(), "cfa_class_beta": self.class_beta.tolist(),
            "cfa_eps_max": float(self.class_eps.max()), "cfa_eps_min": float(self.class_eps.min()),
            "cfa_beta_max": float(self.class_beta.max()),
            "cfa_beta_min": float(self.class_beta.min()),
            "cfa_train_worst_class_robust_acc": float(self.class_robust.min())}
        m = self.cfg.method
        if m.final_weights == "model":
            return out
        out.update(self._average(epoch))
        if epoch + 1 == self.cfg.optim.epochs:
            final = self.best if m.final_weights == "fawa_best" else self.average
            if final is not None:  # the trial evaluates `model`: make it the average
                self.model.load_state_dict(final)
            out["fawa_final_is_average"] = float(final is not None)
        return out

    def _average(self, epoch: int) -> dict[str, float]:
        """The FAWA gate and update, and the best-average bookkeeping."""
        m = self.cfg.method
        worst = self._validate(self.model)["worst_class_robust_acc"]
        gate = fawa_gate(worst, m.fawa_threshold)
        if gate:
            self.average = fawa_update(self.average, self.model.state_dict(), m.fawa_decay)
            self.updates += 1
        out = {"fawa_val_worst_class_robust_acc": worst, "fawa_gate": float(gate),
               "fawa_updates": float(self.updates)}
        epochs = self.cfg.optim.epochs
        if (m.final_weights == "fawa_best" and self.average is not None
                and (epoch >= m.selection_start * epochs or epoch + 1 == epochs)):
            index = selection_index(self._validate(self._load_shell(self.average)))
            if index >= self.best_index:  # ties: the later average
                self.best_index = index
                self.best = {k: v.clone() for k, v in self.average.items()}
            out["fawa_val_index"] = index
        return out

    def _validate(self, model: nn.Module) -> dict[str, Any]:
        """Robust accuracies on the validation split at the evaluation attack (CFA: PGD-10
        at the training bound, uniform start), in eval mode."""
        if self.data.val_x is None or self.data.val_y is None:
            raise ValueError("cfa: FAWA reads the validation split, and this trial has none "
                             "(or set method.final_weights: model)")
        cfg = self.cfg
        return evaluate(model, self.data.val_x, self.data.val_y, self.data.num_classes,
                        eps=cfg.eval_eps, steps=cfg.eval.steps, step_size=cfg.eval_step_size,
                        batch_size=cfg.eval.batch_size)

    def _load_shell(self, state: dict[str, torch.Tensor]) -> nn.Module:
        if self._shell is None:
            self._shell = copy.deepcopy(self.model)
        self._shell.load_state_dict(state)
        return self._shell

    # ------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"class_eps": self.class_eps.clone(), "class_beta": self.class_beta.clone(),
                "hits": self.hits.clone(), "counts": self.counts.clone(),
                "class_robust": self.class_robust.clone(), "average": self.average,
                "best": self.best, "best_index": self.best_index, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev = self.data.device
        for key in ("class_eps", "class_beta", "hits", "counts", "class_robust"):
            saved = state[key]
            if saved.shape != getattr(self, key).shape:
                raise ValueError(f"cfa {key}: checkpoint has shape {tuple(saved.shape)}, "
                                 f"this trial {tuple(getattr(self, key).shape)}")
            setattr(self, key, saved.to(dev))
        self.average = _to(state["average"], dev)
        self.best = _to(state["best"], dev)
        self.best_index, self.updates = float(state["best_index"]), int(state["updates"])


def _to(state: dict[str, torch.Tensor] | None, device: torch.device
        ) -> dict[str, torch.Tensor] | None:
    return None if state is None else {k: v.to(device) for k, v in state.items()}
