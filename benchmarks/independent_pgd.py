"""An independent L-inf PGD, to cross-check the robust accuracy caat-sweeper reports.

Written without any of `trainables.attacks`: its own random start, its own gradient call
(`loss.backward()` on a leaf input), its own projection. If both agree within a point on
the same model and test set, the reported robust accuracy is not an artefact of our attack.

    python benchmarks/independent_pgd.py RUN_DIR [RUN_DIR ...]

RUN_DIR is a `caat-sweep train --out` directory, or a trial directory of
benchmarks/noise_imbalance_table.py (model.pt and metrics.json); the test split (or the
trial's fixed `dataset.test_size` subset) is reloaded from the config in metrics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def independent_pgd_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                             eps: float, alpha: float, iters: int, seed: int = 1234,
                             chunk: int = 250) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for i in range(0, len(y), chunk):
        xs, ys = x[i:i + chunk].clone(), y[i:i + chunk]
        noise = (torch.rand(xs.shape, generator=gen) * 2 - 1) * eps
        adv = (xs + noise.to(xs.device)).clamp(0, 1)
        for _ in range(iters):
            adv = adv.detach().requires_grad_(True)
            F.cross_entropy(model(adv), ys, reduction="sum").backward()
            adv = adv.detach() + alpha * adv.grad.sign()
            adv = torch.min(torch.max(adv, xs - eps), xs + eps).clamp(0, 1)
        with torch.no_grad():
            hits += (model(adv).argmax(1) == ys).sum().item()
    return hits / len(y)


def main() -> None:
    from trainables.config import load_config, recorded_config
    from trainables.data import load
    from trainables.models import load_checkpoint
    from trainables.problem import evaluated_test_split

    for run in sys.argv[1:]:
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        cfg = load_config(recorded_config(metrics["config"]))
        model = load_checkpoint(Path(run) / "model.pt")
        test_x, test_y = evaluated_test_split(cfg, load(cfg.dataset, seed=cfg.runtime.seed))
        acc = independent_pgd_accuracy(model, test_x, test_y, eps=cfg.eval_eps,
                                       alpha=cfg.eval_step_size, iters=cfg.eval.steps)
        print(f"{run}: method {cfg.method.name}, eps {cfg.eval_eps:.4f}, PGD-{cfg.eval.steps}: "
              f"reported robust acc {metrics['robust_acc']:.4f}, independent {acc:.4f}, "
              f"difference {100 * (acc - metrics['robust_acc']):+.2f} points")


if __name__ == "__main__":
    main()
