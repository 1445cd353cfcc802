"""Search efficiency: per-cell TPE + ASHA against random search with and without ASHA, at
the same trials per cell, on cells of the theory sweep (issue 13, part 5).

Three searches, each a sweep (`sweeper.search.launch`, no confirmation), per search seed:
tpe_asha (the space's settings: TPE, ASHA), random_asha (`optuna.sampler: random`, same
ASHA) and random_full (random, `asha.enabled: false`). With the same seed, random_asha and
random_full draw the same configs in the same order (as TPE does in its startup trials):
the comparisons are paired, and only ASHA, or TPE's model, makes them differ.

Each cell's trials are read in the order they were handed out (Optuna trial number): a
search stopped after handing out k trials has spent exactly those k trials' epochs, and the
sampler's k-th draw saw only earlier trials. Finish order would undercount: a trial ASHA
stops finishes before trials handed out ahead of it, whose epochs were spent already. A
trial's epochs are the last step it logged to MLflow (the study's intermediate values lack
the result the scheduler stopped a trial on: Ray hands that one to the searcher only as the
trial's end); only a COMPLETE trial's value counts, never a pruned trial's partial one.

The criterion: TPE+ASHA gets within TOLERANCE of the best value random_full finds with at
most BUDGET_SHARE of random_full's trial-epochs (medians over the seeds).

    python benchmarks/search_efficiency.py                       # DEFAULT_CELLS, 3 seeds
    python benchmarks/search_efficiency.py --cells '*/caat,clean_ir-1_eps-0.1/*' --seeds 1

--out keeps the sweeps and each search's wall time: the same command again reuses finished
searches and resumes an interrupted one (flagged in the output: a resumed study reseeds its
sampler, so its remaining trials are no longer paired, and its wall time is its last part's).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml
from epoch_time import cpu_name
from optuna.trial import TrialState

from sweeper import storage as st
from sweeper.contract import RAY_TRIAL_ATTR
from sweeper.tracking import Tracker

THEORY = Path(__file__).resolve().parents[1] / "search_spaces" / "theory.yaml"
SEARCHES = {"tpe_asha": {}, "random_asha": {"optuna": {"sampler": "random"}},
            "random_full": {"optuna": {"sampler": "random"}, "asha": {"enabled": False}}}
# Every method in the clean eps-0.1 scenario, and CAAT (the largest space) in every
# scenario: 11 of the 31 cells, 3 x 3 searches in about 21 minutes on 2 cores (pilot: 37 s
# per cell and seed for the three searches, 5 s per sweep).
DEFAULT_CELLS = "clean_ir-1_eps-0.1/*,*/caat"
SEED_STRIDE = 1000  # search seeds 0, 1000, ...: a sampler's seed is optuna.seed + cell index
TOLERANCE = 0.01
BUDGET_SHARE = 0.5

Curve = list[tuple[int, float | None]]  # (cumulative trial-epochs, best value so far)


@dataclass(frozen=True)
class TrialRecord:
    epochs: int  # epochs the trial ran
    value: float | None  # its selection metric if it COMPLETED, else None


def records(trials, epochs: dict[str, int]) -> list[TrialRecord]:
    """Optuna trials (FrozenTrial) as records, in handed-out order; `epochs`: by Ray trial
    id. A pruned trial's value (Optuna keeps its last intermediate one) is dropped."""
    return [TrialRecord(epochs[t.user_attrs[RAY_TRIAL_ATTR]],
                        t.value if t.state == TrialState.COMPLETE else None)
            for t in sorted(trials, key=lambda t: t.number)]


def best_so_far(trials: list[TrialRecord], mode: str = "max") -> Curve:
    """(cumulative trial-epochs, best completed value so far) after each trial, in order."""
    sign = 1 if mode == "max" else -1
    spent, best, curve = 0, None, []
    for t in trials:
        spent += t.epochs
        if t.value is not None and (best is None or sign * t.value > sign * best):
            best = t.value
        curve.append((spent, best))
    return curve


def best_within(curve: Curve, budget: float) -> float | None:
    """The best value known once no more than `budget` trial-epochs are spent."""
    known = [best for spent, best in curve if spent <= budget]
    return known[-1] if known else None


def epochs_to_reach(curve: Curve, target: float, mode: str = "max") -> int | None:
    """Trial-epochs spent when the best value first reaches `target`; None: never."""
    sign = 1 if mode == "max" else -1
    return next((spent for spent, best in curve
                 if best is not None and sign * best >= sign * target), None)


