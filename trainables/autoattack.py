"""AutoAttack beside PGD: which test images, running pyautoattack, and its metrics.

PGD alone can overstate robustness when a model masks its gradients; AutoAttack (Croce and
Hein, 2020) is the ensemble reviewers expect. It runs once after a trial's last epoch on a
fixed, class-balanced subset of the test split, in fp32 and eval mode, at `eval.eps`, with
the packaged reference code (`pyautoattack`). Its own sanity checks (randomness, softmax
output, zero gradients, dynamic defences, class count) are captured as one-line flags
instead of being printed. PGD with the trial's eval settings is run on the same images, so
the gap between the two is a like-for-like measure of gradient masking.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from trainables.attacks import eval_mode
from trainables.config import EvalConfig, TrialConfig
from trainables.errors import ConfigError
from trainables.metrics import class_accuracy, evaluate
from trainables.scenarios import class_ranks

if TYPE_CHECKING:
    from trainables.problem import Problem

# AutoAttack's own seed: fixed, so anyone re-running it on a trial's model.pt and
# `autoattack_indices` needs nothing else to get the same result.
AUTOATTACK_SEED = 0
# The targets `standard` attacks with APGD-T and FAB-T (the published setting).
STANDARD_TARGETS = 9
# APGD-T's targeted DLR loss reads the 1st, 3rd and 4th largest logits.
MIN_CLASSES = 4
# The keys of the subset's keys stream: fixed, never the trial's seed.
_SUBSET_SEED = 12


# ------------------------------------------------------------------------------ subset


def balanced_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """How many of each class to take for ``n`` samples: equal shares, a class short of its
    share giving the rest to the others; remainders to the lower class ids (pure)."""
    counts = np.asarray(counts, dtype=np.int64)
    quota = np.zeros_like(counts)
    left = min(int(n), int(counts.sum()))
    while left > 0:
        open_ = np.flatnonzero(quota < counts)
        share, extra = divmod(left, open_.size)
        add = np.full(open_.size, share, dtype=np.int64)
        add[:extra] += 1
        add = np.minimum(add, counts[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    return quota


def stratified_subset(labels: Any, n: int) -> np.ndarray:
    """Ascending positions of ``n`` samples of ``labels``, as equal a count per class as the
    classes allow. Depends on the labels and ``n`` only (a fixed key stream, not a trial's
    seed), so every trial and seed of a test split attacks the same images; a larger ``n``
    keeps the images of a smaller one."""
    y = np.asarray(labels, dtype=np.int64)
    quota = balanced_quota(np.bincount(y), n)
    keys = np.random.default_rng(_SUBSET_SEED).random(y.size)
    return np.flatnonzero(class_ranks(y, keys) < quota[y])


# ------------------------------------------------------------------------------ config


def target_count(cfg: EvalConfig) -> int:
    return STANDARD_TARGETS if cfg.autoattack == "standard" else cfg.autoattack_targets


def check_classes(cfg: EvalConfig, num_classes: int) -> None:
    """ConfigError unless the AutoAttack asked for can run on ``num_classes`` classes (known
    once the dataset is loaded: checked then, not after training)."""
    if cfg.autoattack == "none":
        return
    if num_classes < MIN_CLASSES:
        raise ConfigError(f"eval.autoattack: APGD-T needs at least {MIN_CLASSES} classes, this "
                          f"dataset has {num_classes}; allowed here: none")
    if cfg.autoattack == "standard" and num_classes <= STANDARD_TARGETS:
        raise ConfigError(f"eval.autoattack: standard attacks {STANDARD_TARGETS} target "
                          f"classes, this dataset has {num_classes}; allowed here: none, or "
                          f"fast with eval.autoattack_targets 1 to {num_classes - 1}")
    if cfg.autoattack == "fast" and cfg.autoattack_targets >= num_classes:
        raise ConfigError(f"eval.autoattack_targets: {cfg.autoattack_targets} target classes, "
                          f"this dataset has {num_classes}; allowed: 1 to {num_classes - 1}")


# ---------------------------------------------------------------------------- running


@dataclass(frozen=True)
class AutoAttackResult:
    correct: torch.Tensor  # bool (N,): still classified correctly after AutoAttack
    flags: list[str]  # what AutoAttack's checks flagged, one line each, in order


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   version: str, targets: int = 3, batch_size: int = 250,
                   seed: int = AUTOATTACK_SEED) -> AutoAttackResult:
    """L-inf AutoAttack of ``model`` on (x, y) in pixel space: `standard` or `fast` (APGD-CE
    and APGD-T with ``targets`` targets, one restart each, as `standard` runs them).

    In fp32 and eval mode (every module's mode restored after); torch's global RNG is left
    as it was, since pyautoattack reseeds it.
    """
    from pyautoattack import AutoAttack

    x, y = x.detach().float(), y.detach()
    with _quiet_checks() as flags, eval_mode(model), _fp32(x.device), \
            torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        if version == "standard":
            aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, device=x.device,
                            version="standard")
        elif version == "fast":
            aa = AutoAttack(model, norm="Linf", eps=eps, seed=seed, device=x.device,
                            version="custom", attacks=["apgd-ce", "apgd-t"])
            # `custom` keeps the constructor's 5 restarts of APGD-CE; `standard` runs 1.
            aa.apgd.n_restarts = 1
            aa.apgd_targeted.n_restarts = 1
            aa.apgd_targeted.n_target_classes = targets
        else:
            raise ValueError(f"version: expected fast or standard, got {version!r}")
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    # y_adv: the clean prediction, replaced by the adversarial one where an attack won.
    return AutoAttackResult(correct=(y_adv == y).cpu(), flags=_dedupe(flags))


@contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    # Attacks always run in fp32: a caller's autocast would change what is attacked.
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def _quiet_checks() -> Iterator[list[str]]:
    """Collect what AutoAttack's checks flag (warnings and its 'auto-attack' logger) rather
    than let them reach stdout/stderr or a sweep's log handlers."""
    from pyautoattack import checks

    flags: list[str] = []
    logger = logging.getLogger("auto-attack")
    handler = _Collect(flags)
    saved = (logger.level, logger.propagate, dict(checks.funcs), sys.gettrace())
    # check_dynamic counts calls into module-level counters it never resets: one dynamic
    # model would flag every model attacked after it in the process.
    checks.funcs.update(dict.fromkeys(checks.funcs, 0))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # its progress lines are debug/info
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield flags
        for w in caught:  # its checks' warnings are flags; anyone else's go on as they were
            if "pyautoattack" in w.filename:
                flags.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        checks.funcs.update(saved[2])
        # check_dynamic ends with sys.settrace(None): give a debugger or coverage its tracer back.
        sys.settrace(saved[3])


def _dedupe(flags: list[str]) -> list[str]:
    # The zero-gradient check runs per batch, restart and target: keep each line once.
    return list(dict.fromkeys(" ".join(f.split()) for f in flags))


# ---------------------------------------------------------------------------- metrics


def autoattack_metrics(aa_correct: torch.Tensor, pgd_acc: float, y: torch.Tensor,
                       num_classes: int) -> dict[str, Any]:
    """AutoAttack's accuracy, worst class, class-wise list (true labels; NaN for an absent
    class) and PGD's accuracy on the same images minus AutoAttack's (pure)."""
    y = y.cpu()
    per_class = class_accuracy(aa_correct.cpu(), y, num_classes)
    acc = aa_correct.double().mean().item()
    return {"autoattack_acc": acc,
            "worst_class_autoattack_acc": per_class[~torch.isnan(per_class)].min().item(),
            "pgd_autoattack_gap": pgd_acc - acc,
            "class_autoattack_acc": per_class.tolist()}


def autoattack_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                      *, eps: float, version: str, targets: int, steps: int, step_size: float,
                      batch_size: int = 250, generator: torch.Generator | None = None
                      ) -> dict[str, Any]:
    """AutoAttack and PGD-`steps` (random start, ``generator``) on the same (x, y): the
    metrics of `autoattack_metrics`, PGD's own accuracy, and AutoAttack's flags."""
    pgd = evaluate(model, x, y, num_classes, eps=eps, steps=steps, step_size=step_size,
                   batch_size=batch_size, generator=generator)
    res = run_autoattack(model, x, y, eps=eps, version=version, targets=targets,
                         batch_size=batch_size)
    out = autoattack_metrics(res.correct, pgd["robust_acc"], y, num_classes)
    out["autoattack_natural_acc"] = pgd["natural_acc"]
    out["autoattack_pgd_acc"] = pgd["robust_acc"]
    out["autoattack_flag_count"] = len(res.flags)
    out["autoattack_flags"] = res.flags
    return out


