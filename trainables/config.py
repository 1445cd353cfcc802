"""The typed trial config: one schema, defaults everywhere, dotted overrides.

An empty config trains on Fashion-MNIST. Every key a user script or a sweep may name is
declared here; unknown keys, wrong types and out-of-range values fail at load time with
one line naming the field (:class:`ConfigError`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainables.errors import ConfigError
from trainables.registry import DATASETS, METHODS, MODELS


class _Strict(BaseModel):
    # forbid: a misspelt key must fail, not be silently ignored.
    # validate_assignment: configs edited in code stay valid.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Attack radii used when a config leaves eps unset (the literature's defaults).
DEFAULT_EPS = {"fashion_mnist": 0.1, "cifar10": 8 / 255, "cifar100": 8 / 255, "gmm": 0.1,
               "synthetic": 8 / 255}
# Per-method defaults of the knobs a config leaves unset (None), each from the method's own
# reference code unless a measurement here chose otherwise.
# caat: meta Adam lr 1e-4 and weight decay 5e-4 (xiaolingzhou98/CAAT `CAAT.py`); the lr was
# chosen on the validation split among 1e-2, 1e-3 and 1e-4 at a meta step every 5 batches;
# then every 20 batches rather than the original's 50 or 5: equal on validation, at a
# quarter of the meta steps' cost (README, "What CAAT's meta-net learns"). Bound scales
# clipped to [0.98, 2.5] and a fixed attack step at the class bounds, as CAAT's `utils.py`.
# mwn: Adam 1e-3 with weight decay 1e-4 (xjtushujun/meta-weight-net `MW-Net.py`); a meta
# step every 50 batches rather than every batch, for cost.
# frl: bound scales up to 3 and an attack step of max_i(eps_i)/4 at the class bounds
# (hannxu123/fair_robust `utils_frl2.py`).
METHOD_DEFAULTS = {
    "caat": {"meta_interval": 20, "meta_lr": 1e-4, "meta_weight_decay": 5e-4,
             "margin_limit": 2.5, "bound_step": "fixed"},
    "mwn": {"meta_interval": 50, "meta_lr": 1e-3, "meta_weight_decay": 1e-4},
    "frl": {"margin_limit": 3.0, "bound_step": "max_bound"},
}
DEFAULT_FALLBACK = {"meta_interval": 50, "meta_lr": 1e-3, "meta_weight_decay": 1e-4,
                    "margin_limit": 2.5, "bound_step": "fixed"}


class DatasetConfig(_Strict):
    name: str = "fashion_mnist"
    # Subsample of the training pool, taken after the meta/val splits (class-stratified).
    train_size: int | None = Field(default=None, ge=1)
    # Class-stratified subset of the test split, the same for every trial and seed (None:
    # the whole split); for quick CPU sweeps, where evaluating 10k test images dominates.
    test_size: int | None = Field(default=None, ge=1)
    # synthetic/gmm only: image shape C x H x W, classes and split sizes.
    shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = Field(default=10, ge=2)
    n_train: int = Field(default=5000, ge=1)
    n_test: int = Field(default=1000, ge=1)
    # gmm only: per-class std grows geometrically from gmm_spread by gmm_spread_ratio
    # (head class tightest), so classes differ in how hard they are.
    gmm_spread: float = Field(default=0.08, gt=0)
    gmm_spread_ratio: float = Field(default=3.0, ge=1)
    data_dir: str | None = None
    # CIFAR-style augmentation (random crop with padding, horizontal flip); None = the
    # dataset's default (on for CIFAR, off otherwise).
    augment: bool | None = None


class ScenarioConfig(_Strict):
    noise_type: Literal["none", "uniform", "pair", "flip2"] = "none"
    noise_rate: float = Field(default=0.0, ge=0.0, lt=1.0)
    imbalance_ratio: float = Field(default=1.0, ge=1.0)
    meta_per_class: int = Field(default=20, ge=1)
    val_per_class: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _noise_consistent(self) -> ScenarioConfig:
        if self.noise_type == "none" and self.noise_rate > 0:
            raise ValueError("noise_rate > 0 needs noise_type uniform, pair or flip2")
        return self


class ModelConfig(_Strict):
    arch: str = "small_cnn"


class MethodConfig(_Strict):
    """Knobs of every method in one flat block; each method reads the ones it uses."""

    name: str = "trades"
    eps: float | None = Field(default=None, ge=0.0, le=1.0)  # None: dataset default
    step_size: float | None = Field(default=None, gt=0.0)  # None: eps / 4
    steps: int = Field(default=10, ge=1)
    beta: float = Field(default=6.0, ge=0.0)
    # CAAT / MWN meta-learning
    # CAAT's training softmax: 0.001 makes the adversarial/anti choice nearly hard.
    temperature: float = Field(default=0.001, gt=0.0)
    # The softmax the meta gradient flows through (straight-through: training keeps the
    # hard choice at `temperature`). None: through the training softmax itself, as the
    # original, where a saturated softmax leaves almost no gradient.
    meta_temperature: float | None = Field(default=1.0, gt=0.0)
    # `adversarial`: the meta-net starts by sending every sample adversarial (CAAT begins
    # as TRADES with FRL multipliers); `random`: PyTorch's default init, as the original,
    # whose first split is a coin flip of the seed.
    meta_init: Literal["adversarial", "random"] = "adversarial"
    # How the meta-net standardises its features: `running` statistics (a sample's choice
    # does not depend on the rest of its batch) or train-mode `batch` BatchNorm (original).
    meta_norm: Literal["running", "batch"] = "running"
    # Who picks each sample's direction (CAAT): the meta-net, or an ablation that keeps
    # everything else: `random` (anti with probability anti_fraction, drawn every batch)
    # or `loss_rank` (the anti_fraction of highest clean loss within each observed class).
    direction_policy: Literal["meta", "random", "loss_rank"] = "meta"
    anti_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    # Batches between meta steps, and the meta-net's Adam learning rate; None: the
    # method's default (METHOD_DEFAULTS).
    meta_interval: int | None = Field(default=None, ge=1)
    meta_lr: float | None = Field(default=None, gt=0.0)
    meta_hidden: int = Field(default=100, ge=1)
    meta_batch_size: int = Field(default=100, ge=1)
    directions: Literal["chosen", "both"] = "chosen"
    bound_mode: Literal["class", "sample"] = "class"
    bound_range: tuple[float, float] = (0.5, 1.5)
    # The meta-net's Adam weight decay; None: the method's default.
    meta_weight_decay: float | None = Field(default=None, ge=0.0)
    # FRL's class multipliers (CAAT and FRL), by FRL's update rule
    frl_mode: Literal["reweight", "remargin", "both"] = "both"
    tolerance: float = Field(default=0.05, ge=0.0)  # error gap tolerated before a push
    reweight_rate: float = Field(default=0.05, ge=0.0)
    # Epochs between halvings of reweight_rate (both references: 40); null: never.
    reweight_halving: int | None = Field(default=40, ge=1)
    remargin_rate: float = Field(default=0.2, ge=0.0)
    # Cap on the total of the reweight multipliers; <= 1 keeps every class weight >= 0.
    weight_limit: float = Field(default=0.5, gt=0.0, le=1.0)
    # Class bound scales exp(2 lam2) are clipped to [margin_floor, margin_limit]; None: the
    # method's default limit (FRL 3, CAAT 2.5).
    margin_floor: float = Field(default=0.98, gt=0.0, le=1.0)
    margin_limit: float | None = Field(default=None, ge=1.0)
    # Where the class errors are measured on the meta set: `eval_bound`, the evaluation
    # attack (eval.eps, eval.steps, eval.step_size), as both references; or `class_bound`,
    # each class at its own widened bound with the training attack.
    frl_measure: Literal["eval_bound", "class_bound"] = "eval_bound"
    # The attack step at class bounds: `fixed` (step_size, as CAAT) or `max_bound`
    # (step_size * the batch's largest bound scale, FRL's max_i(eps_i)/4); None: the
    # method's default.
    bound_step: Literal["fixed", "max_bound"] | None = None

    @model_validator(mode="after")
    def _range_ordered(self) -> MethodConfig:
        lo, hi = self.bound_range
        if not 0 < lo <= hi:
            raise ValueError("bound_range must be [lo, hi] with 0 < lo <= hi")
        return self


class InitConfig(_Strict):
    erm_epochs: int = Field(default=0, ge=0)
    checkpoint: str | None = None
    # Where ERM warm starts are cached (shared across trials of a scenario and seed).
    cache_dir: str | None = None


class OptimConfig(_Strict):
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=0.05, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    nesterov: bool = True
    schedule: Literal["cosine", "step", "constant"] = "cosine"


class EvalConfig(_Strict):
    eps: float | None = Field(default=None, ge=0.0, le=1.0)  # None: same as training eps
    steps: int = Field(default=20, ge=1)
    step_size: float | None = Field(default=None, gt=0.0)  # None: eps / 4
    every: int = Field(default=1, ge=1)
    batch_size: int = Field(default=256, ge=1)
    # Cap on samples per split for intermediate evaluations (None: the whole split).
    # The final epoch is always evaluated on the whole val and test splits.
    max_samples: int | None = Field(default=1000, ge=1)
    # Which epochs evaluate the test split: `every` evaluated epoch (test curves), only the
    # `final` one, or `none` (a sweep's tuning trials when confirmation runs follow: they
    # are ranked on validation, and the tables read the confirmation runs' test metrics).
    test: Literal["every", "final", "none"] = "every"
    # AutoAttack (Croce & Hein, pyautoattack) once after the last epoch, beside PGD, on a
    # fixed class-stratified subset of the test split (so it needs one: not with test none).
    # `standard`: APGD-CE, APGD-T (9 targets), FAB-T, Square (5000 queries), as published;
    # `fast`: APGD-CE and APGD-T with `autoattack_targets` targets, a few times cheaper.
    autoattack: Literal["none", "fast", "standard"] = "none"
    # Target classes of `fast`'s APGD-T; must be below the class count (checked on load).
    autoattack_targets: int = Field(default=3, ge=1)
    # Test images attacked: the same ones for every trial and seed of a test split.
    autoattack_samples: int = Field(default=1000, ge=1)

    @model_validator(mode="after")
    def _autoattack_needs_test(self) -> EvalConfig:
        if self.autoattack != "none" and self.test == "none":
            raise ValueError(f"eval.autoattack: {self.autoattack} attacks the test split, "
                             "which eval.test: none leaves out; set eval.test to every or "
                             "final, or eval.autoattack to none")
        return self


class RuntimeConfig(_Strict):
    seed: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrialConfig(_Strict):
    dataset: DatasetConfig = DatasetConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    init: InitConfig = InitConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _registered_names(self) -> TrialConfig:
        _check_registered(self)
        return self

    # Derived values: the one place the "None means default" rules live.
    @property
    def train_eps(self) -> float:
        if self.method.eps is not None:
            return self.method.eps
        return DEFAULT_EPS.get(self.dataset.name, 8 / 255)

    @property
    def train_step_size(self) -> float:
        return self.method.step_size if self.method.step_size is not None else self.train_eps / 4

    def _method_default(self, key: str) -> Any:
        value = getattr(self.method, key)
        if value is not None:
            return value
        return METHOD_DEFAULTS.get(self.method.name, {}).get(key, DEFAULT_FALLBACK[key])

    @property
    def meta_interval(self) -> int:
        return self._method_default("meta_interval")

    @property
    def meta_lr(self) -> float:
        return self._method_default("meta_lr")

    @property
    def meta_weight_decay(self) -> float:
        return self._method_default("meta_weight_decay")

    @property
    def margin_limit(self) -> float:
        return self._method_default("margin_limit")

    @property
    def bound_step(self) -> str:
        return self._method_default("bound_step")

    @property
    def eval_eps(self) -> float:
        return self.eval.eps if self.eval.eps is not None else self.train_eps

    @property
    def eval_step_size(self) -> float:
        return self.eval.step_size if self.eval.step_size is not None else self.eval_eps / 4

    def resolved(self) -> dict[str, Any]:
        """Plain dict with the derived defaults filled in (what metrics.json records)."""
        out = self.model_dump(mode="json")
        out["method"]["eps"] = self.train_eps
        out["method"]["step_size"] = self.train_step_size
        out["method"]["meta_interval"] = self.meta_interval
        out["method"]["meta_lr"] = self.meta_lr
        for key in ("meta_weight_decay", "margin_limit", "bound_step"):
            out["method"][key] = getattr(self, key)
        out["eval"]["eps"] = self.eval_eps
        out["eval"]["step_size"] = self.eval_step_size
        return out


def _check_registered(cfg: TrialConfig) -> None:
    # The registries know their names without importing the datasets, models and methods
    # (torch), so checking a config stays cheap.
    for name, registry in ((cfg.dataset.name, DATASETS), (cfg.model.arch, MODELS),
                           (cfg.method.name, METHODS)):
        if name not in registry:  # ValueError: pydantic turns it into the field's error
            raise ValueError(registry.unknown(name))


# ----------------------------------------------------------------------------- loading


def parse_value(text: str) -> Any:
    """A --set value: YAML scalar/list syntax, so `6`, `0.1`, `true`, `[1, 2]`, `null` work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b=v` overrides to a nested dict (copy); malformed ones raise ConfigError."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. method.beta=6")
        set_dotted(out, key.strip(), parse_value(value))
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b': v}; lists and tuples stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def validation_message(err: ValidationError, root: type[BaseModel],
                       where: str = "") -> str:
    """A pydantic error as the one line users see: the first error's dotted location
    (list positions as [i]) and what is allowed there. Shared by trial configs and sweep
    spaces, so both read alike. `where` stands in for an empty location."""
    first = err.errors()[0]
    parts = list(first["loc"])
    loc = _loc_text(parts) or where
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, parts[:-1])
        msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    elif first["type"] == "literal_error":
        msg = msg.replace("Input should be", "allowed:")
    elif first["type"] == "missing":
        msg = "required"
    if not loc or loc in msg.split(":")[0]:  # a validator's message that names its field
        return msg
    return f"{loc}: {msg}"


def _loc_text(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "literal[")):  # pydantic's union tags
            out += ("." if out else "") + str(part)
    return out


def _allowed_keys(root: type[BaseModel], loc: list[Any]) -> list[str]:
    """The keys of the model at `loc` (positions in lists and optionals looked through)."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fld = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if fld is None:
            return []
        ann = fld.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = ann if isinstance(ann, type) else (args[0] if args else None)
        if model is None:
            return []
    return sorted(model.model_fields) if hasattr(model, "model_fields") else []


def load_config(source: Mapping[str, Any] | str | Path | None = None,
                overrides: Iterable[str] = ()) -> TrialConfig:
    """Validated TrialConfig from a dict, a YAML path or nothing, plus dotted overrides."""
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raw = read_yaml(source)
    raw = apply_overrides(raw, overrides)
    return validate(raw)


def validate(raw: Mapping[str, Any]) -> TrialConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(validation_message(err, TrialConfig, "config")) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", err)
        raise ConfigError(f"{path}:{where} malformed YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data
