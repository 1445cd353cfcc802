"""`caat-sweep train`: one trial without Ray, into a directory (metrics.json, model.pt)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from trainables.config import same_config
from trainables.errors import CliError
from trainables.metric_names import BEST_EPOCH


def train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from trainables import models
    from trainables.config import load_config
    from trainables.trial import DirectoryReporter, run_trial

    cfg = load_config(args.config, args.set or ())
    if cfg.eval.test == "none":
        raise CliError("eval.test: none evaluates no test split, and `train` reports test "
                       "metrics; allowed here: every, final")
    out = Path(args.out)
    reporter = DirectoryReporter(out, on_report=lambda m: tqdm.write(format_epoch(m)))
    resume = check_out_dir(out, reporter, cfg.resolved(), force=args.force)
    # Nothing is created in OUT until the first epoch reports: bad data or scenario
    # settings fail before anything is written.
    if resume is not None:
        tqdm.write(f"resuming from {resume}")

    # Redirected to a file (nohup, a batch job), a bar redrawn 10 times a second would fill
    # the log: there it updates every 30 s.
    refresh = 0.1 if sys.stderr.isatty() else 30.0

    def progress(it, *, epoch: int, total: int):
        return tqdm(it, total=total, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                    unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr,
                    mininterval=refresh)

    result = run_trial(cfg, reporter, progress=progress)
    final = final_metrics(result.metrics)
    final["config"] = cfg.resolved()
    final["scenario"] = result.problem.scenario.summary()
    final["history"] = result.history
    (out / "metrics.json").write_text(json.dumps(final, indent=2))
    models.save_checkpoint(result.model, out / "model.pt")
    if result.best is not None and result.best.weights is not None:
        # The best epoch's weights by `eval.best_metric` (validation), beside the last's.
        models.save_checkpoint(result.best.model(result.model), out / "model_best.pt",
                               extra={"epoch": result.best.epoch})
    # The finished model and metrics replace the resumable state.
    shutil.rmtree(reporter.checkpoint_dir, ignore_errors=True)
    print(f"test natural acc {final['natural_acc']:.4f}  robust acc {final['robust_acc']:.4f}  "
          f"worst-class natural {final['worst_class_natural_acc']:.4f}  -> {out}/metrics.json")
    if "best_robust_acc" in final:
        print(f"best checkpoint (epoch {final['best_epoch']} by {cfg.eval.best_metric}): test "
              f"natural acc {final['best_natural_acc']:.4f}  robust acc "
              f"{final['best_robust_acc']:.4f}  -> {out}/model_best.pt")
    return 0


def check_out_dir(out: Path, reporter, config: dict[str, Any], force: bool) -> Path | None:
    """Refuse to overwrite a run of another config, finished or not, unless `force`; with
    `force` that run is discarded so the new one starts from scratch. Returns the checkpoint
    to resume from (None: start afresh)."""
    from trainables.trial import load_state

    finished = out / "metrics.json"
    resume = reporter.latest_checkpoint()
    if resume is not None and not same_config(load_state(resume)["config"], config):
        what = "an unfinished trial"
    elif resume is None and finished.is_file() and not same_config(_stored_config(finished),
                                                                   config):
        what = "a finished trial"
    else:
        return resume
    if not force:
        raise CliError(f"--out: {out} holds {what} of a different config; choose another "
                       "directory, or pass --force to replace it")
    shutil.rmtree(reporter.checkpoint_dir, ignore_errors=True)
    for name in ("metrics.json", "model.pt", "model_best.pt"):
        (out / name).unlink(missing_ok=True)
    return None


def _stored_config(metrics_file: Path) -> Any:
    try:
        return json.loads(metrics_file.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: not a run of this config


def final_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's top level: the last epoch's test metrics without the `test_` prefix
    (the best checkpoint's as `best_*`, with `best_epoch`)."""
    out = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")}
    if BEST_EPOCH in metrics:
        out[BEST_EPOCH] = metrics[BEST_EPOCH]
    out["val"] = {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}
    out["train"] = {k: v for k, v in metrics.items()
                    if not k.startswith(("test_", "val_")) and k != BEST_EPOCH}
    return out


def format_epoch(m: dict[str, Any]) -> str:
    parts = [f"epoch {m['epoch']}", f"loss {m['train_loss']:.4f}",
             f"{m['train_samples_per_s']:.0f} samples/s"]
    if "frac_anti" in m:
        parts.append(f"anti {m['frac_anti']:.2f}")
    if "frac_anti_noisy" in m:
        parts.append(f"(noisy {m['frac_anti_noisy']:.2f} clean {m['frac_anti_clean']:.2f})")
    for key, label in (("anti_noisy_auc", "auc"), ("meta_pref_noisy_auc", "meta-pref auc")):
        if key in m:
            parts.append(f"{label} {m[key]:.2f}")
    for split in ("val", "test"):
        if f"{split}_natural_acc" in m:
            parts.append(f"{split} nat {m[f'{split}_natural_acc']:.4f} "
                         f"rob {m[f'{split}_robust_acc']:.4f} "
                         f"worst {m[f'{split}_worst_class_natural_acc']:.4f}")
    return "  ".join(parts)


