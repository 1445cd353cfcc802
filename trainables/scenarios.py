"""Training scenarios: clean meta/val splits, long-tailed imbalance and label noise (numpy).

:func:`build_scenario` turns the clean labels of a training pool into the index sets and
(possibly corrupted) labels one trial trains on. The order of operations is fixed:

1. split: a clean, balanced meta set and a clean, balanced validation set, disjoint;
2. subsample (optional ``train_size``): class-stratified, proportions kept;
3. imbalance: keep ``floor(n_max * ratio ** (-c / (C - 1)))`` of class ``c`` (0 = head);
4. noise: on training labels only, exactly ``round(rate * n_c)`` corrupted per class.

Every random choice comes from its own stream derived from ``seed`` (one per stage), and
every stage draws one random key per pool sample whatever the other settings are. So for a
given seed the meta/val sets do not depend on the noise or imbalance settings, the
training subset does not depend on the noise settings, a larger imbalance ratio keeps a
subset of what a smaller one keeps, and a lower noise rate corrupts a subset of the samples
a higher one corrupts (with the same wrong labels): sweep cells differ only in what they
are meant to differ in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np

from trainables.errors import ConfigError
from trainables.registry import unknown_name

if TYPE_CHECKING:
    from trainables.config import TrialConfig


class ScenarioError(ConfigError):
    """Scenario arguments that cannot be realised; one line naming the config field."""


# Stream ids for SeedSequence spawn keys. Fixed numbers (not spawn order) so that adding a
# stage later never changes what an existing stage draws for a given seed.
_SPLIT, _SUBSAMPLE, _IMBALANCE, _NOISE_PICK, _NOISE_TARGET, _TEST_SUBSET = range(6)


def _stream(seed: int, stage: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stage,)))


# ----------------------------------------------------------------------------- noise types

# A noise type maps the clean labels of the samples chosen for corruption, and each one's
# rank in its class's corruption order (0, 1, 2, ...), to new labels that must differ from
# the clean ones. The rank lets a type spread targets evenly and keeps the result nested
# across noise rates (a lower rate corrupts a prefix of each class's order). ``rank_bound``
# exceeds every rank any rate could produce for this pool; a type that sizes its random
# draws by it draws the same numbers whatever the rate.
NoiseFn = Callable[[np.ndarray, np.ndarray, int, np.random.Generator, int], np.ndarray]


def _noise_none(clean: np.ndarray, rank: np.ndarray, num_classes: int,
                rng: np.random.Generator, rank_bound: int) -> np.ndarray:
    # Only ever called with nothing to corrupt (rate 0 is enforced for "none").
    return clean.copy()


def _noise_pair(clean: np.ndarray, rank: np.ndarray, num_classes: int,
                rng: np.random.Generator, rank_bound: int) -> np.ndarray:
    return (clean + 1) % num_classes


def _noise_uniform(clean: np.ndarray, rank: np.ndarray, num_classes: int,
                   rng: np.random.Generator, rank_bound: int) -> np.ndarray:
    # Each class's corruption order is cut into blocks of C-1 samples, and each block gets
    # a random permutation of the C-1 other classes: every corrupted sample's target is
    # uniform over the other classes, yet the realised off-diagonal counts of a row differ
    # by at most one (an i.i.d. draw would leave the realised matrix needlessly uneven).
    others = num_classes - 1
    blocks = max(1, math.ceil(rank_bound / others))
    offsets = rng.random((num_classes, blocks, others)).argsort(axis=-1) + 1
    return (clean + offsets[clean, rank // others, rank % others]) % num_classes


def _noise_flip2(clean: np.ndarray, rank: np.ndarray, num_classes: int,
                 rng: np.random.Generator, rank_bound: int) -> np.ndarray:
    # Two distinct partner classes per class, fixed by the seed; corrupted samples alternate
    # between them so each partner gets half the corrupted samples (the first one the odd
    # one out), i.e. rate/2 each up to rounding.
    partners = rng.random((num_classes, num_classes - 1)).argsort(axis=1)[:, :2] + 1
    return (clean + partners[clean, rank % 2]) % num_classes


NOISE_TYPES: dict[str, NoiseFn] = {
    "none": _noise_none,
    "uniform": _noise_uniform,
    "pair": _noise_pair,
    "flip2": _noise_flip2,
}


# ----------------------------------------------------------------------------- scenario


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class Scenario:
    """Index sets and labels of one trial's data. Positions index the pool's ``labels``."""

    train_idx: np.ndarray  # int64, ascending
    train_labels: np.ndarray  # int64, observed (after noise), aligned with train_idx
    clean_labels: np.ndarray  # int64, true labels of train_idx
    is_noisy: np.ndarray  # bool, train_labels != clean_labels
    meta_idx: np.ndarray  # int64, ascending; clean, meta_per_class of each class
    val_idx: np.ndarray  # int64, ascending; clean, val_per_class of each class
    class_counts: np.ndarray  # int64 (C,), training samples per observed label
    clean_class_counts: np.ndarray  # int64 (C,), training samples per true class
    transition: np.ndarray  # float64 (C, C), row i: clean class i -> observed label j
    noise_type: str
    noise_rate: float
    imbalance_ratio: float
    num_classes: int
    seed: int

    @property
    def realised_noise_rate(self) -> float:
        """Fraction of training samples whose label was changed."""
        return float(self.is_noisy.mean()) if self.is_noisy.size else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable scalars and lists, for logging."""
        clean = self.clean_class_counts
        noisy = np.bincount(self.clean_labels[self.is_noisy], minlength=self.num_classes)
        return {
            "noise_type": self.noise_type,
            "noise_rate": float(self.noise_rate),
            "realised_noise_rate": self.realised_noise_rate,
            "imbalance_ratio": float(self.imbalance_ratio),
            # Head over tail as actually kept (can differ from the asked ratio by flooring).
            "realised_imbalance_ratio": float(clean.max() / max(int(clean.min()), 1)),
            "num_classes": int(self.num_classes),
            "seed": int(self.seed),
            "n_train": int(self.train_idx.size),
            "n_meta": int(self.meta_idx.size),
            "n_val": int(self.val_idx.size),
            "n_noisy": int(self.is_noisy.sum()),
            "class_counts": [int(n) for n in self.class_counts],
            "clean_class_counts": [int(n) for n in clean],
            "noisy_class_counts": [int(n) for n in noisy],
        }


