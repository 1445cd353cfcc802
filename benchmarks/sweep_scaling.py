"""Sweep scaling: wall time of N identical trials at 1 and 2 concurrent trials (1 CPU each).

Runs the sweeper's own execution path (the `sweep_trial` trainable behind
`tune.with_parameters` / `tune.with_resources`, dataset in the object store, reused trial
actors, MLflow-free) through one Ray Tune `Tuner` per concurrency level, on a local Ray
with 2 CPUs. A trial is a fixed config (no search): ERM on a `synthetic` 1x28x28 problem
with `small_cnn`, single-threaded. Prints, per concurrency level:

- wall: `Tuner.fit()` from start to end (trial start-up and scheduling included);
- trial compute: the sum over trials of the time Ray measured inside the trainable;
- overhead per trial: wall x concurrency - trial compute, spread over the trials (the
  scheduling, process, hand-over and bookkeeping cost a trial pays that a bare loop of
  `run_trial` calls would not);
- speedup of 2 concurrent trials over 1 (target on a 2-core machine: >= 1.8x);
- the same trials without Ray or the sweeper, as the machine's own ceiling: `run_trial`
  in a pool of 1 or 2 fresh worker processes (their start-up timed, like the Tuner's trial
  actors'), same threads.

    python benchmarks/sweep_scaling.py               # 8 trials, each setting 3 times
    python benchmarks/sweep_scaling.py --trials 8 --epochs 3 --n-train 3000 --repeats 1

On a shared or virtualised 2-core machine the cores' speed drifts by tens of percent from
minute to minute, so every setting is measured --repeats times, interleaved (sweeper 1,
sweeper 2, bare 1, bare 2, then again), and the medians are compared.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from sweeper.search import SWEEP_KEY, SharedSplits, data_key, sweep_trial
from trainables.config import validate


def trial_config(args: argparse.Namespace) -> dict:
    return {
        "dataset": {"name": "synthetic", "shape": [1, 28, 28], "num_classes": 10,
                    "n_train": args.n_train + 500, "n_test": 200},
        "scenario": {"meta_per_class": 10, "val_per_class": 40},
        "model": {"arch": "small_cnn"},
        "method": {"name": "erm"},
        "optim": {"epochs": args.epochs, "batch_size": 128},
        "eval": {"steps": 5, "max_samples": 200},
        "runtime": {"seed": 0, "device": "cpu", "threads": 1},
    }


def run(concurrency: int, args: argparse.Namespace, datasets: dict, storage: str) -> dict:
    from ray import tune

    cfg = trial_config(args)
    key = data_key(validate(cfg))
    metas = [{"cell": "bench/erm", "phase": "tune", "seed": 0, "epochs": args.epochs,
              "data": key, "warm_start": None, "replica": i} for i in range(args.trials)]
    trainable = tune.with_resources(
        tune.with_parameters(sweep_trial, datasets=datasets, warm_starts={}, faults=[]),
        {"cpu": 1})
    tuner = tune.Tuner(
        trainable, param_space={**cfg, SWEEP_KEY: tune.grid_search(metas)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=f"scaling-{concurrency}", storage_path=storage,
                                  verbose=0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise SystemExit(f"a trial failed: {errors[0]}")
    compute = sum(r.metrics["time_total_s"] for r in grid)
    return {"concurrency": concurrency, "wall": wall, "compute": compute,
            "overhead": (wall * concurrency - compute) / args.trials}


def _bare_trial(cfg: dict) -> float:
    """One trial through `run_trial` with a throw-away directory reporter (no Ray)."""
    import torch

    from trainables.trial import DirectoryReporter, run_trial

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run_trial(cfg, DirectoryReporter(Path(out)))
    return time.perf_counter() - t0


def run_bare(concurrency: int, args: argparse.Namespace) -> dict:
    cfg = trial_config(args)
    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()  # worker start-up counts, as a Tuner's actors' does
    with ProcessPoolExecutor(concurrency, mp_context=ctx) as pool:
        times = list(pool.map(_bare_trial, [cfg] * args.trials))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "wall": wall, "compute": sum(times),
            "overhead": (wall * concurrency - sum(times)) / args.trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from trainables import data
    from trainables.config import DatasetConfig

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # verbose=0 then means quiet
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}")
    print(f"command: python benchmarks/sweep_scaling.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cfg = trial_config(args)
    splits = data.load(DatasetConfig(**cfg["dataset"]), seed=0)
    datasets = {data_key(validate(cfg)): SharedSplits.from_splits(splits)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="sweep-scaling-") as storage:
        run(1, argparse.Namespace(**{**vars(args), "trials": 2}), datasets, storage)  # warm-up
        for _ in range(args.repeats):
            for c in (1, 2):
                runs.setdefault(("sweeper (Ray Tune)", c), []).append(
                    run(c, args, datasets, storage))
            for c in (1, 2):
                runs.setdefault(("bare run_trial processes", c), []).append(run_bare(c, args))
    ray.shutdown()
    print(f"{args.trials} identical trials: ERM, synthetic 1x28x28 (n_train {args.n_train}), "
          f"small_cnn, {args.epochs} epochs, 1 CPU and 1 torch thread each; median of "
          f"{args.repeats} (min-max)")
    print(f"{'':>24}{'concurrent':>11}  {'wall s':>17}  {'trial compute s':>15}  "
          f"{'overhead s/trial':>16}")
    med = {}
    for (label, c), rows in runs.items():
        walls = [r["wall"] for r in rows]
        med[label, c] = statistics.median(walls)
        compute = statistics.median(r["compute"] for r in rows)
        overhead = statistics.median(r["overhead"] for r in rows)
        spread = f"{med[label, c]:.1f} ({min(walls):.1f}-{max(walls):.1f})"
        print(f"{label:>24}{c:>11}  {spread:>17}  {compute:>15.1f}  {overhead:>16.2f}")
    sweeper = med["sweeper (Ray Tune)", 1] / med["sweeper (Ray Tune)", 2]
    ceiling = med["bare run_trial processes", 1] / med["bare run_trial processes", 2]
    print(f"speedup with 2 concurrent trials: {sweeper:.2f}x through the sweeper "
          f"(target >= 1.8x on 2 cores); {ceiling:.2f}x for bare processes on this machine")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
