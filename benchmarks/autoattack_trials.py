"""AutoAttack on the saved models of the comparison and ablation trials, after the fact.

The trials of `noise_imbalance_table.py` and `caat_ablation.py` ran before AutoAttack existed
here and were evaluated with PGD-20 only. This pass attacks each trial's `model.pt` the way a
trial's own `eval.autoattack` does (trainables.autoattack.autoattack_report): the same fixed,
class-balanced subset of the trial's evaluated test images for every trial and seed, PGD with
the trial's eval settings and AutoAttack (`fast` by default: APGD-CE and APGD-T with 3
targets) on those same images, at the trial's eval eps. It writes the result beside the
model as `autoattack.json`, keyed by the model file's hash and the attack settings, so a
finished trial is skipped and an interrupted pass continues where it stopped; both tables
read it (`collect`).

    python benchmarks/autoattack_trials.py --out results/noise_imbalance --jobs 2
    python benchmarks/autoattack_trials.py --out results/noise_imbalance \
        --trials 'pair-0.4/caat*' --version standard
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

RESULT = "autoattack.json"


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def settings(version: str, samples: int, targets: int) -> dict[str, Any]:
    from importlib.metadata import version as package_version

    return {"version": version, "samples": samples,
            "targets": targets if version == "fast" else None,
            "pyautoattack": package_version("pyautoattack")}


def read_result(trial: Path, want: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The trial's AutoAttack result, if it is of its current model.pt (and of ``want``'s
    settings when given); None otherwise."""
    path, model = trial / RESULT, trial / "model.pt"
    if not path.is_file() or not model.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("model_sha256") != file_hash(model):
        return None
    if want is not None and stored.get("settings") != want:
        return None
    return stored


def attack_trial(trial: str, want: dict[str, Any], threads: int) -> tuple[str, float]:
    """AutoAttack and PGD on the trial's model (worker process), through the trial's own
    `evaluate_autoattack` with its eval settings and the PGD stream of its last epoch: what
    the trial would have reported had it run with `eval.autoattack`. Writes RESULT."""
    from types import SimpleNamespace

    import torch

    from trainables.autoattack import evaluate_autoattack
    from trainables.config import load_config, recorded_config
    from trainables.data import load
    from trainables.models import load_checkpoint
    from trainables.problem import evaluated_test_positions, evaluated_test_split
    from trainables.trial import STREAM_AUTOATTACK_PGD, epoch_generator

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = Path(trial)
    cfg = load_config(recorded_config(json.loads((run / "metrics.json").read_text())["config"]), [
        f"eval.autoattack={want['version']}", f"eval.autoattack_samples={want['samples']}",
        *([f"eval.autoattack_targets={want['targets']}"] if want["targets"] else [])])
    splits = load(cfg.dataset, seed=cfg.runtime.seed)
    test_x, test_y = evaluated_test_split(cfg, splits)
    # The fields of a trial's Problem that evaluate_autoattack reads.
    problem = SimpleNamespace(test_x=test_x, test_y=test_y, num_classes=splits.num_classes,
                              test_idx=evaluated_test_positions(cfg, splits))
    model = load_checkpoint(run / "model.pt").eval()
    last_epoch = cfg.optim.epochs - 1
    report = evaluate_autoattack(cfg, model, problem, pgd_generator=epoch_generator(
        cfg.runtime.seed, last_epoch, STREAM_AUTOATTACK_PGD, torch.device("cpu")))
    seconds = time.perf_counter() - t0
    out = {"settings": want, "model_sha256": file_hash(run / "model.pt"), "seconds": seconds,
           "eps": cfg.eval_eps, "pgd_steps": cfg.eval.steps,
           **{k.removeprefix("test_"): v for k, v in report.items()}}
    (run / RESULT).write_text(json.dumps(out, indent=1))
    return trial, seconds


def trials(root: Path, patterns: list[str]) -> list[Path]:
    found = {p.parent for pattern in patterns for p in root.glob(f"{pattern}/seed*/model.pt")}
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/noise_imbalance")
    parser.add_argument("--trials", nargs="+", default=["*/*"],
                        help="SCENARIO/METHOD globs under --out (default: all)")
    parser.add_argument("--version", choices=["fast", "standard"], default="fast")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=3, help="APGD-T targets of `fast`")
    parser.add_argument("--jobs", type=int, default=2, help="models attacked in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model")
    args = parser.parse_args()
    want = settings(args.version, args.samples, args.targets)
    found = trials(Path(args.out), args.trials)
    todo = [t for t in found if read_result(t, want) is None]
    print(f"# {' '.join(sys.argv)}  ({os.cpu_count()} cores)")
    print(f"# {len(found)} trials, {len(todo)} to attack ({want}), {args.jobs} at a time",
          flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(attack_trial, str(t), want, args.threads) for t in todo]
        for i, fut in enumerate(as_completed(futures), 1):
            trial, secs = fut.result()
            res = read_result(Path(trial))
            print(f"[{i}/{len(todo)}] {trial}: {secs:.0f} s, AutoAttack "
                  f"{res['autoattack_acc']:.3f}, PGD {res['autoattack_pgd_acc']:.3f}, "
                  f"flags {res['autoattack_flag_count']}", flush=True)


if __name__ == "__main__":
    main()
