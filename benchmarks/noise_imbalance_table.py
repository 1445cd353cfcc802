"""All methods on Fashion-MNIST with 40% pair noise and with imbalance ratio 10, 3 seeds.

Fixed hyperparameters from the literature (nothing tuned, least of all on the test set):
small_cnn, L-inf eps 0.1, K=5 attack steps of 0.025, TRADES/FRL/CAAT beta 6, SGD lr 0.05
with a cosine schedule, one shared ERM warm-start epoch for every method (CAAT's protocol
starts from a naturally trained model; giving it to all keeps the comparison fair).
Budget (a few minutes per trial on one CPU core): a 5000-image training subset, 5 epochs,
and a fixed class-balanced 5000-image test subset (500 per class) so the final PGD-20 takes
half the time; `--test-size 10000` evaluates on the whole test set.
Evaluation: PGD-20 with a random start, true test labels.

Each trial writes RESULTS/<scenario>/<method>/seed<k>/metrics.json through the trial's own
code path; finished trials are skipped, so an interrupted run continues where it stopped.

    python benchmarks/noise_imbalance_table.py --out results/noise_imbalance --jobs 2
    python benchmarks/noise_imbalance_table.py --out results/noise_imbalance --table-only

AutoAttack's columns come from benchmarks/autoattack_trials.py, run on the saved models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

# The harness's first seven, then the nine baselines that followed FRL (issue 22), each at its
# official code's defaults for the knobs the comparison does not fix.
METHODS = ["erm", "pgd_at", "trades", "frl", "mwn", "anti_adv", "caat",
           "cfa", "wat", "bat", "dafa", "faal", "fgsm_rs", "n_fgsm", "at_bsl", "te"]
SCENARIOS = {
    "pair-0.4": {"noise_type": "pair", "noise_rate": 0.4},
    "imbalance-10": {"imbalance_ratio": 10.0},
}
COLUMNS = {"natural_acc": "natural", "robust_acc": "robust",
           "worst_class_natural_acc": "worst-class natural",
           "worst_class_robust_acc": "worst-class robust"}
# AutoAttack `fast` on a fixed class-balanced 1000-image subset of the same test images,
# measured after the fact on each trial's model.pt by benchmarks/autoattack_trials.py; the
# gap is PGD-20's accuracy on those images minus AutoAttack's ("-": not measured yet);
# `AA images` says how many (the nine baselines' rows: 200, for the CPU time).
AA_COLUMNS = {"autoattack_acc": "AutoAttack", "worst_class_autoattack_acc":
              "worst-class AutoAttack", "pgd_autoattack_gap": "PGD-AA gap"}
# The best checkpoint's (`eval.keep_best`: the epoch of the highest validation robust
# accuracy), and the robust overfitting gap: best robust - last robust, per seed.
BEST_COLUMNS = {"best_natural_acc": "best: natural", "best_robust_acc": "best: robust",
                "best_worst_class_robust_acc": "best: worst-class robust",
                "overfit_gap": "best - last robust"}


def method_block(method: str, knobs: dict) -> dict:
    """The method's name and those of the shared knobs it has (ERM has no attack)."""
    from trainables.config import recorded_config

    return recorded_config({"method": {"name": method, **knobs}})["method"]


def trial_config(scenario: str, method: str, seed: int, args: argparse.Namespace,
                 knobs: dict | None = None) -> dict:
    """The trial of (scenario, method, seed); ``knobs`` are extra `method.*` settings (the
    CAAT ablation's variants). Everything else keeps the config's defaults."""
    return {
        "dataset": {"name": "fashion_mnist", "train_size": args.train_size,
                    "test_size": args.test_size},
        "scenario": {"meta_per_class": 20, "val_per_class": 100, **SCENARIOS[scenario]},
        "model": {"arch": "small_cnn"},
        "method": method_block(method, {"eps": 0.1, "step_size": 0.025, "steps": 5,
                                        "beta": 6.0, **(knobs or {})}),
        # One warm start per scenario and seed, shared by every method.
        "init": {"erm_epochs": 1, "cache_dir": str(Path(args.out) / "warm_starts")},
        "optim": {"epochs": args.epochs, "batch_size": 128, "lr": 0.05},
        # Validation every epoch, so the best checkpoint (`eval.keep_best`, chosen on
        # validation robust accuracy) can be an earlier epoch's; the test split once, at the
        # end, for the last and the best weights.
        "eval": {"steps": 20, "every": 1, "test": "final"},
        "runtime": {"seed": seed, "device": "cpu", "threads": args.threads},
    }


