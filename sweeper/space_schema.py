"""The schema of a search-space file (pydantic): what each key of `search_spaces/*.yaml` may hold.

`sweeper.spaces` documents the format, validates a file against `SweepSpace` and expands it
into cells; this module is only the schema, so both stay short enough to read.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sweeper.contract import SELECTION_METRICS
from sweeper.pareto import violation
from trainables.config import EvalConfig, validation_message

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Distribution(_Strict):
    """One Optuna distribution."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.log or self.step:
                raise ValueError("categorical takes only `choices`")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low/high (and log, step), not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if not self.low <= self.high:
            raise ValueError(f"needs low <= high, got low={self.low} high={self.high}")
        if self.log and self.step:
            raise ValueError("`log` and `step` cannot be combined (Optuna)")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.type == "int":
            for name in ("low", "high", "step"):
                value = getattr(self, name)
                if value is not None and value != int(value):
                    raise ValueError(f"int needs whole numbers, got {name}={value}")
        return self

    def to_optuna(self):
        from optuna import distributions as od

        if self.type == "categorical":
            return od.CategoricalDistribution(self.choices)
        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log,
                                      step=int(self.step or 1))
        return od.FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def probe_values(self) -> list[Any]:
        """Values the space can produce that are most likely to break a config."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        # The midpoint is rarely a whole number: it catches a float space on an int knob.
        return [self.low, self.high] if self.step else [self.low, mid, self.high]


class ScenarioSpec(_Strict):
    """One scenario; unset fields keep the base config's value."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    noise_type: Literal["none", "uniform", "pair", "flip2"] | None = None
    noise_rate: float | None = None
    imbalance_ratio: float | None = None
    eps: float | None = None  # training bound: method.eps
    bound_range: tuple[float, float] | None = None  # per-sample bound scales: method.bound_range
    bound_mode: Literal["class", "sample"] | None = None
    set: dict[str, Any] = Field(default_factory=dict)  # any other dotted trial-config keys
    # Only these of the sweep's methods (e.g. bound scales that only CAAT reads).
    methods: list[str] | None = None

    def overrides(self) -> dict[str, Any]:
        fields = {"scenario.noise_type": self.noise_type, "scenario.noise_rate": self.noise_rate,
                  "scenario.imbalance_ratio": self.imbalance_ratio, "method.eps": self.eps,
                  "method.bound_range": self.bound_range, "method.bound_mode": self.bound_mode}
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()
               if v is not None}
        out.update(self.set)
        return out


class AshaSpec(_Strict):
    enabled: bool = True
    grace_period: int = Field(default=1, ge=1)  # epochs before a trial can be stopped
    reduction_factor: float = Field(default=3.0, gt=1)
    brackets: int = Field(default=1, ge=1)


SelectionMetric = Literal[SELECTION_METRICS]  # type: ignore[valid-type]
Mode = Literal["max", "min"]


class Bound(_Strict):
    """A constraint on one validation metric: a floor, a ceiling or both."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("needs `min`, `max` or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"needs min <= max, got min={self.min} max={self.max}")
        return self

    def violation(self, value: float) -> float:
        """How far `value` lies outside the bound; <= 0 inside (Optuna's constraint sign)."""
        return violation(value, self.min, self.max)


class SelectionSpec(_Strict):
    """What a cell's tuning optimises: one metric (`metric`, `mode`) or two or three
    (`metrics`, `modes`: a multi-objective study and a Pareto set of configs to confirm)."""

    metric: SelectionMetric | None = None
    mode: Mode | None = None
    metrics: list[SelectionMetric] | None = Field(default=None, min_length=2, max_length=3)
    modes: list[Mode] | None = None
    # The objective ASHA stops trials on (multi-objective); default: the first.
    prune_on: SelectionMetric | None = None
    # Validation metrics a config must keep within bounds, e.g. {val_natural_acc: {min: 0.7}}.
    constraints: dict[SelectionMetric, Bound] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> SelectionSpec:
        if self.metrics is not None:
            if self.metric is not None or self.mode is not None:
                raise ValueError("give either metric/mode or metrics/modes, not both")
            if len(set(self.metrics)) != len(self.metrics):
                raise ValueError(f"metrics: lists a metric twice: {self.metrics}")
            modes = self.modes or ["max"] * len(self.metrics)
            if len(modes) != len(self.metrics):
                raise ValueError(f"modes: needs one per metric ({len(self.metrics)}), got "
                                 f"{len(modes)}")
            self.modes = modes
            if self.prune_on is not None and self.prune_on not in self.metrics:
                raise ValueError(f"prune_on: {self.prune_on} is not one of the metrics "
                                 f"({', '.join(self.metrics)})")
            return self
        if self.modes is not None or self.prune_on is not None:
            raise ValueError("modes and prune_on go with `metrics` (two or three)")
        self.metric = self.metric or "val_robust_acc"
        self.mode = self.mode or "max"
        return self

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) of each objective, in order."""
        if self.metrics is not None:
            return list(zip(self.metrics, self.modes or [], strict=True))
        return [(self.metric, self.mode)]  # type: ignore[list-item]

    @property
    def multi(self) -> bool:
        return self.metrics is not None

    @property
    def primary(self) -> tuple[str, str]:
        """(metric, mode) ASHA stops on, and that ranks configs where one must be picked."""
        metric = self.prune_on or self.objectives[0][0]
        return metric, dict(self.objectives)[metric]

    def violations(self, values: dict[str, float]) -> list[float]:
        """Each constraint's violation (<= 0: satisfied); a missing value violates."""
        return [bound.violation(values[m]) if m in values else math.inf
                for m, bound in self.constraints.items()]


