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
- speedup of 2 concurrent trials over 1 (target on a 2-core machine: >= 1.8x).

    python benchmarks/sweep_scaling.py               # 8 trials
    python benchmarks/sweep_scaling.py --trials 8 --epochs 3 --n-train 3000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

from sweeper.search import META, SharedSplits, data_key, sweep_trial
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
        trainable, param_space={**cfg, META: tune.grid_search(metas)},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=2000)
    args = parser.parse_args()

    import ray

    from trainables import data
    from trainables.config import DatasetConfig

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, python {platform.python_version()}")
    print(f"command: python benchmarks/sweep_scaling.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cfg = trial_config(args)
    splits = data.load(DatasetConfig(**cfg["dataset"]), seed=0)
    datasets = {data_key(validate(cfg)): SharedSplits.from_splits(splits)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="sweep-scaling-") as storage:
        run(1, argparse.Namespace(**{**vars(args), "trials": 2}), datasets, storage)  # warm-up
        rows = [run(c, args, datasets, storage) for c in (1, 2)]
    ray.shutdown()
    print(f"{args.trials} identical trials: ERM, synthetic 1x28x28 (n_train {args.n_train}), "
          f"small_cnn, {args.epochs} epochs, 1 CPU and 1 torch thread each")
    print(f"{'concurrent':>10}  {'wall s':>8}  {'trial compute s':>15}  "
          f"{'overhead s/trial':>16}")
    for r in rows:
        print(f"{r['concurrency']:>10}  {r['wall']:>8.1f}  {r['compute']:>15.1f}  "
              f"{r['overhead']:>16.2f}")
    print(f"speedup with 2 concurrent trials: {rows[0]['wall'] / rows[1]['wall']:.2f}x "
          "(target >= 1.8x on 2 cores)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
