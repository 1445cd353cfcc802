"""CAAT ablation: what does meta-learning add to the adversarial / anti-adversarial split?

Same budget and scenarios as `noise_imbalance_table.py` (Fashion-MNIST, a 5000-image
training subset, 40% pair noise and imbalance ratio 10, small_cnn, 5 epochs, K=5, one shared
ERM warm-start epoch, PGD-20 on a fixed 5000-image test subset), three seeds, nothing tuned.
Variants (all `method.*` knobs; everything else, bounds and FRL multipliers included, equal):

    trades, frl       references
    caat_original     the original's meta-learning: random meta-net init, T 0.001 with the
                      gradient through that saturated softmax, train-mode BatchNorm, a meta
                      step every 20 batches (as the comparison table ran it before)
    caat              the current defaults (trainables/config.py)
    caat_random       each sample anti with probability anti_fraction, drawn every batch
    caat_loss_rank    the anti_fraction of highest clean loss within each observed class
    caat_x_*          settings tried while choosing the defaults (`--variants explored`)
    *_class_bound     FRL's class errors measured at each class's widened bound instead of
                      the evaluation bound (`--variants measure`)

`caat_random` and `caat_loss_rank` use anti_fraction = the mean frac_anti of `caat` in that
scenario (over its epochs and seeds), so they differ from it only in *which* samples go anti;
they run after `caat` has finished (and not at all where `caat` sent no sample anti: that is
the same training). `caat_x_random_lr1e-2` and `caat_x_loss_rank_lr1e-2` do the same against
`caat_x_lr1e-2_i5`, a meta-net fast enough to move the split at this budget.

Each trial writes RESULTS/<scenario>/<variant>/seed<k>/metrics.json (the layout of
noise_imbalance_table.py, so `trades`, `frl` and `caat` are shared with it); a finished trial
of the same config is skipped, so an interrupted run continues where it stopped.

    python benchmarks/caat_ablation.py --out results/noise_imbalance --jobs 2
    python benchmarks/caat_ablation.py --out results/noise_imbalance --variants explored
    python benchmarks/caat_ablation.py --out results/noise_imbalance --table-only --split val
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from noise_imbalance_table import (
    SCENARIOS,
    collect,
    is_done,
    markdown_rows,
    run_one,
    trial_config,
)


@dataclass(frozen=True)
class Variant:
    method: str
    knobs: dict = field(default_factory=dict)
    # anti_fraction matched to this variant's mean frac_anti (random / loss_rank policies)
    matched_to: str | None = None


# The original's meta-learning, as this project ran it before the split was made learnable.
ORIGINAL = {"meta_init": "random", "temperature": 0.001, "meta_temperature": None,
            "meta_norm": "batch", "meta_interval": 20, "meta_lr": 1e-3}

VARIANTS = {
    "trades": Variant("trades"),
    "frl": Variant("frl"),
    "caat_original": Variant("caat", ORIGINAL),
    "caat": Variant("caat"),
    "caat_random": Variant("caat", {"direction_policy": "random"}, matched_to="caat"),
    "caat_loss_rank": Variant("caat", {"direction_policy": "loss_rank"}, matched_to="caat"),
    # The same two at the share a faster meta-net (meta lr 1e-2) sends anti: which samples
    # it picks against random ones and the highest-loss ones, at an equal share.
    "caat_x_random_lr1e-2": Variant("caat", {"direction_policy": "random"},
                                    matched_to="caat_x_lr1e-2_i5"),
    "caat_x_loss_rank_lr1e-2": Variant("caat", {"direction_policy": "loss_rank"},
                                       matched_to="caat_x_lr1e-2_i5"),
}

# Settings tried while choosing the defaults (by validation metrics only). Straight-through
# at meta temperature 1, adversarial init and running feature statistics in all of them.
_NEW = {"meta_init": "adversarial", "meta_temperature": 1.0, "meta_norm": "running"}
EXPLORED = {
    "caat_x_lr1e-3_i5": Variant("caat", {**_NEW, "meta_lr": 1e-3, "meta_interval": 5}),
    "caat_x_lr1e-2_i5": Variant("caat", {**_NEW, "meta_lr": 1e-2, "meta_interval": 5}),
    "caat_x_lr1e-4_i5": Variant("caat", {**_NEW, "meta_lr": 1e-4, "meta_interval": 5}),
    # The same with a quarter of the meta steps (a meta step costs ~5 TRADES batches).
    "caat_x_lr1e-4_i20": Variant("caat", {**_NEW, "meta_lr": 1e-4, "meta_interval": 20}),
}
# Where FRL's class errors are measured (`method.frl_measure`): the references' evaluation
# bound is the default run as `frl` and `caat`; these measure each class at its own widened
# bound, as this project did before (`--variants measure`; chosen between on val).
MEASURE = {
    "frl_class_bound": Variant("frl", {"frl_measure": "class_bound"}),
    "caat_class_bound": Variant("caat", {"frl_measure": "class_bound"}),
}
GROUPS = {"explored": EXPLORED, "measure": MEASURE}
ALL = {**VARIANTS, **EXPLORED, **MEASURE}
# What a plain run runs and shows, in table order.
DEFAULT = ["trades", "frl", "caat_original", "caat", "caat_random", "caat_loss_rank",
           "caat_x_lr1e-2_i5", "caat_x_random_lr1e-2", "caat_x_loss_rank_lr1e-2"]

COLUMNS = {"natural_acc": "natural", "robust_acc": "robust",
           "worst_class_natural_acc": "worst nat", "worst_class_robust_acc": "worst rob"}
# AutoAttack `fast` on 1000 test images (benchmarks/autoattack_trials.py); test split only.
AA_COLUMNS = {"autoattack_acc": "AA", "pgd_autoattack_gap": "PGD-AA gap"}
DIAGNOSTICS = {"frac_anti_first": "anti 1st", "frac_anti_last": "anti last",
               "anti_noisy_auc_last": "AUC last", "meta_pref_noisy_auc_last": "pref AUC"}


def matched_fraction(df: pd.DataFrame, scenario: str, seeds: list[int],
                     variant: str = "caat") -> float | None:
    """A variant's mean frac_anti over its epochs and seeds, once every seed has finished."""
    rows = df[(df.scenario == scenario) & (df.method == variant)]
    if sorted(int(s.removeprefix("seed")) for s in rows.seed) != sorted(seeds):
        return None
    return round(float(rows.frac_anti_mean.mean()), 3)