def build_scenario(labels: Any, num_classes: int, *, noise_type: str, noise_rate: float,
                   imbalance_ratio: float, meta_per_class: int, val_per_class: int,
                   seed: int, train_size: int | None = None) -> Scenario:
    """Split, subsample, imbalance and corrupt a training pool; deterministic in ``seed``.

    ``labels`` are the clean labels of the whole training pool (1-D ints in [0, C)). In
    this fixed order:

    1. ``meta_per_class`` and ``val_per_class`` samples of every class are drawn at random
       into a clean meta set and a clean validation set (disjoint); the rest is the pool
       for training. A class that cannot fill both and leave one sample for training is a
       :class:`ScenarioError`.
    2. If ``train_size`` is given, that remaining pool is subsampled per class to
       ``train_size`` samples in total, class proportions kept (largest remainders; every
       class keeps at least one, so the total can exceed ``train_size`` by a few when
       ``train_size`` is tiny).
    3. Class ``c`` keeps ``floor(n_max * imbalance_ratio ** (-c / (C - 1)))`` random samples
       (never more than it has, at least one), ``n_max`` the largest class count left.
    4. In each class, exactly ``round(noise_rate * n_c)`` (half up) random training samples
       get a wrong label as the noise type says (see :data:`NOISE_TYPES`); meta and val
       labels are never touched.
    """
    y = _check_labels(labels, num_classes)
    _check_args(num_classes, noise_type, noise_rate, imbalance_ratio, meta_per_class,
                val_per_class, seed, train_size)
    _check_split_sizes(y, num_classes, meta_per_class, val_per_class)
    n = y.size

    # One key per pool sample per stage, drawn up front: each stage's choice depends only on
    # its own stream, so other settings cannot shift it (see the module docstring).
    split_keys = _stream(seed, _SPLIT).random(n)
    rank = class_ranks(y, split_keys)
    meta_mask = rank < meta_per_class
    val_mask = (rank >= meta_per_class) & (rank < meta_per_class + val_per_class)
    pool = np.flatnonzero(~(meta_mask | val_mask))

    if train_size is not None:
        pool = _subsample(pool, y, num_classes, train_size, _stream(seed, _SUBSAMPLE).random(n))

    pool_counts = np.bincount(y[pool], minlength=num_classes)
    keep = np.minimum(imbalance_counts(int(pool_counts.max()), num_classes, imbalance_ratio),
                      pool_counts)
    imb_keys = _stream(seed, _IMBALANCE).random(n)
    train_idx = pool[class_ranks(y[pool], imb_keys[pool]) < keep[y[pool]]]

    clean = y[train_idx]
    clean_counts = np.bincount(clean, minlength=num_classes)
    observed = _corrupt(clean, train_idx, y, num_classes, noise_type, noise_rate, seed)
    return Scenario(
        train_idx=train_idx,
        train_labels=observed,
        clean_labels=clean,
        is_noisy=observed != clean,
        meta_idx=np.flatnonzero(meta_mask),
        val_idx=np.flatnonzero(val_mask),
        class_counts=np.bincount(observed, minlength=num_classes),
        clean_class_counts=clean_counts,
        transition=transition_matrix(clean, observed, num_classes),
        noise_type=noise_type,
        noise_rate=float(noise_rate),
        imbalance_ratio=float(imbalance_ratio),
        num_classes=int(num_classes),
        seed=int(seed),
    )


