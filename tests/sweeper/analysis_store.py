"""A real MLflow store (temporary SQLite) holding a sweep with known numbers, written exactly
as the sweeper's tracking contract says (experiment `caat-sweep/<name>`, one parent run, one
nested child run per trial with its tags, flattened params, per-epoch metrics and
`classwise.json`). The analysis tests compute every expected number by hand from KNOWN.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

METRIC_KEYS = ("natural_acc", "robust_acc", "worst_class_natural_acc", "worst_class_robust_acc",
               "class_natural_acc_std", "boundary_error")

SCENARIOS = {
    "clean": {"noise_type": "none", "noise_rate": 0.0, "imbalance_ratio": 1.0},
    "noisy20": {"noise_type": "uniform", "noise_rate": 0.2, "imbalance_ratio": 1.0},
    "lt10": {"noise_type": "none", "noise_rate": 0.0, "imbalance_ratio": 10.0},
}


def _runs(**per_metric):
    """{metric: [seed0, seed1, ...]} -> per-seed dicts (seeds numbered from 0)."""
    n = len(next(iter(per_metric.values())))
    return [{k: per_metric[k][i] for k in per_metric} for i in range(n)]


# Final (last-epoch) test metrics of the confirmation runs, per cell, by seed 0, 1, 2.
# boundary_error = natural - robust, as the trainer reports it.
CONFIRM = {
    ("clean", "erm"): _runs(natural_acc=[.90, .91, .89], robust_acc=[.05, .04, .06],
                            worst_class_natural_acc=[.70, .72, .68],
                            worst_class_robust_acc=[.00, .01, .00],
                            class_natural_acc_std=[.08, .07, .09],
                            boundary_error=[.85, .87, .83]),
    ("clean", "pgd_at"): _runs(natural_acc=[.80, .79, .81], robust_acc=[.40, .41, .39],
                               worst_class_natural_acc=[.55, .50, .60],
                               worst_class_robust_acc=[.20, .22, .18],
                               class_natural_acc_std=[.12, .13, .11],
                               boundary_error=[.40, .38, .42]),
    ("clean", "trades"): _runs(natural_acc=[.80, .82, .84], robust_acc=[.46, .45, .44],
                               worst_class_natural_acc=[.60, .62, .58],
                               worst_class_robust_acc=[.25, .24, .26],
                               class_natural_acc_std=[.10, .11, .12],
                               boundary_error=[.34, .37, .40]),
    ("clean", "caat"): _runs(natural_acc=[.83, .84, .88], robust_acc=[.44, .43, .45],
                             worst_class_natural_acc=[.66, .65, .70],
                             worst_class_robust_acc=[.28, .29, .30],
                             class_natural_acc_std=[.07, .08, .06],
                             boundary_error=[.39, .41, .43]),
    ("lt10", "trades"): _runs(natural_acc=[.70, .72], robust_acc=[.30, .31],
                              worst_class_natural_acc=[.30, .34],
                              worst_class_robust_acc=[.05, .07],
                              class_natural_acc_std=[.20, .18],
                              boundary_error=[.40, .41]),
    ("lt10", "caat"): _runs(natural_acc=[.74, .75, .79], robust_acc=[.31, .33, .35],
                            worst_class_natural_acc=[.40, .41, .45],
                            worst_class_robust_acc=[.10, .12, .11],
                            class_natural_acc_std=[.15, .14, .13],
                            boundary_error=[.43, .42, .44]),
}
# lt10/erm: only seed 1 finished (seed 2 still running) -> n = 1, one pair with TRADES.
LT10_ERM_SEED1 = dict(natural_acc=.80, robust_acc=.02, worst_class_natural_acc=.20,
                      worst_class_robust_acc=.00, class_natural_acc_std=.25, boundary_error=.78)

# noisy20 has no confirmation runs: each cell reports its best completed tuning run by
# val_robust_acc. (val_robust_acc, test metrics or None, outcome) per tuning trial.
NOISY_TUNE = {
    "erm": [(.02, dict(natural_acc=.70, robust_acc=.01, worst_class_natural_acc=.50,
                       worst_class_robust_acc=.00, class_natural_acc_std=.09,
                       boundary_error=.69), "completed"),
            (.03, dict(natural_acc=.72, robust_acc=.02, worst_class_natural_acc=.52,
                       worst_class_robust_acc=.00, class_natural_acc_std=.08,
                       boundary_error=.70), "completed"),  # <- best
            (.50, dict(natural_acc=.10, robust_acc=.10, worst_class_natural_acc=.0,
                       worst_class_robust_acc=.0, class_natural_acc_std=.3,
                       boundary_error=.0), "pruned"),  # higher metric, but pruned
            (None, None, "failed")],
    "trades": [(.30, dict(natural_acc=.74, robust_acc=.36, worst_class_natural_acc=.50,
                          worst_class_robust_acc=.20, class_natural_acc_std=.11,
                          boundary_error=.38), "completed"),
               (.35, dict(natural_acc=.73, robust_acc=.38, worst_class_natural_acc=.49,
                          worst_class_robust_acc=.21, class_natural_acc_std=.12,
                          boundary_error=.35), "completed"),  # <- best
               (None, None, "running")],
    "caat": [(.33, dict(natural_acc=.76, robust_acc=.37, worst_class_natural_acc=.55,
                        worst_class_robust_acc=.22, class_natural_acc_std=.10,
                        boundary_error=.39), "completed")],
}

NUM_CLASSES = 10

# CAAT's per-epoch direction diagnostics (MLflow step = epoch, 1-based) of the runs the analysis
# selects, per cell, by seed. clean and lt10 have no label noise: no frac_anti_noisy, no AUC.
# noisy20 (uniform 20%): frac_anti = .2 * frac_anti_noisy + .8 * frac_anti_clean.
# meta_grad_norm is logged as the trainer does, but no plot reads it.
DIRECTIONS = {
    ("clean", "caat"): [
        {"frac_anti": [.10, .20, .30], "frac_anti_clean": [.10, .20, .30]},
        {"frac_anti": [.15, .25, .40], "frac_anti_clean": [.15, .25, .40]},
        {"frac_anti": [.05, .30, .35], "frac_anti_clean": [.05, .30, .35]},
    ],
    ("lt10", "caat"): [
        {"frac_anti": [.20, .25, .30], "frac_anti_clean": [.20, .25, .30]},
        {"frac_anti": [.22, .26, .28], "frac_anti_clean": [.22, .26, .28]},
        {"frac_anti": [.18, .24, .32], "frac_anti_clean": [.18, .24, .32]},
    ],
    ("noisy20", "caat"): [
        {"frac_anti": [.48, .40, .34], "frac_anti_noisy": [.60, .80, .90],
         "frac_anti_clean": [.45, .30, .20], "anti_noisy_auc": [.55, .70, .85],
         "meta_pref_noisy_auc": [.52, .54, .56], "meta_grad_norm": [3.0, 2.0, 1.0]},
    ],
}
# The clean/caat tuning run is not selected (confirmation runs exist): its diagnostics must not
# reach the plots.
DECOY_DIRECTIONS = {"frac_anti": [.99, .99, .99], "frac_anti_clean": [.99, .99, .99]}
# One class without training samples in one epoch of one run (seed, epoch, class): NaN there.
EMPTY_CLASS = (1, 3, 9)


def class_frac_anti(seed: int, epoch: int, cls: int) -> float:
    if (seed, epoch, cls) == EMPTY_CLASS:
        return float("nan")
    return round(.05 * epoch + .02 * cls + .01 * seed, 4)


def class_mean_eps(seed: int, epoch: int, cls: int) -> float:
    if (seed, epoch, cls) == EMPTY_CLASS:
        return float("nan")
    return round(.1 * (1 + .1 * cls) + .001 * seed + .0001 * epoch, 6)


def class_directions(seed: int, epochs: int = 3) -> dict:
    """A CAAT run's per-class training diagnostics in classwise.json: histories + last epoch."""
    out = {}
    for key, value in (("train_class_frac_anti", class_frac_anti),
                       ("train_class_mean_eps", class_mean_eps)):
        history = [[value(seed, e, c) for c in range(NUM_CLASSES)] for e in range(1, epochs + 1)]
        out[f"{key}_by_epoch"] = history
        out[key] = history[-1]
    return out