def run_one(cfg: dict, out: str) -> tuple[str, float]:
    """One trial in a worker process (resumes from its checkpoint if one is there)."""
    from trainables.config import same_config, validate
    from trainables.models import save_checkpoint
    from trainables.trial import DirectoryReporter, load_state, run_trial

    t0 = time.perf_counter()
    reporter = DirectoryReporter(Path(out))
    resume = reporter.latest_checkpoint()
    if resume is not None and not same_config(load_state(resume)["config"],
                                              validate(cfg).resolved()):
        # A checkpoint of another config (or of other defaults) is no state to resume from.
        shutil.rmtree(resume)
    result = run_trial(cfg, reporter)
    metrics = {k.removeprefix("test_"): v for k, v in result.metrics.items()
               if k.startswith("test_")}
    # Validation metrics (what defaults are chosen by) and the per-epoch history
    # (frac_anti and CAAT's direction diagnostics) beside the test metrics.
    metrics["val"] = {k.removeprefix("val_"): v for k, v in result.metrics.items()
                      if k.startswith("val_")}
    metrics["best_epoch"] = result.metrics.get("best_epoch")
    metrics["history"] = result.history
    metrics["config"] = cfg
    metrics["resolved"] = result.config.resolved()  # what ran, defaults filled in
    metrics["seconds"] = time.perf_counter() - t0
    # The model too, for benchmarks/independent_pgd.py's cross-check of robust_acc.
    save_checkpoint(result.model, Path(out) / "model.pt")
    if result.best is not None and result.best.weights is not None:
        save_checkpoint(result.best.model(result.model), Path(out) / "model_best.pt",
                        extra={"epoch": result.best.epoch})
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out, metrics["seconds"]


def is_done(out: Path, cfg: dict) -> bool:
    """A finished trial of this very config, defaults resolved as they are now: a result of
    another config, or of the same config under other defaults, is stale and re-run."""
    from trainables.config import same_config, validate

    path = out / "metrics.json"
    if not path.is_file():
        return False
    stored = json.loads(path.read_text())
    resolved = stored.get("resolved")
    if resolved is None and (out / "checkpoint").is_dir():
        # Results written before `resolved` was recorded: the trial's last checkpoint
        # holds the config it ran with.
        from trainables.trial import load_state

        resolved = load_state(out / "checkpoint")["config"]
    return same_config(resolved, validate(cfg).resolved())


def collect(root: Path) -> pd.DataFrame:
    """One row per finished trial: test metrics in %, val robust accuracy in %, minutes,
    AutoAttack's (where autoattack_trials.py has attacked its model) and (where logged) the
    first and last epoch's frac_anti and the last anti_noisy_auc."""
    from autoattack_trials import read_result

    rows = []
    for path in sorted(root.glob("*/*/seed*/metrics.json")):
        m = json.loads(path.read_text())
        aa = read_result(path.parent) or {}
        scenario, method, seed = path.parts[-4], path.parts[-3], path.parts[-2]
        history = m.get("history", [])
        first, last = (history[0], history[-1]) if history else ({}, {})
        best = {k: 100 * m[k] if k in m else float("nan") for k in BEST_COLUMNS}
        best["overfit_gap"] = best["best_robust_acc"] - 100 * m["robust_acc"]
        rows.append({"scenario": scenario, "method": method, "seed": seed,
                     **{k: 100 * m[k] for k in COLUMNS}, "minutes": m["seconds"] / 60,
                     **best, "best_epoch": m.get("best_epoch", float("nan")),
                     "worst_class_wilson": worst_class_wilson(m),
                     "epochs": total_epochs(m.get("resolved") or m["config"]),
                     **{k: 100 * aa[k] if k in aa else float("nan") for k in AA_COLUMNS},
                     "aa_samples": aa.get("settings", {}).get("samples", float("nan")),
                     **{f"val_{k}": 100 * m["val"][k] for k in COLUMNS if k in m.get("val", {})},
                     "frac_anti_first": first.get("frac_anti", float("nan")),
                     "frac_anti_last": last.get("frac_anti", float("nan")),
                     "anti_noisy_auc_last": last.get("anti_noisy_auc", float("nan")),
                     "meta_pref_noisy_auc_last": last.get("meta_pref_noisy_auc", float("nan")),
                     "frac_anti_mean": (sum(h.get("frac_anti", 0.0) for h in history)
                                        / len(history)) if history else float("nan")})
    return pd.DataFrame(rows)


def total_epochs(cfg: dict) -> int:
    """The epochs behind a trial's model: its own and its ERM warm start's (a fine-tune such
    as FAAL's runs inside the trial's own epochs, so it is counted there)."""
    return int(cfg.get("init", {}).get("erm_epochs", 0)) + int(cfg["optim"]["epochs"])