def median(values) -> float | None:
    """Median of the known values; None if there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def verdict(tpe: list[Curve], full: list[Curve], mode: str = "max",
            others: dict[str, list[Curve]] | None = None) -> dict:
    """The criterion in one cell, from one curve per seed of tpe_asha and random_full:
    target (random_full's final best), budget (its trial-epochs), tpe_asha's best within
    BUDGET_SHARE of the budget and its gap to the target (negative: short of it), `reach`:
    the share of the budget spent when first within TOLERANCE of the target, per search
    (inf: never), and `met`. Medians over seeds; a seed that never gets there counts as
    infinite."""
    sign = 1 if mode == "max" else -1
    target = median(c[-1][1] for c in full)
    budget = statistics.median(c[-1][0] for c in full)
    at_share = median(best_within(c, BUDGET_SHARE * budget) for c in tpe)
    reach = {}
    for search, curves in {"tpe_asha": tpe, **(others or {})}.items():
        spent = [epochs_to_reach(c, target - sign * TOLERANCE, mode) for c in curves]
        reach[search] = statistics.median(math.inf if e is None else e / budget for e in spent)
    return {"target": target, "budget": budget, "at_share": at_share,
            "gap": None if at_share is None else sign * (at_share - target),
            "reach": reach, "met": reach["tpe_asha"] <= BUDGET_SHARE}


# ------------------------------------------------------------------------------ sweeps

def subset_space(raw: dict, cell_ids: list[str], scenario_names: list[str]) -> dict:
    """The theory space restricted to these cells (scenario names in scenario order)."""
    out = copy.deepcopy(raw)
    scenarios = []
    for sc, name in zip(raw["scenarios"], scenario_names, strict=True):
        methods = [m for m in sc.get("methods", raw["methods"]) if f"{name}/{m}" in cell_ids]
        if methods:
            scenarios.append({**sc, "methods": methods})
    out["scenarios"] = scenarios
    return out


def search_space(base: dict, search: str, seed: int, trials: int, startup: int) -> dict:
    """One search's space; `startup`: TPE's n_startup_trials (tpe_asha only)."""
    space = copy.deepcopy(base)
    space.update(name=f"{search}-s{seed}", trials_per_cell=trials, confirm={"seeds": []})
    for key, value in SEARCHES[search].items():
        space[key] = {**space.get(key, {}), **value}
    space["optuna"] = {**space.get("optuna", {}), "seed": seed}
    if search == "tpe_asha":
        space["optuna"]["n_startup_trials"] = startup
    return space


def run_search(space: dict, out: Path, jobs: int) -> float:
    """Run (or resume, or reuse) one search's sweep; its wall time in seconds."""
    from sweeper.search import SweepOptions, launch, resume

    name, storage = space["name"], str(out / "sweeps")
    text = yaml.safe_dump(space, sort_keys=False)
    walls = out / "walls.json"
    wall = json.loads(walls.read_text()) if walls.exists() else {}
    options = SweepOptions(verbose=0, num_cpus=jobs)
    t0 = time.perf_counter()
    if st.sweep_exists(storage, name):
        manifest = st.load_manifest(storage, name)
        if manifest.space_text != text:
            raise SystemExit(f"--out {out}: sweep {name} ran other settings; choose another --out")
        if manifest.state == "done":
            return wall[name]
        # A resumed study reseeds its sampler: the trials left are drawn afresh, unpaired.
        wall["resumed"] = sorted({*wall.get("resumed", []), name})
        resume(name, storage=storage, options=options)
    else:
        path = out / "spaces" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        launch(str(path), name=name, storage=storage,
               tracking_uri=f"sqlite:///{out / 'mlflow.db'}", options=options)
    if st.load_manifest(storage, name).state != "done":
        raise SystemExit(f"sweep {name} stopped early; rerun the same command to continue")
    wall[name] = time.perf_counter() - t0
    walls.write_text(json.dumps(wall, indent=1))
    return wall[name]


def read_sweep(out: Path, name: str, cells: list[str]) -> dict[str, list[TrialRecord]]:
    """Each cell's tuning trials, in handed-out order: values from the cell's Optuna study,
    epochs from MLflow (the last step the trial logged)."""
    manifest = st.load_manifest(str(out / "sweeps"), name)
    tracker = Tracker(manifest.tracking_uri, name)
    epochs = {r.data.tags["trial_id"]: tracker.last_step(r.info.run_id)
              for r in tracker.trial_runs()}
    return {cell: records(optuna.load_study(study_name=cell, storage=manifest.studies_url)
                          .get_trials(deepcopy=False), epochs) for cell in cells}


# ------------------------------------------------------------------------------ report

def fmt(x: float | None, spec: str = ".3f") -> str:  # None: no value; inf: never
    return "-" if x is None else "never" if x == math.inf else format(x, spec)


def report(curves: dict, cells: list[str], walls: dict, mode: str) -> None:
    """curves[search][cell] = one best-so-far curve per seed."""
    print(f"\n{'search':<12} {'best (mean over cells)':>22} {'trial-epochs':>13} {'wall s':>8}")
    for search, per_cell in curves.items():
        best = statistics.mean(median(c[-1][1] for c in per_cell[cell]) for cell in cells)
        epochs = statistics.median(sum(runs) for runs in zip(*(
            [c[-1][0] for c in per_cell[cell]] for cell in cells), strict=True))
        wall = statistics.median(walls[search])
        print(f"{search:<12} {best:>22.4f} {epochs:>13.0f} {wall:>8.0f}")
    share = f"{BUDGET_SHARE:.0%}"
    print(f"\ncriterion: tpe_asha within {TOLERANCE} of random_full's best with <= {share} of "
          f"random_full's trial-epochs (medians over seeds)")
    print(f"{'cell':<44} {'random_full':>11} {'tpe@' + share:>8} {'gap':>7} {'tpe reach':>9} "
          f"{'rand_asha reach':>15}  met")
    found = [verdict(curves["tpe_asha"][cell], curves["random_full"][cell], mode,
                     {"random_asha": curves["random_asha"][cell]}) for cell in cells]
    for cell, v in zip(cells, found, strict=True):
        reach = v["reach"]
        print(f"{cell:<44} {fmt(v['target']):>11} {fmt(v['at_share']):>8} "
              f"{fmt(v['gap'], '+.3f'):>7} {fmt(reach['tpe_asha'], '.0%'):>9} "
              f"{fmt(reach['random_asha'], '.0%'):>15}  {'yes' if v['met'] else 'NO'}")
    gap = statistics.mean(v["gap"] for v in found if v["gap"] is not None)
    print(f"overall: met in {sum(v['met'] for v in found)}/{len(cells)} cells; averaged over "
          f"cells, tpe_asha's best at {share} of the budget is {gap:+.4f} from random_full's "
          f"best ({'within' if gap >= -TOLERANCE else 'NOT within'} {TOLERANCE})")
    print(f"gap: tpe_asha's best at {share} of random_full's trial-epochs minus random_full's "
          f"best (negative: worse); reach: share of random_full's trial-epochs spent when "
          f"first within {TOLERANCE} of its best")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=DEFAULT_CELLS,
                        help="comma-separated globs of theory cell ids (scenario/method)")
    parser.add_argument("--trials-per-cell", type=int, default=None,
                        help="default: the theory space's")
    parser.add_argument("--seeds", type=int, default=3,
                        help=f"search seeds: 0, {SEED_STRIDE}, ... (optuna.seed)")
    parser.add_argument("--out", default="results/search_efficiency")
    parser.add_argument("--n-startup-trials", type=int, default=None,
                        help="tpe_asha's TPE startup trials (default: the space's)")
    parser.add_argument("--jobs", type=int, default=2, help="CPUs for Ray (1 per trial)")
    args = parser.parse_args()

    from sweeper.spaces import load_space

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    plan = load_space(THEORY)
    globs = args.cells.split(",")
    cells = [c.id for c in plan.cells if any(fnmatch.fnmatch(c.id, g) for g in globs)]
    if not cells:
        parser.error(f"--cells: matches none of {', '.join(c.id for c in plan.cells)}")
    base = subset_space(yaml.safe_load(THEORY.read_text()), cells,
                        list(dict.fromkeys(c.scenario for c in plan.cells)))
    trials = args.trials_per_cell or plan.space.trials_per_cell
    startup = (plan.space.optuna.n_startup_trials if args.n_startup_trials is None
               else args.n_startup_trials)
    seeds = [SEED_STRIDE * k for k in range(args.seeds)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metric, mode = plan.space.selection.primary
    asha = plan.space.asha
    print(f"# command: python benchmarks/search_efficiency.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}, python "
          f"{platform.python_version()}; Ray with {args.jobs} CPUs, 1 per trial; load average "
          f"at start {os.getloadavg()[0]:.1f}")
    print(f"# budget: {len(cells)} theory cells x {trials} trials x {len(seeds)} search seeds "
          f"{seeds} x {len(SEARCHES)} searches; {plan.cells[0].epochs} epochs a full trial; "
          f"ASHA grace {asha.grace_period}, rf {asha.reduction_factor:g}; TPE n_startup_trials "
          f"{startup}; selection {metric} ({mode}) on validation")
    if startup >= trials:
        print(f"# note: n_startup_trials {startup} >= {trials} trials per cell: TPE draws every "
              "trial at random (its startup phase), from the same seed as random_asha")
    print(f"# cells: {', '.join(cells)}")
    import ray

    ray.init(num_cpus=args.jobs, include_dashboard=False, log_to_driver=False)  # not timed
    t0 = time.perf_counter()
    walls: dict[str, list[float]] = {s: [] for s in SEARCHES}
    for seed in seeds:  # seed by seed: an interrupted run leaves whole seeds to report on
        for s in SEARCHES:
            walls[s].append(run_search(search_space(base, s, seed, trials, startup), out,
                                       args.jobs))
    runs = {(s, seed): read_sweep(out, f"{s}-s{seed}", cells) for s in SEARCHES for seed in seeds}
    curves = {s: {cell: [best_so_far(runs[s, seed][cell], mode) for seed in seeds]
                  for cell in cells} for s in SEARCHES}
    report(curves, cells, walls, mode)
    if resumed := json.loads((out / "walls.json").read_text()).get("resumed"):
        print(f"# resumed after an interruption: {', '.join(resumed)} (their remaining trials "
              "drew other configs than the other searches' same seed; wall time: last part)")
    print(f"# this run's wall time {time.perf_counter() - t0:.0f} s (a reused search's wall "
          f"time is its own run's); load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
