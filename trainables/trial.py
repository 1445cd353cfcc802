"""One trial: data -> scenario -> model -> epochs of a method -> metrics and checkpoints.

`run_trial(config, reporter)` is the single code path for `caat-sweep train` (a plain
reporter writing to a directory) and for Ray Tune (a thin adapter; both reporters and the
checkpoint format live in `trainables.checkpoints`). Each epoch reports metrics together
with a checkpoint holding everything needed to continue bit-for-bit: model, optimiser,
method state, RNG state, epoch, metric history and the best epoch's weights
(`trainables.best`). Batch order and augmentation are drawn from
generators seeded by (seed, epoch), so a resumed trial sees the same batches. The tensors
a trial trains on come from `trainables.problem`; `prepare` is the set-up before a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables import data as data_mod
from trainables import methods, models
from trainables.autoattack import evaluate_autoattack
from trainables.best import BestCheckpoint, best_report

# Callers import DirectoryReporter, RayReporter, load_state and CHECKPOINT_FILE from here:
# a trial's entry points stay in this module.
from trainables.checkpoints import (  # noqa: F401
    CHECKPOINT_FILE,
    DirectoryReporter,
    RayReporter,
    Reporter,
    load_state,
    restore_state,
    rng_state,
    save_state,
)
from trainables.config import TrialConfig, validate
from trainables.diagnostics import EpochSamples, direction_diagnostics
from trainables.errors import ConfigError
from trainables.metric_names import CLASSWISE_DIAGNOSTICS
from trainables.metrics import evaluate
from trainables.problem import Problem, build_problem, resolve_device


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and batch."""


# ----------------------------------------------------------------------------- set-up


def prepare(cfg: TrialConfig, splits: data_mod.DatasetSplits | None = None
            ) -> tuple[torch.device, Problem]:
    """A trial's set-up before any model exists: torch's threads, the device, the global
    seed, and the scenario's tensors on the device (``splits``: a dataset loaded once by
    a sweep; else loaded here)."""
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(cfg.runtime.seed)
    return device, build_problem(cfg, device, splits)


def build_model(cfg: TrialConfig, problem: Problem, device: torch.device,
                warm_starts: Mapping[str, Mapping[str, torch.Tensor]] | None = None, *,
                initialise: bool = True) -> nn.Module:
    """The trial's model: fresh, from `init.checkpoint`, or from an ERM warm start
    (``initialise=False`` skips the latter two, for a model about to be restored)."""
    s = problem.splits
    model = models.build(cfg.model.arch, s.num_classes, s.input_shape[0],
                         input_shape=s.input_shape, mean=s.mean, std=s.std)
    model = model.to(device, memory_format=torch.channels_last)
    if not initialise:
        return model
    if cfg.init.checkpoint:
        model.load_state_dict(load_init_weights(cfg.init.checkpoint, model))
    elif cfg.init.erm_epochs > 0:
        key = warm_start_key(cfg)
        state = (warm_starts or {}).get(key)
        if state is None:
            state = cached_warm_start(cfg, problem, device)
        model.load_state_dict(state)
    return model


# ------------------------------------------------------------------------ warm starts