def scenario_from_config(labels: Any, num_classes: int, cfg: TrialConfig) -> Scenario:
    """:func:`build_scenario` with the scenario, train_size and seed of a trial config."""
    sc = cfg.scenario
    return build_scenario(labels, num_classes, noise_type=sc.noise_type,
                          noise_rate=sc.noise_rate, imbalance_ratio=sc.imbalance_ratio,
                          meta_per_class=sc.meta_per_class, val_per_class=sc.val_per_class,
                          seed=cfg.runtime.seed, train_size=cfg.dataset.train_size)


# ----------------------------------------------------------------------------- pure parts


def imbalance_counts(n_max: int, num_classes: int, ratio: float) -> np.ndarray:
    """Long-tailed target counts ``floor(n_max * ratio ** (-c / (C - 1)))``, at least 1."""
    exponent = -np.arange(num_classes) / (num_classes - 1)
    # The tiny slack stops an exact product such as 500 * 10**-1 flooring to 49 when the
    # power lands a hair below its true value.
    target = np.floor(n_max * np.power(float(ratio), exponent) + 1e-9).astype(np.int64)
    return np.maximum(target, 1)


def noisy_counts(class_counts: np.ndarray, rate: float) -> np.ndarray:
    """Samples to corrupt per class: ``round(rate * n_c)``, halves rounded up."""
    return np.floor(rate * np.asarray(class_counts, dtype=np.float64) + 0.5).astype(np.int64)


def transition_matrix(clean: np.ndarray, observed: np.ndarray, num_classes: int) -> np.ndarray:
    """Realised (C, C) matrix: row i = share of clean class i carrying each observed label.

    Rows of classes with no samples are the identity row, so every row sums to 1.
    """
    counts = np.bincount(clean * num_classes + observed, minlength=num_classes * num_classes)
    counts = counts.reshape(num_classes, num_classes).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    eye = np.eye(num_classes)
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), eye)