class _EvalSection(_Strict):
    """Checks `confirm.eval` alone: its keys and values are `eval.*` keys and values."""

    eval: EvalConfig


class ConfirmSpec(_Strict):
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    # false: tuning trials evaluate no test split (`eval.test: none`). Selection reads
    # validation only and the tables read the confirmation runs, so nobody reads those test
    # numbers; skipping them saves a final PGD evaluation per completed tuning trial.
    tune_test: bool = True
    # `eval.*` overrides for confirmation trials only, e.g. {autoattack: fast}: AutoAttack
    # costs several PGD evaluations, and only the confirmation runs reach the tables; tuning
    # trials select on PGD (validation split) and never run it.
    eval: dict[str, Any] = Field(default_factory=dict)
    # How many configs per cell are confirmed: the best one (single objective), or up to
    # this many of the Pareto set, spread along the front (default 3 with `metrics`).
    top_k: int | None = Field(default=None, ge=1)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"needs distinct seeds >= 0, got {seeds}")
        return seeds

    @field_validator("eval")
    @classmethod
    def _eval_keys(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        try:
            _EvalSection.model_validate({"eval": overrides})
        except ValidationError as err:
            raise ValueError("confirm." + validation_message(err, _EvalSection)) from None
        if overrides.get("test") == "none":
            raise ValueError("confirm.eval.test: none would leave the confirmation runs, which "
                             "the tables read, without test metrics; allowed: every, final")
        return overrides

    @model_validator(mode="after")
    def _some_run_tests(self) -> ConfirmSpec:
        if not self.tune_test and not self.seeds:
            raise ValueError("tune_test: false needs confirmation seeds, else no run "
                             "evaluates the test split")
        if self.eval and not self.seeds:
            raise ValueError("confirm.eval: applies to confirmation trials only, and "
                             "confirm.seeds is empty")
        return self

    def overrides(self) -> dict[str, Any]:
        """The dotted trial-config keys a confirmation trial sets: {"eval.autoattack": ...}."""
        return {f"eval.{key}": value for key, value in self.eval.items()}


class ResourcesSpec(_Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)
    # A sweep whose trials have all waited this long for resources, with none running, stops
    # (resumably) and says why; null: wait forever (a cluster that scales up slowly).
    pending_timeout_s: float | None = Field(default=600.0, gt=0)

    def per_trial(self) -> dict[str, float]:
        """What one trial asks of Ray: {"cpu": ..., "gpu": ...}."""
        return {"cpu": self.cpu, "gpu": self.gpu}

    @field_validator("gpu")
    @classmethod
    def _gpu_share(cls, gpu: float) -> float:
        # Ray accepts fractions of one GPU, or whole GPUs.
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"needs a fraction of one GPU or a whole number, got {gpu}")
        return gpu


class OptunaSpec(_Strict):
    seed: int = Field(default=0, ge=0)
    n_startup_trials: int = Field(default=10, ge=0)  # random trials before TPE models
    # tpe: (multi-objective) TPE; nsga2: NSGA-II (multi-objective only); random: the
    # baseline of benchmarks/search_efficiency.py.
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    population_size: int = Field(default=10, ge=2)  # NSGA-II's generation size


class SweepSpace(_Strict):
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    scenarios: list[ScenarioSpec] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    search: dict[str, dict[str, Any]] = Field(default_factory=dict)
    trials_per_cell: int = Field(default=3, ge=1)
    asha: AshaSpec = AshaSpec()
    selection: SelectionSpec = SelectionSpec()
    confirm: ConfirmSpec = ConfirmSpec()
    resources: ResourcesSpec = ResourcesSpec()
    max_concurrent: int | None = Field(default=None, ge=1)
    max_failures: int = Field(default=2, ge=0)
    # Ray deletes older checkpoints as new ones arrive and uploads its experiment state only
    # every few checkpoints: a driver killed between the two leaves that state naming a
    # deleted checkpoint. Resume then falls back to the trial's intact checkpoint with the
    # most epochs (sweeper/restore.py); keeping two means one usually survives.
    keep_checkpoints: int | None = Field(default=2, ge=1)
    optuna: OptunaSpec = OptunaSpec()
    # More trials than this is refused at launch (`--force` lets it through): a typo such as
    # trials_per_cell: 1000000000 would start a sweep whose confirmation never comes.
    max_trials: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _search_fits_selection(self) -> SweepSpace:
        sel = self.selection
        if self.optuna.sampler == "nsga2" and not sel.multi:
            raise ValueError("optuna.sampler: nsga2 is for two or three objectives "
                             "(selection.metrics); allowed with one metric: tpe, random")
        if not sel.multi and (self.confirm.top_k or 1) > 1:
            raise ValueError("confirm.top_k: one metric confirms one config per cell; "
                             "top_k > 1 needs selection.metrics")
        return self

    @property
    def top_k(self) -> int:
        return self.confirm.top_k or (3 if self.selection.multi else 1)

    @field_validator("methods")
    @classmethod
    def _distinct(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) != len(methods):
            raise ValueError(f"lists a method twice: {methods}")
        return methods
