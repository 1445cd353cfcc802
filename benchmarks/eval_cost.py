"""What a robust evaluation costs: seconds and accuracy of PGD-20, AutoAttack `fast` and
AutoAttack `standard` on the same images of one trained model, to budget `eval.autoattack`.

    python benchmarks/eval_cost.py [--model RUN_DIR | MODEL.pt] [--samples 200]
                                   [--attacks pgd-20,fast,standard] [--threads N]

--model: a `caat-sweep train --out` directory or a trial directory of
benchmarks/noise_imbalance_table.py (model.pt, and metrics.json for its dataset and
eval.eps), or a bare model.pt (Fashion-MNIST, eps 0.1 assumed). Without it, a small_cnn is
trained here with PGD-AT for 3 epochs on 5000 Fashion-MNIST images (about 2 minutes on
2 cores). The images are those a trial's `eval.autoattack_samples = --samples` attacks
(the same class-balanced subset of the test split). The machine, its load and the command
are printed with the figures: AutoAttack's cost scales with the robust images left, so a
figure holds for models of about the printed accuracy.

--scale-to ARCH [--scale-images N]: an estimate, labelled as one, of the same attacks on
ARCH (CIFAR-shaped input, 3 x 32 x 32, 10 classes) over N test images (default 10000, a
CIFAR test split): each measured seconds-per-image times the ratio of one attack pass
(forward and input-gradient backward, batch 128) of ARCH to one of the measured model, both
timed here. It assumes AutoAttack's passes per image stay those of the measured model (they
grow with the images still robust), so it holds for a model of about the printed accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from epoch_time import cpu_name

from trainables.autoattack import STANDARD_TARGETS, run_autoattack, stratified_subset
from trainables.config import TrialConfig, load_config, recorded_config
from trainables.data import load
from trainables.metrics import evaluate
from trainables.models import load_checkpoint
from trainables.problem import evaluated_test_positions
from trainables.trial import DirectoryReporter, run_trial

ATTACKS = ("pgd-20", "fast", "standard")
QUICK_PGD_AT = {"dataset": {"train_size": 5000}, "method": {"name": "pgd_at", "steps": 5},
                "optim": {"epochs": 3}, "eval": {"test": "none"}}


def model_and_config(path: str | None) -> tuple[torch.nn.Module, TrialConfig, str]:
    if path is None:
        cfg = load_config(QUICK_PGD_AT, ["runtime.device=cpu"])
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model = run_trial(cfg, DirectoryReporter(Path(tmp))).model
        return model, cfg, (f"small_cnn, PGD-AT trained here: 3 epochs x 5000 images "
                            f"({time.perf_counter() - t0:.0f} s)")
    p = Path(path)
    run_dir, model_file = (p, p / "model.pt") if p.is_dir() else (p.parent, p)
    metrics = run_dir / "metrics.json"
    cfg = load_config(recorded_config(json.loads(metrics.read_text())["config"])
                      if metrics.is_file() else None)
    return load_checkpoint(model_file), cfg, str(model_file)


def pass_seconds(model: torch.nn.Module, shape: tuple[int, ...], batch: int = 128,
                 reps: int = 3) -> float:
    """Seconds per image of one attack pass of ``model``: forward, cross-entropy, backward
    to the input (what every PGD or APGD iteration costs), best of ``reps`` after a warm-up."""
    x = torch.rand(batch, *shape)
    y = torch.zeros(batch, dtype=torch.long)
    model.eval()
    best = float("inf")
    for i in range(reps + 1):
        xi = x.clone().requires_grad_(True)
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(xi), y).backward()
        if i:  # the first pass warms the allocator and kernels up
            best = min(best, time.perf_counter() - t0)
    return best / batch


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--attacks", default="pgd-20,fast",
                        help=f"comma-separated, from {', '.join(ATTACKS)}")
    parser.add_argument("--targets", type=int, default=3, help="APGD-T targets of `fast`")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scale-to", default=None, metavar="ARCH",
                        help="also estimate each attack's cost on ARCH (3x32x32, 10 classes)")
    parser.add_argument("--scale-images", type=int, default=10000)
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    if unknown := sorted(set(attacks) - set(ATTACKS)):
        parser.error(f"--attacks: unknown {', '.join(unknown)}; allowed: {', '.join(ATTACKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, cfg, what = model_and_config(args.model)
    model = model.to("cpu").eval()
    splits = load(cfg.dataset, seed=cfg.runtime.seed)
    pool = evaluated_test_positions(cfg, splits)
    pick = torch.as_tensor(pool[stratified_subset(splits.test_y[pool].numpy(), args.samples)])
    x, y = splits.test_x[pick], splits.test_y[pick]
    eps = cfg.eval_eps

    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, cpu; load average at "
          f"start {os.getloadavg()[0]:.1f}")
    print(f"# model: {what}; {cfg.dataset.name}, {len(y)} test images (class-balanced), "
          f"L-inf eps {eps:.4f}")
    print(f"{'attack':<10} {'seconds':>8} {'s/image':>8} {'accuracy':>9}  flags")
    natural, per_image = None, {}
    for name in attacks:
        if name == "pgd-20":
            res, sec = timed(lambda: evaluate(model, x, y, splits.num_classes, eps=eps, steps=20,
                                              step_size=eps / 4, batch_size=250,
                                              generator=torch.Generator().manual_seed(0)))
            acc, flags, natural = res["robust_acc"], [], res["natural_acc"]
        else:
            targets = STANDARD_TARGETS if name == "standard" else args.targets
            res, sec = timed(lambda n=name, t=targets: run_autoattack(
                model, x, y, eps=eps, version=n, targets=t))
            acc, flags = res.correct.double().mean().item(), res.flags
        per_image[name] = sec / len(y)
        print(f"{name:<10} {sec:8.1f} {sec / len(y):8.3f} {acc:9.4f}  {len(flags)}"
              + "".join(f"\n{'':39}{f}" for f in flags))
    if natural is not None:
        print(f"# natural accuracy {natural:.4f}; load average at end {os.getloadavg()[0]:.1f}")
    else:
        print(f"# load average at end {os.getloadavg()[0]:.1f}")
    if args.scale_to:
        print_estimate(model, tuple(x.shape[1:]), args.scale_to, args.scale_images, per_image)


def print_estimate(model: torch.nn.Module, shape: tuple[int, ...], arch: str, images: int,
                   per_image: dict[str, float]) -> None:
    from trainables.models import build

    target = build(arch, 10, 3, input_shape=(3, 32, 32))
    ratio = pass_seconds(target, (3, 32, 32)) / pass_seconds(model, shape)
    print(f"# ESTIMATE, not a measurement: {arch} on {images} images of 3x32x32, this CPU; one "
          f"attack pass of {arch} costs {ratio:.1f}x the measured model's (timed here)")
    print(f"{'attack':<10} {'s/image':>8} {'hours':>8}")
    for name, sec in per_image.items():
        print(f"{name:<10} {sec * ratio:8.2f} {sec * ratio * images / 3600:8.1f}")


if __name__ == "__main__":
    main()