def class_ranks(labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each sample's rank among the samples of its class, ordered by ``keys``."""
    order = np.lexsort((keys, labels))
    sorted_labels = labels[order]
    # searchsorted of a sorted array into itself gives each class's first position.
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ranks = np.empty(labels.size, dtype=np.int64)
    ranks[order] = np.arange(labels.size) - first
    return ranks


def pick_test_subset(labels: Any, num_classes: int, size: int) -> np.ndarray:
    """Ascending positions of ``size`` test samples, class proportions kept.

    Drawn from a fixed stream, not the trial's seed: every trial and seed is scored on the
    same test samples, so their results stay comparable."""
    y = np.asarray(labels, dtype=np.int64)
    if size >= y.size:
        return np.arange(y.size)
    keys = _stream(0, _TEST_SUBSET).random(y.size)
    return _subsample(np.arange(y.size), y, num_classes, size, keys)


def _subsample(pool: np.ndarray, y: np.ndarray, num_classes: int, train_size: int,
               keys: np.ndarray) -> np.ndarray:
    counts = np.bincount(y[pool], minlength=num_classes)
    if train_size > pool.size:
        raise ScenarioError(f"dataset.train_size: {train_size} is more than the {pool.size} "
                            "training samples left after the meta/val splits")
    quota = _proportional_quota(counts, train_size)
    return pool[class_ranks(y[pool], keys[pool]) < quota[y[pool]]]


def _proportional_quota(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainders)."""
    exact = total * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    short = total - int(quota.sum())
    # Stable sort: ties in the remainder go to the lower class id, deterministically.
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    # A class present in the pool must stay present in training.
    return np.minimum(np.maximum(quota, counts > 0), counts)


def _corrupt(clean: np.ndarray, train_idx: np.ndarray, y: np.ndarray, num_classes: int,
             noise_type: str, noise_rate: float, seed: int) -> np.ndarray:
    # Corruption order: random keys drawn for the whole pool, so the order within a class
    # does not depend on which samples the earlier stages kept.
    pick_keys = _stream(seed, _NOISE_PICK).random(y.size)
    rank = class_ranks(clean, pick_keys[train_idx])
    k = noisy_counts(np.bincount(clean, minlength=num_classes), noise_rate)
    chosen = rank < k[clean]
    observed = clean.copy()
    if chosen.any():
        # The largest class of the whole pool bounds every rank, whatever the rate.
        rank_bound = int(np.bincount(y).max())
        observed[chosen] = NOISE_TYPES[noise_type](clean[chosen], rank[chosen], num_classes,
                                                   _stream(seed, _NOISE_TARGET), rank_bound)
    return observed


# ----------------------------------------------------------------------------- validation


def _check_labels(labels: Any, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ScenarioError(f"labels: expected a 1-D array of class ids, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ScenarioError(f"labels: expected integer class ids, got dtype {y.dtype}")
    if not isinstance(num_classes, Integral) or isinstance(num_classes, bool) or num_classes < 2:
        raise ScenarioError(f"dataset.num_classes: must be an integer >= 2, got {num_classes!r}")
    if y.size == 0:
        raise ScenarioError("labels: the training pool is empty")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ScenarioError(f"dataset.num_classes: labels must lie in [0, {num_classes}), "
                            f"found values in [{lo}, {hi}]")
    return y.astype(np.int64, copy=False)


def _check_split_sizes(y: np.ndarray, num_classes: int, meta_per_class: int,
                       val_per_class: int) -> None:
    counts = np.bincount(y, minlength=num_classes)
    # One sample beyond meta + val must stay, or the class would vanish from training.
    need = meta_per_class + val_per_class + 1
    worst = int(counts.argmin())
    if counts[worst] < need:
        raise ScenarioError(
            f"scenario.meta_per_class / scenario.val_per_class: class {worst} has "
            f"{counts[worst]} samples, needs {need} ({meta_per_class} meta + {val_per_class} "
            f"val + 1 for training); at most {max(int(counts[worst]) - 1, 0)} per class "
            "available for meta + val")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_args(num_classes: int, noise_type: str, noise_rate: float, imbalance_ratio: float,
                meta_per_class: int, val_per_class: int, seed: int,
                train_size: int | None) -> None:
    if noise_type not in NOISE_TYPES:
        raise ScenarioError(unknown_name("scenario.noise_type", noise_type, sorted(NOISE_TYPES)))
    if not isinstance(noise_rate, Real) or not 0.0 <= float(noise_rate) < 1.0:
        raise ScenarioError(f"scenario.noise_rate: must be in [0, 1), got {noise_rate!r}")
    if noise_type == "none" and noise_rate > 0:
        raise ScenarioError("scenario.noise_rate: must be 0 with noise_type none; "
                            "use uniform, pair or flip2 for noise")
    if noise_type == "flip2" and num_classes < 3:
        raise ScenarioError(f"scenario.noise_type: flip2 needs at least 3 classes, "
                            f"got {num_classes}")
    if (not isinstance(imbalance_ratio, Real) or not math.isfinite(imbalance_ratio)
            or imbalance_ratio < 1.0):
        raise ScenarioError(f"scenario.imbalance_ratio: must be a finite number >= 1, "
                            f"got {imbalance_ratio!r}")
    for field, value in (("meta_per_class", meta_per_class), ("val_per_class", val_per_class)):
        if not _is_int(value) or value < 0:
            raise ScenarioError(f"scenario.{field}: must be an integer >= 0, got {value!r}")
    if not _is_int(seed) or seed < 0:
        raise ScenarioError(f"runtime.seed: must be an integer >= 0, got {seed!r}")
    if train_size is not None and (not _is_int(train_size) or train_size < num_classes):
        raise ScenarioError(f"dataset.train_size: must be an integer >= the number of "
                            f"classes ({num_classes}), got {train_size!r}")
