"""Training throughput per method, measured against the plain forward+backward floor.

For each method this runs real training epochs through the trial's own epoch loop
(`trainables.trial.train_epoch`, per-epoch hooks included) on `synthetic` 3x32x32 data
with `small_cnn`, and prints samples/s next to the floor: the time of one plain
forward+backward pass of the same model and batch, times the number of such passes the
method cannot avoid (1 for ERM, K+1 for PGD-AT and anti-adversarial training, K+2 for
TRADES, FRL and CAAT with K attack steps). "floor eff." is floor time / measured time: 100%
means the method costs nothing beyond its unavoidable passes.

    python benchmarks/epoch_time.py                       # all registered methods, K=10
    python benchmarks/epoch_time.py --methods trades caat --steps 5 --epochs 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainables import methods
from trainables.config import load_config, recorded_config
from trainables.trial import (
    build_model,
    build_problem,
    make_optimizer,
    method_data,
    resolve_device,
    train_epoch,
)

# Unavoidable full forward+backward passes per batch, as a function of the attack steps K.
FLOOR_PASSES = {
    "erm": lambda k: 1,
    "mwn": lambda k: 1,
    "pgd_at": lambda k: k + 1,
    "anti_adv": lambda k: k + 1,
    "trades": lambda k: k + 2,
    "frl": lambda k: k + 2,
    "caat": lambda k: k + 2,
    "fgsm_rs": lambda k: 2,  # one attack step whatever K
    "n_fgsm": lambda k: 2,
    "at_bsl": lambda k: k + 1,
    "te": lambda k: k + 1,  # with its default PGD-AT base
    "cfa": lambda k: k + 2,
    "wat": lambda k: k + 2,
    "faal": lambda k: k + 1,  # its AT fine-tune (and PGD-AT before it)
    "dafa": lambda k: k + 2,  # TRADES at class-scaled bounds
    "bat": lambda k: 3,  # two early-stopped attacks: at least one step each, then training
}


def config(method: str, args: argparse.Namespace) -> dict:
    return {
        "dataset": {"name": "synthetic", "shape": [3, 32, 32], "num_classes": 10,
                    "n_train": args.n_train + 300, "n_test": 100},  # + meta and val
        # A meta set of 2% of the training set, as with Fashion-MNIST's 60k and 20 per
        # class: the per-epoch multiplier update is measured at a realistic share.
        "scenario": {"meta_per_class": 20, "val_per_class": 10},
        "model": {"arch": args.arch},
        "method": recorded_config({"method": {"name": method, "steps": args.steps}})["method"],
        "optim": {"epochs": args.epochs, "batch_size": args.batch_size},
        "runtime": {"seed": 0, "device": args.device, "threads": args.threads},
    }


def floor_ms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Median time of one plain forward+backward (parameter gradients) of this batch."""
    model.train()
    times = []
    for i in range(repeats + 3):
        sync(x.device)
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        sync(x.device)
        if i >= 3:  # warm-up passes excluded
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Bench:
    """One method set up for measurement; epochs are run interleaved with the others."""

    name: str
    cfg: object
    problem: object
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    method: object
    device: torch.device
    n_batches: int
    epoch_s: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)


def setup(method_name: str, args: argparse.Namespace) -> Bench:
    cfg = load_config(config(method_name, args), args.set or [])
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(0)
    problem = build_problem(cfg, device)
    model = build_model(cfg, problem, device)
    opt = make_optimizer(cfg, model)
    method = methods.build(method_name, model, cfg, method_data(problem, device, opt))
    return Bench(method_name, cfg, problem, model, opt, method, device,
                 len(problem.train_y) // cfg.optim.batch_size)


def run_round(b: Bench, epoch: int, repeats: int) -> None:
    bs = b.cfg.optim.batch_size
    b.floor.append(floor_ms(b.model, b.problem.train_x[:bs], b.problem.train_y[:bs], repeats))
    sync(b.device)
    t0 = time.perf_counter()
    # The trial's own epoch: per-epoch hooks (the multiplier update) and meta steps count.
    train_epoch(b.cfg, b.model, b.opt, b.method, b.problem, epoch, b.n_batches, b.device, None)
    b.method.epoch_end(epoch)
    sync(b.device)
    b.epoch_s.append(time.perf_counter() - t0)


def summary(b: Bench, floor: float) -> dict:
    # The first round carries one-off costs (allocator warm-up): medians of the others.
    epoch = statistics.median(b.epoch_s[1:] or b.epoch_s)
    ms_per_batch = 1000 * epoch / b.n_batches
    # A method without an attack (ERM, MWN) or with a fixed one (FGSM) has no `steps` knob.
    k = getattr(b.cfg.method, "steps", None)
    passes = FLOOR_PASSES.get(b.name, lambda k: 1)(k)
    return {"method": b.name, "K": "-" if k is None else k, "epoch_s": epoch,
            "ms_batch": ms_per_batch, "samples_s": b.n_batches * b.cfg.optim.batch_size / epoch,
            "passes": passes, "eff": passes * floor / ms_per_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods to measure (default: all registered)")
    parser.add_argument("--steps", type=int, default=10, help="attack steps K")
    parser.add_argument("--n-train", type=int, default=10240, help="training samples per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4,
                        help="rounds: one epoch of each method per round (median of all but "
                             "the first)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="floor timings per round, before each method's epoch (their "
                             "median is one floor measurement; the floor reported is the "
                             "median over all rounds and methods)")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", help="extra config override KEY=VALUE")
    args = parser.parse_args()
    names = args.methods or [m for m in FLOOR_PASSES if m in methods.METHODS]

    print(f"# {' '.join(sys.argv)}")
    print(f"# machine: {cpu_name()}, {platform.system()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{resolve_device(args.device)}")
    print(f"# synthetic 3x32x32, {args.arch}, batch {args.batch_size}, {args.n_train} "
          f"training samples per epoch, median of {args.epochs - 1} interleaved epochs")
    benches = [setup(name, args) for name in names]
    # Round-robin over methods, so drifting machine load hits every method alike.
    for epoch in range(args.epochs):
        for b in benches:
            run_round(b, epoch, args.repeats)
    # The floor is a property of the model and batch, the same for every method: pooling
    # all rounds' measurements keeps one method's noisy floor from moving its efficiency.
    floors = [f for b in benches for f in b.floor]
    floor = statistics.median(floors)
    print(f"# floor (one plain forward+backward): {floor:.1f} ms, median of {len(floors)} "
          f"rounds (min {min(floors):.1f}, max {max(floors):.1f})")
    rows = [summary(b, floor) for b in benches]
    ref = next((r for r in rows if r["method"] == "trades"), None)
    header = (f"{'method':<9} {'K':>3} {'samples/s':>10} {'ms/batch':>9} "
              f"{'passes':>6} {'floor eff.':>10} {'x TRADES':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        rel = f"{r['ms_batch'] / ref['ms_batch']:.2f}" if ref else "-"
        print(f"{r['method']:<9} {r['K']:>3} {r['samples_s']:>10.0f} {r['ms_batch']:>9.1f} "
              f"{r['passes']:>6} {100 * r['eff']:>9.0f}% {rel:>9}")


if __name__ == "__main__":
    main()