def class_lists(m: dict) -> dict:
    """classwise.json of a run: per-class lists derived from its natural/robust accuracy."""
    out = {}
    for split in ("val", "test"):
        out[f"{split}_class_natural_acc"] = [round(m["natural_acc"] + 0.01 * (c - 4), 4)
                                             for c in range(NUM_CLASSES)]
        out[f"{split}_class_robust_acc"] = [round(m["robust_acc"] + 0.005 * (c - 4), 4)
                                            for c in range(NUM_CLASSES)]
    return out


class StoreWriter:
    """Writes runs the way sweeper.tracking does (contract in DESIGN / the analysis brief)."""

    def __init__(self, uri: str, artifacts: Path):
        self.client = MlflowClient(tracking_uri=uri)
        self.artifacts = artifacts
        self.counter = 0

    def sweep(self, name: str, metric: str = "val_robust_acc", mode: str = "max",
              tags: dict | None = None) -> tuple:
        """A sweep's experiment and parent run; `tags`: more parent tags (objectives,
        optuna_storage)."""
        exp = self.client.create_experiment(f"caat-sweep/{name}",
                                            artifact_location=str(self.artifacts / name))
        parent = self.client.create_run(exp, run_name=name, tags={
            "sweep": name, "role": "parent", "metric": metric, "mode": mode, **(tags or {})})
        with tempfile.TemporaryDirectory() as tmp:
            space = Path(tmp) / "space.yaml"
            space.write_text(f"name: {name}\n")
            self.client.log_artifact(parent.info.run_id, str(space))
        self.client.set_terminated(parent.info.run_id)
        return exp, parent.info.run_id

    def trial(self, exp: str, parent_id: str, sweep: str, scenario: str, method: str, seed: int,
              phase: str, outcome: str, test: dict | None = None, val_robust: float | None = None,
              epochs: int = 3, directions: dict | None = None,
              classwise_extra: dict | None = None, final_extra: dict | None = None,
              trial_id: str | None = None, tags: dict | None = None) -> str:
        """One trial run; `trial_id` replaces the generated one, `tags` adds tags
        (tuned_by on confirmation runs)."""
        self.counter += 1
        trial_id = trial_id or f"{sweep}_{self.counter:04d}"
        tags = {"mlflow.parentRunId": parent_id, "sweep": sweep, "role": "trial",
                "trial_id": trial_id, "cell": f"{scenario}/{method}", "scenario": scenario,
                "method": method, "seed": str(seed), "phase": phase, **(tags or {})}
        if outcome != "running":
            tags["outcome"] = outcome
        if outcome == "failed":
            tags["error"] = "RuntimeError: CUDA out of memory (simulated)"
        run = self.client.create_run(exp, run_name=trial_id, tags=tags)
        run_id = run.info.run_id
        factors = SCENARIOS[scenario]
        params = {"scenario.noise_type": factors["noise_type"],
                  "scenario.noise_rate": factors["noise_rate"],
                  "scenario.imbalance_ratio": factors["imbalance_ratio"],
                  "dataset.name": "fashion_mnist", "method.name": method, "method.eps": 0.1,
                  "runtime.seed": seed, "eval.steps": 20, "eval.eps": 0.1,
                  "optim.epochs": epochs}
        metrics = []
        if test is not None:
            # Earlier epochs carry decoy values: only the last step may be reported.
            for epoch in range(epochs):
                last = epoch == epochs - 1
                for key in METRIC_KEYS:
                    for split in ("val", "test"):
                        if split == "val" and key == "robust_acc":
                            continue  # the selection metric, below
                        value = test[key] if last else 0.011 * (epoch + 1)
                        metrics.append(Metric(f"{split}_{key}", value, 1000 + epoch, epoch))
                val = val_robust if val_robust is not None else test["robust_acc"]
                # Earlier epochs look best on the selection metric: selection must use the
                # last step, not the history's maximum.
                metrics.append(Metric("val_robust_acc", val if last else 0.99, 1000 + epoch,
                                      epoch))
                metrics.append(Metric("train_loss", 1.0 / (epoch + 1), 1000 + epoch, epoch))
            # Scalars only the last epoch reports (AutoAttack's, after training).
            metrics += [Metric(k, v, 1000 + epochs - 1, epochs - 1)
                        for k, v in (final_extra or {}).items()]
        # CAAT's diagnostics: {metric: one value per epoch}, step = epoch (1-based).
        for key, values in (directions or {}).items():
            metrics += [Metric(key, v, 2000 + e, e) for e, v in enumerate(values, start=1)]
        self.client.log_batch(run_id, metrics=metrics,
                              params=[Param(k, str(v)) for k, v in params.items()],
                              tags=[RunTag("mlflow.runName", trial_id)])
        if test is not None and outcome == "completed":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "classwise.json"
                # json writes NaN as NaN, as MLflow's log_dict does.
                path.write_text(json.dumps({**class_lists(test), **(classwise_extra or {})}))
                self.client.log_artifact(run_id, str(path))
        if outcome != "running":
            self.client.set_terminated(run_id, "FAILED" if outcome == "failed" else "FINISHED")
        return run_id


