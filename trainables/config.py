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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from trainables.errors import ConfigError
from trainables.knobs import Knobs
from trainables.metric_names import split_metrics
from trainables.registry import DATASETS, METHODS, MODELS


class _Strict(BaseModel):
    # forbid: a misspelt key must fail, not be silently ignored.
    # validate_assignment: configs edited in code stay valid.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Attack radii used when a config leaves eps unset (the literature's defaults).
DEFAULT_EPS = {"fashion_mnist": 0.1, "cifar10": 8 / 255, "cifar100": 8 / 255, "gmm": 0.1,
               "synthetic": 8 / 255}
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


DEFAULT_METHOD = "trades"


def knobs_model(name: str) -> type[Knobs]:
    """The knob model of a registered method (imports the method's module: built-in, or a
    plugin's); ValueError naming the allowed methods for an unknown name."""
    if name not in METHODS:
        raise ValueError(METHODS.unknown(name))
    return METHODS.get(name).knobs


def knob_error(err: ValidationError, model: type[Knobs]) -> str:
    """A method block's first error as one line: `method.<key>: ...`, naming the method
    and listing its knobs when the key is not one of them."""
    first = err.errors()[0]
    method = model.model_fields["name"].default
    key = _loc_text(list(first["loc"]))
    if first["type"] == "extra_forbidden":
        knobs = model.knob_names()
        listed = f"allowed: {', '.join(knobs)}" if knobs else "it has no knobs"
        return f"method.{key}: unknown key for method {method!r}; {listed}"
    msg = validation_message(err, model)
    return f"method.{msg}" if key else f"method: {msg}"


def method_knobs(value: Any) -> Knobs:
    """Validate a `method` block against the knob model of the method it names."""
    if isinstance(value, Knobs):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise ValueError(f"method: expected a mapping of knobs, got {type(value).__name__}")
    name = value.get("name", DEFAULT_METHOD)
    if not isinstance(name, str):
        raise ValueError(f"method.name: expected a method name, got {name!r}")
    model = knobs_model(name)
    try:
        return model.model_validate({**value, "name": name})
    except ValidationError as err:
        raise ValueError(knob_error(err, model)) from None


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


# A best checkpoint is chosen on a validation scalar: never on the test split.
BestMetric = Literal[split_metrics("val")]  # type: ignore[valid-type]


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
    # Test images attacked: the same ones for every trial and seed of a test split; `all`:
    # the whole test split (RobustBench's protocol), class-wise as always.
    autoattack_samples: int | Literal["all"] = 1000
    # Best and last checkpoints: beside the last epoch's weights, keep those of the best
    # evaluated epoch by `best_metric` (validation only) and report `test_best_*` (one more
    # final evaluation) and `best_epoch`. Robust overfitting makes the two differ.
    keep_best: bool = True
    best_metric: BestMetric = "val_robust_acc"
    # AutoAttack on the best checkpoint too (doubles AutoAttack's cost when it differs).
    autoattack_best: bool = False

    @model_validator(mode="after")
    def _autoattack_needs_test(self) -> EvalConfig:
        if self.autoattack != "none" and self.test == "none":
            raise ValueError(f"eval.autoattack: {self.autoattack} attacks the test split, "
                             "which eval.test: none leaves out; set eval.test to every or "
                             "final, or eval.autoattack to none")
        return self

    @field_validator("autoattack_samples", mode="plain")
    @classmethod
    def _samples(cls, value: Any) -> int | str:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool)
                              and value >= 1):
            return value
        raise ValueError(f"expected a number of test images >= 1, or all; got {value!r}")

    @model_validator(mode="after")
    def _autoattack_best_needs_both(self) -> EvalConfig:
        if self.autoattack_best and (self.autoattack == "none" or not self.keep_best):
            raise ValueError("eval.autoattack_best: attacks the best checkpoint, which needs "
                             "eval.autoattack fast or standard and eval.keep_best true")
        return self


class RuntimeConfig(_Strict):
    seed: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TrialConfig(_Strict):
    dataset: DatasetConfig = DatasetConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    model: ModelConfig = ModelConfig()
    # The chosen method's own knob model (trainables.knobs), picked by `method.name`.
    method: SerializeAsAny[Knobs] = Field(
        default_factory=lambda: knobs_model(DEFAULT_METHOD)())
    init: InitConfig = InitConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @field_validator("method", mode="plain")
    @classmethod
    def _method_knobs(cls, value: Any) -> Knobs:
        return method_knobs(value)

    @model_validator(mode="after")
    def _registered_names(self) -> TrialConfig:
        _check_registered(self)
        return self

    # Derived values: the one place the "None means default" rules live. Methods without
    # an attack (ERM, Meta-Weight-Net) still have a dataset eps: the evaluation's default.
    @property
    def train_eps(self) -> float:
        eps = getattr(self.method, "eps", None)
        return eps if eps is not None else DEFAULT_EPS.get(self.dataset.name, 8 / 255)

    @property
    def train_step_size(self) -> float:
        step = getattr(self.method, "step_size", None)
        return step if step is not None else self.train_eps / 4

    @property
    def eval_eps(self) -> float:
        return self.eval.eps if self.eval.eps is not None else self.train_eps

    @property
    def eval_step_size(self) -> float:
        return self.eval.step_size if self.eval.step_size is not None else self.eval_eps / 4

    def resolved(self) -> dict[str, Any]:
        """Plain dict with the derived defaults filled in (what metrics.json records): the
        chosen method's knobs only."""
        out = self.model_dump(mode="json")
        if "eps" in out["method"]:
            out["method"]["eps"] = self.train_eps
        if "step_size" in out["method"]:
            out["method"]["step_size"] = self.train_step_size
        out["eval"]["eps"] = self.eval_eps
        out["eval"]["step_size"] = self.eval_step_size
        return out


def recorded_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config recorded before methods owned their knobs, as this version reads it: its
    `method` block keeps the chosen method's knobs and drops the others' (that version
    wrote every method's knobs, and let a shared one reach methods without it). A config
    written now passes through unchanged."""
    out = copy.deepcopy(dict(raw))
    block = out.get("method")
    if isinstance(block, Mapping):
        name = block.get("name", DEFAULT_METHOD)
        if isinstance(name, str) and name in METHODS:
            own = knobs_model(name).model_fields
            out["method"] = {k: v for k, v in block.items() if k in own}
    return out


def same_config(stored: Mapping[str, Any] | None, resolved: Mapping[str, Any]) -> bool:
    """Whether a recorded resolved config (a checkpoint's, a metrics.json's) is this one.
    One written before methods owned their knobs holds every method's knobs in `method`:
    it is the same config when the chosen method's knobs and everything else agree."""
    if not isinstance(stored, Mapping):
        return False
    if set(stored) != set(resolved):
        return False
    for section, value in resolved.items():
        if section == "method" and isinstance(stored[section], Mapping):
            if any(stored[section].get(k, object()) != v for k, v in value.items()):
                return False
        elif stored[section] != value:
            return False
    return True


def _check_registered(cfg: TrialConfig) -> None:
    # The registries know their names without importing the datasets, models and methods
    # (torch), so checking a config stays cheap.
    for name, registry in ((cfg.dataset.name, DATASETS), (cfg.model.arch, MODELS)):
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