def evaluate_autoattack(cfg: TrialConfig, model: nn.Module, problem: Problem, *,
                        pgd_generator: torch.Generator | None = None) -> dict[str, Any]:
    """A trial's AutoAttack report (`autoattack_report`) with `test_` names, and
    `test_autoattack_indices`: the positions in the dataset's test split of the images
    attacked, for re-running AutoAttack on exactly those. {} when `eval.autoattack` is none."""
    if cfg.eval.autoattack == "none":
        return {}
    labels = problem.test_y.cpu().numpy()
    n = cfg.eval.autoattack_samples
    pick = stratified_subset(labels, labels.size if n == "all" else n)
    on_device = torch.as_tensor(pick, device=problem.test_y.device)
    out = autoattack_report(model, problem.test_x[on_device], problem.test_y[on_device],
                            problem.num_classes, eps=cfg.eval_eps, version=cfg.eval.autoattack,
                            targets=target_count(cfg.eval), steps=cfg.eval.steps,
                            step_size=cfg.eval_step_size, batch_size=cfg.eval.batch_size,
                            generator=pgd_generator)
    out["autoattack_indices"] = problem.test_idx[pick].tolist()
    # The images per class attacked: the denominators of `class_autoattack_acc`.
    out["class_autoattack_count"] = np.bincount(labels[pick],
                                                minlength=problem.num_classes).tolist()
    return {f"test_{k}": v for k, v in out.items()}
