"""Search-space files: `search_spaces/*.yaml` -> validated cells and per-method Optuna spaces.

A space file names a base trial config, a list of scenarios (label noise, imbalance, bound
settings), the methods, and per-method Optuna spaces. A *cell* is one (scenario, method)
pair; each cell gets its own Optuna study, its own ASHA brackets and its own confirmation
runs (see `sweeper.search`). The format, with every key and its default::

    name: quick                  # default sweep name ([A-Za-z0-9._-]+); else the file stem
    description: ...             # free text
    base:                        # a trial config (trainables/config.py keys); all optional
      dataset: {name: fashion_mnist, train_size: 2000}
      optim: {epochs: 4}
    scenarios:                   # at least one; unset fields keep the base config's value
      - {noise_type: pair, noise_rate: 0.2}          # name: pair-0.2_ir-1_eps-0.1
      - {imbalance_ratio: 10}                        # name: clean_ir-10_eps-0.1
      - {name: wide, eps: 0.2, bound_range: [0.5, 2], set: {eval.eps: 0.1},
         methods: [caat]}                            # only some of the methods
    methods: [erm, pgd_at, trades]                   # registered method names
    search:                      # per method ("all": every method), dotted config keys
      all:
        optim.lr: {type: float, low: 0.01, high: 0.1, log: true}
      trades:
        method.beta: {type: float, low: 1.0, high: 8.0}
        method.steps: 5                              # a plain value: fixed for this method
    trials_per_cell: 3           # tuning trials per cell (1 when a cell has nothing to tune)
    asha: {enabled: true, grace_period: 1, reduction_factor: 3, brackets: 1}
    selection: {metric: val_robust_acc, mode: max}   # one val_* metric, or two or three:
    # selection:
    #   metrics: [val_natural_acc, val_robust_acc]    # a multi-objective study per cell
    #   modes: [max, max]                             # default: max each
    #   prune_on: val_robust_acc                      # what ASHA stops on (default: first)
    #   constraints: {val_natural_acc: {min: 0.7}}    # min and/or max per val_* metric;
    #                                                 # also with a single metric
    confirm:                     # each cell's best config (or, with several objectives, up
      seeds: [1, 2, 3]           # to top_k of its Pareto set) re-run with these seeds
      top_k: null                # configs per cell: 1 for one metric, default 3 for several
      tune_test: true            # false: tuning trials skip the test split
      eval: {}                   # eval.* keys for confirmation trials only, e.g.
                                 # {autoattack: fast, autoattack_samples: 300}: AutoAttack
                                 # (none | fast | standard) on a test subset after the last
                                 # epoch; tuning trials select on PGD and never run it
    resources: {cpu: 1, gpu: 0, pending_timeout_s: 600}  # per trial; fractional GPUs allowed;
                                 # a local Ray that cannot fit one refuses the launch
    max_concurrent: null         # cap on concurrent trials (null: as resources allow)
    max_failures: 2              # retries of a failing trial, each from its last checkpoint
    keep_checkpoints: 2          # per trial, the newest (null: all; see below)
    optuna: {seed: 0, n_startup_trials: 10, sampler: tpe, population_size: 10}
                                 # sampler: tpe (multi-objective TPE with several metrics),
                                 # nsga2 (several metrics only), random; population_size:
                                 # NSGA-II's. Studies: STORAGE/NAME/optuna.db (SQLite) or
                                 # `launch --optuna-storage URL`, one per cell, named by it
    max_trials: 10000            # refused at launch above this (`launch --force` overrides)

Distributions: ``{type: float, low, high, log?, step?}``, ``{type: int, low, high, log?,
step?}``, ``{type: categorical, choices: [...]}``. A method's search keys must be its own
knobs (`caat-sweep methods` lists them) or `optim.*` (not `method.name`, not `optim.epochs`):
scenarios, data, model and warm start are what defines a cell, and the budget is ASHA's.
A knob under `search.all`, in `base.method` or in a scenario applies to the methods that
have it (a shared `steps: 5` is not ERM's) and is refused only if none of them has it.
Everything is validated before a sweep starts: each cell's config, its confirmation config
(with `confirm.eval`), and each cell's config at every extreme of its space (bounds,
midpoints, every choice), must be a valid `TrialConfig`, so a bad sweep fails at launch
with one line (exit 2) instead of hours later in a trial. A configuration breaking
`selection.constraints` is never confirmed; a cell with no configuration within them gets
no confirmation runs (a warning says so).
AutoAttack belongs in `confirm.eval` only: `eval.autoattack` in `base` or a scenario (which
tuning trials would run) is refused.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sweeper.space_schema import NAME_PATTERN, Distribution, ScenarioSpec, SweepSpace
from trainables.config import (
    EvalConfig,
    OptimConfig,
    TrialConfig,
    flatten,
    knobs_model,
    read_yaml,
    set_dotted,
    validate,
    validation_message,
)
from trainables.errors import ConfigError
from trainables.registry import unknown_name

ALL_METHODS = "all"
# Keys a space may search or fix per method: the method's own knobs and the optimiser's.
OPTIM_KEYS = tuple(f"optim.{k}" for k in OptimConfig.model_fields if k != "epochs")
NOT_SEARCHABLE = ("method.name", "optim.epochs")


# ------------------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Cell:
    """One (scenario, method) pair: its fixed trial config and its Optuna space."""

    scenario: str
    method: str
    config: dict[str, Any]  # nested trial config without the sampled keys
    space: dict[str, Distribution]  # dotted key -> distribution

    @property
    def id(self) -> str:
        return f"{self.scenario}/{self.method}"

    @property
    def epochs(self) -> int:
        return validate(self.config).optim.epochs

    def optuna_space(self) -> dict[str, Any]:
        return {k: d.to_optuna() for k, d in self.space.items()}


@dataclass
class SweepPlan:
    """A validated space expanded into cells; everything a sweep needs to run."""

    name: str
    space: SweepSpace
    cells: list[Cell]
    text: str  # the space file as given (kept with the sweep, logged to MLflow)
    source: str = ""

    def n_tune(self, cell: Cell) -> int:
        """Tuning trials of a cell: one when there is nothing to search."""
        return self.space.trials_per_cell if cell.space else 1

    def n_trials(self) -> int:
        """Every trial the sweep runs, at most: tuning, then one per confirmation seed and
        confirmed config (up to `confirm.top_k` of a cell's Pareto set), per cell."""
        confirm = len(self.space.confirm.seeds) * self.space.top_k
        return sum(self.n_tune(c) + (confirm if c.space else len(self.space.confirm.seeds))
                   for c in self.cells)

    def trial_config(self, cell: Cell, params: Mapping[str, Any], seed: int | None,
                     tuning: bool = False) -> dict:
        """The nested trial config of one trial: the cell's, sampled values, the seed, the
        best checkpoint's metric (the selection's primary one, by default); a tuning trial
        skips the test split when the space says so (`confirm.tune_test`), a confirmation
        trial takes `confirm.eval` (AutoAttack)."""
        cfg = copy.deepcopy(cell.config)
        for key, value in params.items():
            set_dotted(cfg, key, value)
        if seed is not None:
            set_dotted(cfg, "runtime.seed", seed)
        primary = self.space.selection.primary[0]
        if "best_metric" not in cfg.get("eval", {}) and primary != EvalConfig().best_metric:
            # A trial's best checkpoint is chosen on what the sweep selects on (its primary
            # objective), unless the space names another validation metric; set only when
            # it differs from the default, so that older sweeps resume with their configs.
            set_dotted(cfg, "eval.best_metric", primary)
        if tuning and not self.space.confirm.tune_test:
            set_dotted(cfg, "eval.test", "none")
        if not tuning:
            _confirm_overrides(cfg, self.space)
        return cfg


def _confirm_overrides(cfg: dict[str, Any], space: SweepSpace) -> dict[str, Any]:
    for key, value in space.confirm.overrides().items():
        set_dotted(cfg, key, value)
    return cfg


# ---------------------------------------------------------------------------- loading


def load_space(path: str | Path, name: str | None = None) -> SweepPlan:
    """Parse, validate and expand a space file; any problem raises ConfigError (one line)."""
    path = Path(path)
    raw = read_yaml(path)
    return parse_space(raw, text=path.read_text(), source=str(path),
                       name=name or raw.get("name") or path.stem)


def parse_space(raw: Mapping[str, Any], *, text: str | None = None, source: str = "space",
                name: str | None = None) -> SweepPlan:
    try:
        space = SweepSpace.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(f"{source}: {validation_message(err, SweepSpace)}") from None
    name = name or space.name or "sweep"
    if not re.match(NAME_PATTERN, name):
        raise ConfigError(f"{source}: name: {name!r} must match {NAME_PATTERN}")
    if text is None:
        text = yaml.safe_dump(dict(raw), sort_keys=False)
    cells = expand(space, source)
    return SweepPlan(name=name, space=space, cells=cells, text=text, source=source)


def method_keys(method: str) -> list[str]:
    """The dotted `method.*` keys a method has (its knob model's fields, name aside)."""
    return [f"method.{k}" for k in knobs_model(method).knob_names()]


def expand(space: SweepSpace, source: str = "space") -> list[Cell]:
    """The cells of a space, in scenario-major order, each validated with its space."""
    _check_methods(space, source)
    keys = {m: set(method_keys(m)) for m in space.methods}
    base = _checked(space.base, f"{source}: base", shared=True)
    _check_method_block(base, space.methods, keys, f"{source}: base")
    for block, entries in space.search.items():  # in the file's order: its first bad line
        for key in entries:
            _check_search_key(key, space.methods if block == ALL_METHODS else [block], keys,
                              f"{source}: search.{block}.{key}")
    per_method = {m: _method_entries(space, m, keys, source) for m in space.methods}
    scenarios = space.scenarios
    scenario_cfgs = [_scenario_config(base, sc, i, source, space.methods, keys)
                     for i, sc in enumerate(scenarios)]
    names = [_scenario_name(sc, cfg) for sc, cfg in zip(scenarios, scenario_cfgs, strict=True)]
    _check_unique(names, source)
    cells = []
    for sc, scenario, cfg in zip(scenarios, names, scenario_cfgs, strict=True):
        for method in sc.methods or space.methods:
            fixed, dists = per_method[method]
            cell_cfg = for_method(cfg, method, keys[method])
            for key, value in fixed.items():
                set_dotted(cell_cfg, key, value)
            if cell_cfg.get("runtime", {}).get("threads") is None:
                # torch threads = the trial's CPUs (Ray reserves them; more would contend).
                set_dotted(cell_cfg, "runtime.threads", max(1, int(space.resources.cpu)))
            cell = Cell(scenario=scenario, method=method, config=cell_cfg, space=dists)
            _check_tuning_eval(_checked(cell_cfg, f"{source}: cell {cell.id}"),
                               f"{source}: cell {cell.id}")
            _check_confirm(cell, space, source)
            _probe(cell, source)
            cells.append(cell)
    return cells


def _check_tuning_eval(cfg: Mapping[str, Any], where: str) -> None:
    """AutoAttack in a tuning trial would cost several PGD evaluations that nobody reads:
    selection ranks on PGD (validation split), the tables read the confirmation runs."""
    mode = validate(cfg).eval.autoattack
    if mode != "none":
        raise ConfigError(f"{where}: eval.autoattack: {mode} would run in tuning trials too; "
                          "ask for AutoAttack in confirmation trials only, under "
                          f"confirm.eval (confirm: {{eval: {{autoattack: {mode}}}}})")


def _check_confirm(cell: Cell, space: SweepSpace, source: str) -> None:
    """A confirmation trial's config, with `confirm.eval`, must be valid too."""
    if not space.confirm.eval:
        return
    try:
        validate(_confirm_overrides(copy.deepcopy(cell.config), space))
    except ConfigError as err:
        text = str(err)
        # Name the space's key (`confirm.eval.autoattack`) when the config names its own.
        name = f"confirm.{text}" if text.startswith("eval.") else f"confirm.eval: {text}"
        raise ConfigError(f"{source}: cell {cell.id}: {name}") from None


def _check_methods(space: SweepSpace, source: str) -> None:
    from trainables import methods

    for i, method in enumerate(space.methods):
        if method not in methods.METHODS:
            raise ConfigError(f"{source}: "
                              + unknown_name(f"methods[{i}]", method, sorted(methods.METHODS)))
    for i, sc in enumerate(space.scenarios):
        for method in sc.methods or ():
            if method not in space.methods:
                raise ConfigError(f"{source}: scenarios[{i}].methods: {method!r} is not in "
                                  f"`methods`; allowed: {', '.join(space.methods)}")
    allowed = [ALL_METHODS, *space.methods]
    for key in space.search:
        if key not in allowed:
            raise ConfigError(f"{source}: search.{key}: not a method of this sweep; allowed: "
                              f"{', '.join(allowed)}")


def for_method(cfg: Mapping[str, Any], method: str, keys: set[str]) -> dict[str, Any]:
    """A base or scenario config as one method's cell sees it: its `method` block holds the
    method's name and those of the block's knobs the method has (a shared `steps: 5` is
    the attack's, and ERM has no attack)."""
    out = copy.deepcopy(dict(cfg))
    block = out.pop("method", None) or {}
    out["method"] = {"name": method, **{k: v for k, v in block.items()
                                        if f"method.{k}" in keys}}
    return out


def _check_method_block(cfg: Mapping[str, Any], methods: list[str],
                        keys: Mapping[str, set[str]], where: str) -> None:
    """Every knob of a base or scenario `method` block belongs to one of ``methods``."""
    block = cfg.get("method") or {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where}: method: expected a mapping of knobs")
    for knob in block:
        if knob == "name":
            raise ConfigError(f"{where}: method.name: set per cell by `methods`; remove it")
        if not any(f"method.{knob}" in keys[m] for m in methods):
            known = sorted({k for m in methods for k in keys[m]})
            listed = f"allowed: {', '.join(known)}" if known else "they have no knobs"
            raise ConfigError(f"{where}: method.{knob}: not a knob of any method of this "
                              f"sweep ({', '.join(methods)}); {listed}")


def _method_entries(space: SweepSpace, method: str, keys: Mapping[str, set[str]],
                    source: str) -> tuple[dict[str, Any], dict[str, Distribution]]:
    """(fixed values, distributions) for one method: `all` first, the method's own win.
    A key under `all` applies to the methods that have it (refused if none has)."""
    fixed: dict[str, Any] = {}
    dists: dict[str, Distribution] = {}
    for block in (ALL_METHODS, method):
        for key, value in space.search.get(block, {}).items():
            where = f"{source}: search.{block}.{key}"
            if block == ALL_METHODS:
                _check_search_key(key, space.methods, keys, where)
                if not (key in keys[method] or key in OPTIM_KEYS):
                    continue
            else:
                _check_search_key(key, [method], keys, where)
            fixed.pop(key, None)
            dists.pop(key, None)
            if isinstance(value, Mapping) and "type" in value:
                try:
                    dists[key] = Distribution.model_validate(dict(value))
                except ValidationError as err:
                    raise ConfigError(f"{where}: {validation_message(err, Distribution)}") from None
            elif isinstance(value, Mapping):
                raise ConfigError(f"{where}: a distribution needs `type` (float, int, "
                                  "categorical); a fixed value must not be a mapping")
            else:
                fixed[key] = value
    return fixed, dists


def _check_search_key(key: str, methods: list[str], keys: Mapping[str, set[str]],
                      where: str) -> None:
    """A searched or fixed key must be a knob of one of ``methods`` (the block's method, or
    any method of the sweep under `all`), or an optimiser key."""
    if key in OPTIM_KEYS or any(key in keys[m] for m in methods):
        return
    allowed = sorted({k for m in methods for k in keys[m]}) + list(OPTIM_KEYS)
    if key in NOT_SEARCHABLE:
        why = "set per cell (method by `methods`, epochs by base/ASHA)"
    elif key.startswith("method."):
        owner = f"method {methods[0]!r}" if len(methods) == 1 else (
            f"any method of this sweep ({', '.join(methods)})")
        why = f"not a knob of {owner}"
    else:
        why = "unknown or not searchable (scenario, data, model and init define a cell)"
    raise ConfigError(f"{where}: {why}; allowed: {', '.join(allowed)}")


def _scenario_config(base: dict[str, Any], sc: ScenarioSpec, i: int, source: str,
                     methods: list[str], keys: Mapping[str, set[str]]) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in sc.overrides().items():
        try:
            set_dotted(cfg, key, value)
        except ConfigError as err:
            raise ConfigError(f"{source}: scenarios[{i}].set.{key}: {err}") from None
    where = f"{source}: scenarios[{i}]"
    _checked(cfg, where, shared=True)
    _check_method_block(cfg, sc.methods or methods, keys, where)
    return cfg


def _scenario_name(sc: ScenarioSpec, cfg: dict[str, Any]) -> str:
    """A readable, stable id: `pair-0.4_ir-1_eps-0.1` (plus `br-...` for bound scales)."""
    if sc.name:
        return sc.name
    tc = validate(_without_method(cfg))
    s = tc.scenario
    eps = (cfg.get("method") or {}).get("eps")
    parts = ["clean" if s.noise_type == "none" else f"{s.noise_type}-{_num(s.noise_rate)}",
             f"ir-{_num(s.imbalance_ratio)}",
             f"eps-{_num(tc.train_eps if eps is None else eps)}"]
    if sc.bound_range is not None:
        parts.append(f"br-{_num(sc.bound_range[0])}-{_num(sc.bound_range[1])}")
    if sc.bound_mode is not None:
        parts.append(f"bm-{sc.bound_mode}")
    return "_".join(parts)


def _num(x: float) -> str:
    return f"{x:.4g}"


def _check_unique(names: list[str], source: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(f"{source}: scenarios[{i}]: same name {name!r} as scenarios"
                              f"[{seen[name]}]; give one of them a distinct `name`")
        seen[name] = i


def _probe(cell: Cell, source: str) -> None:
    """Each value a space can reach at its edges must give a valid config."""
    probes: list[dict[str, Any]] = []
    for key, dist in cell.space.items():
        probes.extend({key: v} for v in dist.probe_values())
    if len(cell.space) > 1:  # all knobs at once at their low, then their high, ends
        for pick in (0, -1):
            probes.append({k: d.probe_values()[pick] for k, d in cell.space.items()})
    for params in probes:
        cfg = copy.deepcopy(cell.config)
        for key, value in params.items():
            set_dotted(cfg, key, value)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        _checked(cfg, f"{source}: cell {cell.id} with {shown}")


def _without_method(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k != "method"}


def _checked(cfg: Mapping[str, Any], where: str, *, shared: bool = False) -> dict[str, Any]:
    """A trial config that validates. ``shared``: a base or scenario config, whose `method`
    block several methods share, validated without that block (each cell checks its part)."""
    try:
        validate(_without_method(cfg) if shared else cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return dict(cfg)


def resolved_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened resolved trial config: what MLflow logs as a trial's params."""
    return flatten(TrialConfig.model_validate(cfg).resolved())
