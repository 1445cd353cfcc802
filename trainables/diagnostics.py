"""Per-epoch diagnostics of per-sample choices (CAAT's directions and bounds).

A method hands the trial loop per-sample values with each batch (`StepResult.per_sample`);
`EpochSamples` gathers them by training position over an epoch, and `direction_diagnostics`
turns them into the metrics DESIGN.md names. The scenario's ground-truth noise flags enter
here and nowhere else: they describe what a method chose, they never feed a loss.

    anti        1.0 where the sample was trained anti-adversarially, else 0.0
    anti_score  the method's score for that choice (higher: more anti)
    eps         the sample's perturbation bound eps_i
    meta_pref   the meta objective's own preference for anti (only batches of meta steps)
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC AUC of ``score`` as a detector of ``positive`` (pure): the probability that a
    random positive scores above a random negative, ties counting one half (Mann-Whitney).
    None when either class is empty."""
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(score)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def class_means(values: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """Mean of ``values`` per class of ``labels``; NaN for a class with no sample (pure)."""
    sums = np.bincount(labels, weights=values, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(v) for v in np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)]


def direction_diagnostics(samples: dict[str, np.ndarray], labels: np.ndarray,
                          is_noisy: np.ndarray, num_classes: int) -> dict[str, float | list]:
    """The epoch's direction diagnostics from per-sample values (pure).

    ``samples`` holds equal-length arrays over the samples seen this epoch; ``labels`` are
    their observed labels, ``is_noisy`` their ground-truth noise flags. Returns
    `frac_anti_noisy` / `frac_anti_clean` (the first only with noisy samples),
    `anti_noisy_auc` and `meta_pref_noisy_auc` (only with both noisy and clean samples),
    and the class-wise lists `train_class_frac_anti` and `train_class_mean_eps` (by
    observed label, the label the bounds and the loss see).
    """
    out: dict[str, float | list] = {}
    if "anti" not in samples:
        return out
    anti = samples["anti"]
    noisy = np.asarray(is_noisy, dtype=bool)
    if noisy.any():
        out["frac_anti_noisy"] = float(anti[noisy].mean())
    if (~noisy).any():
        out["frac_anti_clean"] = float(anti[~noisy].mean())
    auc = roc_auc(samples["anti_score"], noisy) if "anti_score" in samples else None
    if auc is not None:
        out["anti_noisy_auc"] = auc
    pref = samples.get("meta_pref")
    if pref is not None:
        seen = ~np.isnan(pref)
        auc = roc_auc(pref[seen], noisy[seen]) if seen.any() else None
        if auc is not None:
            out["meta_pref_noisy_auc"] = auc
    out["train_class_frac_anti"] = class_means(anti, labels, num_classes)
    if "eps" in samples:
        out["train_class_mean_eps"] = class_means(samples["eps"], labels, num_classes)
    return out


class EpochSamples:
    """Per-sample values of one epoch, by training position (each sample is seen once an
    epoch; positions never visited, e.g. the dropped partial batch, stay NaN)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._values: dict[str, torch.Tensor] = {}

    def add(self, idx: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for key, v in values.items():
            store = self._values.get(key)
            if store is None:
                store = self._values[key] = torch.full((self.n,), math.nan,
                                                       dtype=torch.float64, device=v.device)
            store[idx] = v.detach().to(torch.float64)

    def __bool__(self) -> bool:
        return bool(self._values)

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(positions seen, {key: values at those positions}); `meta_pref` keeps NaN where
        the sample's batch fed no meta step."""
        seen = ~torch.isnan(self._values["anti"]) if "anti" in self._values else None
        if seen is None:
            seen = torch.zeros(self.n, dtype=torch.bool)
        pos = torch.nonzero(seen.cpu()).squeeze(1).numpy()
        return pos, {k: v.cpu().numpy()[pos] for k, v in self._values.items()}
