"""Evaluation: natural and PGD robust accuracy, class-wise, worst class, boundary error.

Class-wise numbers always come from the true (clean) labels of the split being evaluated;
robust accuracy is a real attack (L-inf PGD on cross-entropy with a uniform random start).
"""

from __future__ import annotations

import torch
from torch import nn

from trainables.attacks import pgd_ce


def class_accuracy(correct: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class accuracy (C,); a class absent from ``y`` gets NaN rather than 0 or 1."""
    # float64: accuracies are ratios of counts and should print as such (0.6938, not
    # float32's 0.6937999725), in reports, MLflow and tables alike.
    hits = torch.bincount(y, weights=correct.double(), minlength=num_classes)
    totals = torch.bincount(y, minlength=num_classes).double()
    return torch.where(totals > 0, hits / totals.clamp_min(1), torch.full_like(hits, float("nan")))


def metrics_from_correct(natural_correct: torch.Tensor, robust_correct: torch.Tensor,
                         y: torch.Tensor, num_classes: int) -> dict:
    """Scalar metrics and class-wise lists from per-sample correctness (pure)."""
    cls_nat = class_accuracy(natural_correct, y, num_classes)
    cls_rob = class_accuracy(robust_correct, y, num_classes)
    present = ~torch.isnan(cls_nat)
    nat = natural_correct.double().mean().item()
    rob = robust_correct.double().mean().item()
    return {
        "natural_acc": nat,
        "robust_acc": rob,
        "worst_class_natural_acc": cls_nat[present].min().item(),
        "worst_class_robust_acc": cls_rob[present].min().item(),
        # Population std over the classes present: the spread, not an estimator.
        "class_natural_acc_std": cls_nat[present].std(unbiased=False).item(),
        "boundary_error": nat - rob,
        "class_natural_acc": cls_nat.tolist(),
        "class_robust_acc": cls_rob.tolist(),
        # The denominators of the class-wise accuracies, for their binomial intervals.
        "class_count": torch.bincount(y, minlength=num_classes).tolist(),
    }


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
             eps: float, steps: int, step_size: float, batch_size: int = 500,
             generator: torch.Generator | None = None) -> dict:
    """Natural and PGD-`steps` robust accuracy of ``model`` on (x, y), plus class-wise stats.

    The model is evaluated in eval mode and left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    nat, rob = [], []
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            with torch.no_grad():
                nat.append(model(xb).argmax(1) == yb)
            x_adv = pgd_ce(model, xb, yb, eps=eps, step_size=step_size, steps=steps,
                           random_start="uniform", generator=generator)
            with torch.no_grad():
                rob.append(model(x_adv).argmax(1) == yb)
    finally:
        model.train(was_training)
    return metrics_from_correct(torch.cat(nat), torch.cat(rob), y, num_classes)