def build_store(root: Path) -> str:
    """The 'toy' sweep and a few edge-case sweeps; returns the tracking URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    w = StoreWriter(uri, root / "artifacts")

    exp, parent = w.sweep("toy")
    # clean: tuning runs that look great but must be ignored (confirmation runs exist).
    for method in ("erm", "pgd_at", "trades", "caat"):
        decoy = DECOY_DIRECTIONS if method == "caat" else None
        w.trial(exp, parent, "toy", "clean", method, 0, "tune", "completed",
                dict.fromkeys(METRIC_KEYS, 0.99), val_robust=0.99, directions=decoy)
    for (scenario, method), seeds in CONFIRM.items():
        for seed, test in enumerate(seeds):
            caat = method == "caat"
            w.trial(exp, parent, "toy", scenario, method, seed, "confirm", "completed", test,
                    directions=DIRECTIONS[scenario, method][seed] if caat else None,
                    classwise_extra=class_directions(seed) if caat else None)
    w.trial(exp, parent, "toy", "lt10", "erm", 1, "confirm", "completed", LT10_ERM_SEED1)
    w.trial(exp, parent, "toy", "lt10", "erm", 2, "confirm", "running")
    w.trial(exp, parent, "toy", "lt10", "mwn", 0, "tune", "failed")
    for method, trials in NOISY_TUNE.items():
        for seed, (val, test, outcome) in enumerate(trials):
            caat = method == "caat" and outcome == "completed"
            w.trial(exp, parent, "toy", "noisy20", method, seed, "tune", outcome, test,
                    val_robust=val,
                    directions=DIRECTIONS["noisy20", method][seed] if caat else None,
                    classwise_extra=class_directions(seed) if caat else None)

    # Nothing finished yet: two trials running, one failed.
    exp, parent = w.sweep("early")
    w.trial(exp, parent, "early", "clean", "caat", 0, "tune", "running")
    w.trial(exp, parent, "early", "clean", "trades", 0, "tune", "running")
    w.trial(exp, parent, "early", "clean", "erm", 0, "tune", "failed")

    # Just launched: the parent run and no trials.
    w.sweep("empty")

    # No TRADES at all: the paired tests are skipped, the rest is analysed. Its CAAT runs
    # logged no direction diagnostics (a trainer from before them): no caat_directions plot.
    exp, parent = w.sweep("notrades")
    for method in ("erm", "caat"):
        for seed, test in enumerate(CONFIRM[("clean", method)]):
            w.trial(exp, parent, "notrades", "clean", method, seed, "confirm", "completed",
                    test)
    return uri


# ------------------------------------------------------------------- AutoAttack (issue 12)

# AutoAttack's final metrics of the 'aa' sweep's confirmation runs (clean scenario), by seed
# 0, 1, 2. The gap is PGD's robust accuracy on AutoAttack's test subset minus AutoAttack's:
# TRADES's mean gap is 1 point (no alarm), CAAT's 5 points (the masking alarm). ERM's runs
# did not run AutoAttack: its AutoAttack columns are n/a.
AA_CONFIRM = {
    "trades": _runs(test_autoattack_acc=[.40, .41, .42],
                    test_worst_class_autoattack_acc=[.20, .21, .22],
                    test_pgd_autoattack_gap=[.01, .00, .02]),
    "caat": _runs(test_autoattack_acc=[.36, .37, .38],
                  test_worst_class_autoattack_acc=[.15, .17, .19],
                  test_pgd_autoattack_gap=[.05, .04, .06]),
}


def autoattack_class_list(aa: dict) -> list[float]:
    return [round(aa["test_autoattack_acc"] + 0.01 * (c - 4), 4) for c in range(NUM_CLASSES)]


def build_autoattack_store(root: Path) -> str:
    """Sweep 'aa' (the clean scenario's confirmation runs of CONFIRM, with AutoAttack's
    metrics for TRADES and CAAT) and sweep 'noaa' (the same runs without them)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    w = StoreWriter(uri, root / "artifacts")
    for sweep in ("aa", "noaa"):
        exp, parent = w.sweep(sweep)
        for method in ("erm", "trades", "caat"):
            for seed, test in enumerate(CONFIRM["clean", method]):
                aa = AA_CONFIRM[method][seed] if sweep == "aa" and method in AA_CONFIRM else {}
                extra = {"test_class_autoattack_acc": autoattack_class_list(aa)} if aa else {}
                w.trial(exp, parent, sweep, "clean", method, seed, "confirm", "completed",
                        test, final_extra=aa, classwise_extra=extra)
    return uri