def warm_start_key(cfg: TrialConfig) -> str:
    """Identifies an ERM warm start: everything that determines its weights, nothing else.

    Trials of one scenario and seed that differ only in the method or its knobs share it.
    """
    d = cfg.model_dump(mode="json")
    keep = {"dataset": d["dataset"], "scenario": d["scenario"], "model": d["model"],
            "seed": d["runtime"]["seed"], "erm_epochs": d["init"]["erm_epochs"],
            "optim": {k: d["optim"][k] for k in ("batch_size", "lr", "momentum",
                                                  "weight_decay", "nesterov")}}
    blob = json.dumps(keep, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def train_warm_start(cfg: TrialConfig, problem: Problem,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """ERM for `init.erm_epochs` epochs (cosine schedule), as the CAAT protocol starts from
    a naturally trained model. The global RNG is left as it was, so a trial that trains its
    warm start and one that finds it cached go on identically."""
    erm = cfg.model_copy(deep=True)
    erm.init.erm_epochs, erm.init.checkpoint = 0, None
    erm.method = {"name": "erm"}
    erm.optim.epochs, erm.optim.schedule = cfg.init.erm_epochs, "cosine"
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.runtime.seed + 1_000_003)
        model = build_model(erm, problem, device)
        optimizer = make_optimizer(erm, model)
        method = methods.build("erm", model, erm, method_data(problem, device, optimizer))
        n_batches = max(1, len(problem.train_y) // erm.optim.batch_size)
        for epoch in range(erm.optim.epochs):
            train_epoch(erm, model, optimizer, method, problem, epoch, n_batches, device, None)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def cached_warm_start(cfg: TrialConfig, problem: Problem,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """The warm start from `init.cache_dir` (trained and stored there when missing)."""
    if not cfg.init.cache_dir:
        return train_warm_start(cfg, problem, device)
    path = Path(cfg.init.cache_dir) / f"erm-{warm_start_key(cfg)}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    state = train_warm_start(cfg, problem, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique temp name then rename: concurrent trials may race to write the same entry.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return state


def make_optimizer(cfg: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay,
                           nesterov=cfg.optim.nesterov and cfg.optim.momentum > 0)


def load_init_weights(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of a caat-sweeper checkpoint, checked against the model's spec."""
    if not Path(path).is_file():
        raise ConfigError(f"init.checkpoint: no such file {path}")
    init = models.load_checkpoint(path)
    if init.spec != model.spec:
        raise ConfigError(f"init.checkpoint: {path} holds a {init.spec['arch']} for "
                         f"{init.spec['num_classes']} classes; this trial builds "
                         f"{model.spec['arch']} for {model.spec['num_classes']}")
    return init.state_dict()


def method_data(problem: Problem, device: torch.device,
                optimizer: torch.optim.Optimizer | None = None) -> methods.MethodData:
    counts = torch.bincount(problem.train_y, minlength=problem.num_classes)
    return methods.MethodData(num_classes=problem.num_classes, train_labels=problem.train_y,
                              class_counts=counts, meta_x=problem.meta_x,
                              meta_y=problem.meta_y, device=device, optimizer=optimizer,
                              train_x=problem.train_x, val_x=problem.val_x,
                              val_y=problem.val_y)


# ---------------------------------------------------------------------------- schedule


def lr_at(schedule: str, base_lr: float, progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1) of training (pure; per-iteration)."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":  # /10 at 50% and again at 75%, the usual adversarial-training steps
        return base_lr * (0.1 ** ((progress >= 0.5) + (progress >= 0.75)))
    return base_lr


# Independent random streams of a trial, so that e.g. evaluation never shifts batch order.
STREAM_ORDER, STREAM_AUGMENT, STREAM_EVAL_SUBSET, STREAM_EVAL_ATTACK = 0, 1, 2, 3
STREAM_AUTOATTACK_PGD = 4  # PGD on AutoAttack's images, for the gap between the two


def epoch_generator(seed: int, epoch: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator fixed by (seed, epoch, stream), so resumed epochs replay exactly."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, stream]).generate_state(1)[0]))
    return g


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    # The last partial batch is dropped: a batch of 1 breaks BatchNorm in train mode.
    perm = torch.randperm(n, generator=generator, device=generator.device)
    stop = n - n % batch_size if n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield perm[start:start + batch_size]


# ---------------------------------------------------------------------------- the loop


@dataclass
class TrialResult:
    metrics: dict[str, Any]  # the last epoch's report (scalars and class-wise lists)
    history: list[dict[str, Any]]
    model: nn.Module  # the last epoch's
    problem: Problem
    config: TrialConfig
    best: BestCheckpoint | None = None  # the best epoch's weights (`eval.keep_best`)


def run_trial(config: TrialConfig | Mapping[str, Any], reporter: Reporter, *,
              splits: data_mod.DatasetSplits | None = None,
              warm_starts: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
              progress: Callable[[Iterator], Iterator] | None = None) -> TrialResult:
    """Train one trial, reporting metrics and a checkpoint after every epoch.

    ``splits`` lets a sweep hand over a dataset loaded once; ``warm_starts`` maps
    `warm_start_key(cfg)` to ERM warm-start weights trained once per scenario and seed;
    ``progress`` wraps the batch iterator (e.g. a tqdm factory) for interactive runs.
    """
    cfg = config if isinstance(config, TrialConfig) else validate(config)
    device, problem = prepare(cfg, splits)
    resume_dir = reporter.latest_checkpoint()
    # A resumed trial gets its weights from the checkpoint: no warm start needed.
    model = build_model(cfg, problem, device, warm_starts, initialise=resume_dir is None)
    optimizer = make_optimizer(cfg, model)
    method = methods.build(cfg.method.name, model, cfg, method_data(problem, device, optimizer))

    start_epoch, history, final = 0, [], None
    # Class-wise training diagnostics of every epoch (one list per epoch), for plots of
    # how a method's per-class choices evolve; the last epoch's lists are reported as such.
    by_epoch: dict[str, list[list[float]]] = {}
    best = BestCheckpoint(cfg.eval.best_metric) if cfg.eval.keep_best else None
    if resume_dir is not None:
        state = restore_state(resume_dir, model, optimizer, method)
        start_epoch, history = state["epoch"], list(state["history"])
        by_epoch = {k: list(v) for k, v in state.get("by_epoch", {}).items()}
        final = state.get("final_metrics")
        if best is not None and state.get("best") is not None:
            best.load_state_dict(state["best"])

    n_batches = max(1, len(problem.train_y) // cfg.optim.batch_size)
    # Resumed after the last epoch: its full report (class-wise lists and AutoAttack's
    # results included) is in the checkpoint, so nothing is lost and nothing re-run.
    metrics: dict[str, Any] = final or (history[-1] if history else {})
    for epoch in range(start_epoch, cfg.optim.epochs):
        train_stats = train_epoch(cfg, model, optimizer, method, problem, epoch, n_batches,
                                  device, progress)
        extra = method.epoch_end(epoch)
        metrics = {"epoch": epoch + 1, **train_stats, **extra}
        # Every class-wise list a method reports (CAAT's directions, a method's class
        # weights or bounds) keeps its history, for plots of how its choices evolve.
        for key in dict.fromkeys([*CLASSWISE_DIAGNOSTICS, *extra]):
            if isinstance(metrics.get(key), list):
                by_epoch.setdefault(key, []).append(metrics[key])
        metrics.update({f"{k}_by_epoch": v for k, v in by_epoch.items()})
        last = epoch + 1 == cfg.optim.epochs
        if last or (epoch + 1) % cfg.eval.every == 0:
            metrics.update(evaluate_splits(cfg, model, problem, epoch, full=last))
            if best is not None:
                best.offer(selection_value(cfg, model, problem, epoch, metrics, last),
                           epoch + 1, model)
        if last:  # AutoAttack is costly: once, on the final model, before its checkpoint
            aa = autoattack_at(cfg, model, problem, epoch)
            metrics.update(aa)
            if best is not None:
                last_test = {k: v for k, v in metrics.items() if k.startswith("test_")
                             and (cfg.eval.autoattack_best or k not in aa)}
                metrics.update(best_report(
                    best, epoch + 1, last_test, lambda m, e: final_test(cfg, m, problem, e),
                    model))
        history.append({k: v for k, v in metrics.items() if not isinstance(v, list)})
        with tempfile.TemporaryDirectory(prefix="caat-ckpt-") as tmp:
            save_state(Path(tmp), model=model.state_dict(), optimizer=optimizer.state_dict(),
                       method=method.state_dict(), rng=rng_state(), epoch=epoch + 1,
                       history=history, by_epoch=by_epoch, config=cfg.resolved(),
                       best=best.state_dict() if best is not None else None,
                       spec=model.spec, final_metrics=metrics if last else None)
            reporter.report(metrics, Path(tmp))
    model.eval()
    return TrialResult(metrics=metrics, history=history, model=model, problem=problem,
                       config=cfg, best=best)


def train_epoch(cfg: TrialConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                method: methods.Method, problem: Problem, epoch: int, n_batches: int,
                device: torch.device, progress: Callable | None) -> dict[str, float]:
    model.train()
    method.epoch_start(epoch)
    seed = cfg.runtime.seed
    order = epoch_generator(seed, epoch, STREAM_ORDER, device)
    aug = epoch_generator(seed, epoch, STREAM_AUGMENT, device) if problem.augment else None
    total_steps = cfg.optim.epochs * n_batches
    loss_sum, seen, sums = 0.0, 0, {}
    samples = EpochSamples(len(problem.train_y))
    t0 = time.perf_counter()
    it = batches(len(problem.train_y), cfg.optim.batch_size, order)
    for i, idx in enumerate(progress(it, epoch=epoch, total=n_batches) if progress else it):
        lr = lr_at(cfg.optim.schedule, cfg.optim.lr, (epoch * n_batches + i) / total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = problem.train_x[idx]
        if aug is not None:
            x = data_mod.augment(x, generator=aug)
        out = method.step(methods.Batch(x=x, y=problem.train_y[idx], idx=idx), lr)
        loss = out.loss.detach()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"epoch {epoch + 1}, batch {i + 1}: training loss is {loss.item()}; "
                f"lower optim.lr (now {cfg.optim.lr}) or check the data")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        # .item() syncs with the device; do it only once per batch for the loss.
        loss_sum += loss.item() * len(idx)
        seen += len(idx)
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if out.per_sample:
            samples.add(idx, out.per_sample)
    elapsed = time.perf_counter() - t0
    stats: dict[str, Any] = {"train_loss": loss_sum / max(seen, 1),
                             "train_samples_per_s": seen / max(elapsed, 1e-9)}
    stats.update({k: v / max(seen, 1) for k, v in sums.items()})
    if samples:
        # Ground-truth noise flags: diagnostics of what the method chose, never a loss.
        pos, values = samples.arrays()
        stats.update(direction_diagnostics(values, problem.scenario.train_labels[pos],
                                           problem.scenario.is_noisy[pos],
                                           problem.num_classes))
    return stats


def evaluate_splits(cfg: TrialConfig, model: nn.Module, problem: Problem, epoch: int,
                    full: bool, which: tuple[str, ...] = ("val", "test")) -> dict[str, Any]:
    """`val_*` and `test_*` metrics (of the splits in ``which``); intermediate epochs may use
    a fixed random subset."""
    out: dict[str, Any] = {}
    device = problem.test_x.device
    splits = [("val", problem.val_x, problem.val_y), ("test", problem.test_x, problem.test_y)]
    if cfg.eval.test == "none" or (cfg.eval.test == "final" and not full):
        splits = splits[:1]
    for i, (split, x, y) in enumerate(splits):
        if split not in which:
            continue
        cap = cfg.eval.max_samples
        if not full and cap is not None and cap < len(y):
            # Same subset every epoch (epoch key fixed at 0), so the curves are comparable.
            pick = epoch_generator(cfg.runtime.seed, 0, STREAM_EVAL_SUBSET + 10 * i, device)
            keep = torch.randperm(len(y), generator=pick, device=device)[:cap]
            x, y = x[keep], y[keep]
        attack = epoch_generator(cfg.runtime.seed, epoch, STREAM_EVAL_ATTACK + 10 * i, device)
        res = evaluate(model, x, y, problem.num_classes, eps=cfg.eval_eps,
                       steps=cfg.eval.steps, step_size=cfg.eval_step_size,
                       batch_size=cfg.eval.batch_size, generator=attack)
        out.update({f"{split}_{k}": v for k, v in res.items()})
    return out


def selection_value(cfg: TrialConfig, model: nn.Module, problem: Problem, epoch: int,
                    metrics: Mapping[str, Any], last: bool) -> float:
    """`eval.best_metric` of this epoch on the validation images every epoch is measured
    on: the last epoch's whole-split value would not compare with the others' subset."""
    cap = cfg.eval.max_samples
    if last and cap is not None and cap < len(problem.val_y):
        metrics = evaluate_splits(cfg, model, problem, epoch, full=False, which=("val",))
    return float(metrics[cfg.eval.best_metric])


def autoattack_at(cfg: TrialConfig, model: nn.Module, problem: Problem,
                  epoch: int) -> dict[str, Any]:
    """AutoAttack's report of ``model`` with the PGD stream of (0-based) ``epoch``."""
    return evaluate_autoattack(cfg, model, problem, pgd_generator=epoch_generator(
        cfg.runtime.seed, epoch, STREAM_AUTOATTACK_PGD, problem.test_x.device))


def final_test(cfg: TrialConfig, model: nn.Module, problem: Problem,
               epoch: int) -> dict[str, Any]:
    """The last epoch's test report (whole test split; AutoAttack with
    `eval.autoattack_best`) of ``model`` as if it were (0-based) ``epoch``'s."""
    out = evaluate_splits(cfg, model, problem, epoch, full=True, which=("test",))
    if cfg.eval.autoattack_best:
        out.update(autoattack_at(cfg, model, problem, epoch))
    return out