def planned(names: list[str], args: argparse.Namespace, root: Path,
            matched_only: bool) -> list[tuple[dict, str]]:
    """(config, out dir) of the unfinished trials of these variants."""
    df = collect(root)
    todo = []
    for scenario in args.scenarios:
        for name in names:
            variant = ALL[name]
            if (variant.matched_to is not None) != matched_only:
                continue
            knobs = dict(variant.knobs)
            if variant.matched_to is not None:
                fraction = (matched_fraction(df, scenario, args.seeds, variant.matched_to)
                            if len(df) else None)
                if fraction is None:
                    print(f"# {scenario}/{name}: waits for every seed of {variant.matched_to}",
                          flush=True)
                    continue
                if fraction == 0.0:
                    # Nobody anti-adversarial: the same training as the variant it matches.
                    print(f"# {scenario}/{name}: {variant.matched_to} sent no sample anti "
                          "(anti_fraction 0 = the same training); not run", flush=True)
                    continue
                knobs["anti_fraction"] = fraction
            for seed in args.seeds:
                cfg = trial_config(scenario, variant.method, seed, args, knobs)
                out = root / scenario / name / f"seed{seed}"
                if not is_done(out, cfg):
                    todo.append((cfg, str(out)))
    return todo


def run(todo: list[tuple[dict, str]], jobs: int) -> None:
    print(f"# {len(todo)} trials to run, {jobs} at a time", flush=True)
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_one, cfg, out) for cfg, out in todo]
        for i, fut in enumerate(as_completed(futures), 1):
            out, secs = fut.result()
            print(f"[{i}/{len(todo)}] {out}: {secs / 60:.1f} min", flush=True)


def table(df: pd.DataFrame, names: list[str], split: str) -> str:
    prefix = "val_" if split == "val" else ""
    shown = COLUMNS | (AA_COLUMNS if split == "test" else {})
    columns = {prefix + k: 1 for k in shown} | dict.fromkeys(DIAGNOSTICS, 2)
    lines = []
    for scenario, block in df.groupby("scenario", sort=False):
        lines.append(f"\n{scenario} ({split} accuracy %, mean ± std over seeds; frac_anti and "
                     "AUCs of the training samples)\n")
        lines.append("| variant | n | " + " | ".join(shown.values()) + " | "
                     + " | ".join(DIAGNOSTICS.values()) + " | min/trial |")
        lines.append("|---|---|" + "---|" * (len(shown) + len(DIAGNOSTICS) + 1))
        lines += markdown_rows(block, names, columns)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/noise_imbalance")
    parser.add_argument("--variants", nargs="+", default=DEFAULT,
                        help=f"names, or 'explored' for {', '.join(EXPLORED)}, or 'measure' "
                             f"for {', '.join(MEASURE)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--train-size", type=int, default=5000)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="trials run in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="which split's accuracies the table shows (defaults are "
                             "chosen on val)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    names = [n for v in args.variants for n in GROUPS.get(v, [v])]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: "
                     f"{', '.join([*GROUPS, *ALL])}")
    root = Path(args.out)
    print(f"# {' '.join(sys.argv)}  ({os.cpu_count()} cores)")
    if not args.table_only:
        run(planned(names, args, root, matched_only=False), args.jobs)
        # The matched variants need caat's frac_anti: planned only now.
        run(planned(names, args, root, matched_only=True), args.jobs)
    df = collect(root)
    print(table(df[df.method.isin(names) & df.scenario.isin(args.scenarios)], names,
                args.split))
    for scenario in args.scenarios:
        for target in sorted({ALL[n].matched_to for n in names if ALL[n].matched_to}):
            fraction = matched_fraction(df, scenario, args.seeds, target) if len(df) else None
            if fraction is not None:
                print(f"# {scenario}: anti_fraction matched to {target}: {fraction}")


if __name__ == "__main__":
    main()
