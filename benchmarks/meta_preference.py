"""What does CAAT's meta objective reward? Its per-sample preference, taken apart.

For a sample i of a training batch, the meta step's gradient with respect to the weights of
its three loss terms says which direction the meta objective wants for it:

    benefit_t(i) = -d(meta loss at the virtual weights) / d(w_t(i)),  t in {ce, kl, anti}

(the clean CE and the TRADES KL make up the adversarial side, the CE of the anti-adversarial
example the other). preference(i) = benefit_anti - benefit_ce - benefit_kl is what the
meta-net is trained on: > 0 means the objective would rather train i anti-adversarially.
The meta-net can only learn what this preference holds, so its AUC as a detector of the
scenario's noisy labels bounds what meta-learning can find, and its parts say where it
comes from. Ground-truth noise flags are read for this report only.

The probe runs at two points of the trials of `caat_ablation.py`: the ERM warm start CAAT
begins from, and each trial's final state (model, FRL multipliers, class-loss feature), on a
fixed set of training batches with a fresh meta batch each, and a virtual step at the
config's base learning rate (the schedule has decayed it to ~0 by the end).

    python benchmarks/meta_preference.py results/noise_imbalance/pair-0.4/caat/seed*
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from trainables import methods
from trainables.config import recorded_config, validate
from trainables.diagnostics import roc_auc
from trainables.meta import model_params, virtual_step
from trainables.methods.trades_common import weighted_trades_loss
from trainables.trial import (
    Problem,
    build_model,
    build_problem,
    cached_warm_start,
    load_state,
    method_data,
)


def preference_parts(method, batch: methods.Batch, lr: float) -> dict[str, np.ndarray]:
    """benefit_ce, benefit_kl, benefit_anti and the per-sample terms of one batch."""
    t = method.terms(batch, for_meta_step=True)
    kl, ce_anti = method.virtual_terms(t, t.out)
    w = {k: t.w[:, i].detach().clone().requires_grad_(True)
         for k, i in (("ce", 0), ("kl", 0), ("anti", 1))}
    m, cfg = method.multipliers, method.cfg
    virtual_loss = (weighted_trades_loss(t.ce, kl, m.c0[t.y], m.c1[t.y], cfg.method.beta,
                                         w["ce"], w["kl"])
                    + (w["anti"] * ce_anti).mean())
    virtual = virtual_step(virtual_loss, model_params(method.model), lr=lr,
                           sgd=method.meta.lookahead())
    meta = method.meta_objective()(virtual)
    grads = torch.autograd.grad(meta, list(w.values()))
    out = {f"benefit_{k}": -g.detach().numpy() for k, g in zip(w, grads, strict=True)}
    out.update(ce=t.ce.detach().numpy(), kl=kl.detach().numpy(),
               margin=t.feats[:, 3].numpy())
    return out


def probe(method, problem: Problem, lr: float, batches: int, batch_size: int,
          seed: int) -> pd.DataFrame:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(problem.train_y), generator=g)[:batches * batch_size]
    torch.manual_seed(seed)  # meta batches and attack starts
    frames = []
    for idx in order.split(batch_size):
        parts = preference_parts(method, methods.Batch(x=problem.train_x[idx],
                                                       y=problem.train_y[idx], idx=idx), lr)
        frames.append(pd.DataFrame({**parts, "noisy": problem.scenario.is_noisy[idx.numpy()]}))
    df = pd.concat(frames, ignore_index=True)
    df["preference"] = df.benefit_anti - df.benefit_ce - df.benefit_kl
    return df


def summary(df: pd.DataFrame) -> dict[str, float]:
    noisy = df.noisy.to_numpy(bool)
    adv = df.benefit_ce + df.benefit_kl
    out = {"n": len(df), "noisy": noisy.mean(),
           "AUC pref": roc_auc(df.preference, noisy),
           "anti wanted: noisy": (df.preference[noisy] > 0).mean(),
           "anti wanted: clean": (df.preference[~noisy] > 0).mean(),
           # Which part of the adversarial side carries the preference, and what it tracks.
           "AUC -benefit_ce": roc_auc(-df.benefit_ce, noisy),
           "AUC -benefit_kl": roc_auc(-df.benefit_kl, noisy),
           "AUC benefit_anti": roc_auc(df.benefit_anti, noisy),
           "|kl| share": float((df.benefit_kl.abs() / (df.benefit_ce.abs()
                                                        + df.benefit_kl.abs())).mean()),
           "rho(pref, CE)": spearmanr(df.preference, df.ce).statistic,
           "rho(pref, KL)": spearmanr(df.preference, df.kl).statistic,
           "rho(-adv, KL)": spearmanr(-adv, df.kl).statistic,
           "AUC CE": roc_auc(df.ce, noisy)}
    return {k: (round(float(v), 3) if v is not None else float("nan")) for k, v in out.items()}


def load_point(run_dir: Path, point: str):
    """(method, problem, lr) of a trial at its warm start or its final state."""
    state_dir = run_dir / "checkpoint"
    cfg = validate(recorded_config(json.loads((run_dir / "metrics.json").read_text())["config"]))
    device = torch.device("cpu")
    problem = build_problem(cfg, device)
    model = build_model(cfg, problem, device, initialise=False)
    method = methods.build(cfg.method.name, model, cfg, method_data(problem, device))
    if point == "final":
        state = load_state(state_dir)
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
    else:
        model.load_state_dict(cached_warm_start(cfg, problem, device))
    model.train()
    return method, problem, cfg.optim.lr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trial directories (caat)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--points", nargs="+", default=["warm_start", "final"],
                        choices=["warm_start", "final"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {' '.join(sys.argv)}")
    rows = []
    for run_dir in args.runs:
        for point in args.points:
            method, problem, lr = load_point(run_dir, point)
            df = probe(method, problem, lr, args.batches, args.batch_size, seed=0)
            rows.append({"run": str(run_dir), "point": point, **summary(df)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False))
        means = table.drop(columns="run").groupby("point", sort=False).mean()
        print("\nmean over runs\n" + means.round(3).to_string())


if __name__ == "__main__":
    main()