def worst_class_wilson(m: dict) -> float:
    """The half-width (points) of the 95% Wilson interval of a run's worst-class robust
    accuracy on its own test images of that class (NaN for runs without class counts)."""
    from sweeper.analysis._intervals import wilson_interval

    acc, counts = m.get("class_robust_acc"), m.get("class_count")
    if not acc or not counts:
        return float("nan")
    c = min(range(len(acc)), key=lambda i: acc[i])
    low, high = wilson_interval(acc[c] * counts[c], counts[c])
    return 100 * (high - low) / 2


def cell(rows: pd.DataFrame, key: str, digits: int = 1, interval: bool = False) -> str:
    """mean ± sample std over the rows, or with ``interval`` the mean and its 95%
    t-interval over seeds, "mean [low, high]" (just the mean for one; - for none)."""
    from sweeper.analysis._intervals import t_interval

    values = rows[key].dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.mean():.{digits}f}"
    if interval:
        low, high = t_interval(values.to_numpy(float))
        return f"{values.mean():.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def count_cell(rows: pd.DataFrame, key: str) -> str:
    """An integer column over the rows: its value, a range where they differ, - for none."""
    values = rows[key].dropna()
    if values.empty:
        return "-"
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}-{high}"


def markdown_rows(block: pd.DataFrame, names: list[str], columns: dict[str, int], *,
                  counts: tuple[str, ...] = (), after: tuple[str, ...] = (),
                  interval: bool = False) -> list[str]:
    """One markdown row per name present in `block` (its `method` column): n, the integer
    columns ``counts`` (`count_cell`), a cell per column key (with its digits; `cell`'s
    ``interval``), the integer columns ``after``, and the mean minutes per trial."""
    lines = []
    for name in names:
        rows = block[block.method == name]
        if rows.empty:
            continue
        cells = ([count_cell(rows, key) for key in counts]
                 + [cell(rows, key, digits, interval) for key, digits in columns.items()]
                 + [count_cell(rows, key) for key in after])
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells)
                     + f" | {rows.minutes.mean():.1f} |")
    return lines


def table(df: pd.DataFrame) -> str:
    lines = []
    for scenario, block in df.groupby("scenario", sort=False):
        lines.append(f"\n{scenario} (test accuracy %, mean ± std over seeds)\n")
        columns = COLUMNS | AA_COLUMNS
        lines.append("| method | n | epochs | " + " | ".join(columns.values())
                     + " | AA images | min/trial |")
        lines.append("|---|---|---|" + "---|" * (len(columns) + 2))
        lines += markdown_rows(block, METHODS, dict.fromkeys(columns, 1), counts=("epochs",),
                               after=("aa_samples",))
    return "\n".join(lines)


def best_last_table(df: pd.DataFrame) -> str:
    """Last and best checkpoints per scenario, each figure its mean and 95% t-interval over
    seeds; below each, the widest 95% Wilson interval of one run's worst-class robust
    accuracy (the measurement precision of one run on that class's test images)."""
    lines = []
    df = df[df["best_epoch"].notna()]
    for scenario, block in df.groupby("scenario", sort=False):
        lines.append(f"\n{scenario}: last and best checkpoints (test accuracy %, mean "
                     "[95% t-interval over seeds])\n")
        columns = {k: v for k, v in COLUMNS.items() if k != "worst_class_natural_acc"}
        columns |= BEST_COLUMNS
        lines.append("| method | n | epochs | best epoch | " + " | ".join(columns.values())
                     + " | min/trial |")
        lines.append("|---|---|---|---|" + "---|" * (len(columns) + 1))
        lines += markdown_rows(block, METHODS, dict.fromkeys(columns, 1),
                               counts=("epochs", "best_epoch"), interval=True)
        wilson = block["worst_class_wilson"].dropna()
        if len(wilson):
            lines.append(f"\nOne run's worst-class robust accuracy: 95% Wilson interval at most "
                         f"±{wilson.max():.1f} points (median ±{wilson.median():.1f}) on "
                         "that class's test images.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/noise_imbalance")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=5000,
                        help="class-balanced fixed test subset (10000: the whole split)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="trials run in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    root = Path(args.out)
    print(f"# {' '.join(sys.argv)}  ({os.cpu_count()} cores)")
    if not args.table_only:
        todo = [(trial_config(s, m, seed, args), str(root / s / m / f"seed{seed}"))
                for s in args.scenarios for m in args.methods for seed in args.seeds
                if not is_done(root / s / m / f"seed{seed}", trial_config(s, m, seed, args))]
        print(f"# {len(todo)} trials to run, {args.jobs} at a time")
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_one, cfg, out) for cfg, out in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                out, secs = fut.result()
                print(f"[{i}/{len(todo)}] {out}: {secs / 60:.1f} min", flush=True)
    results = collect(root)
    print(table(results))
    print(best_last_table(results))


if __name__ == "__main__":
    main()
