import math

import pytest
import torch
from resume_support import Interrupt, StopAfter, flat_tensors
from trial_support import tiny_config

from trainables import methods
from trainables.config import load_config
from trainables.methods.base import Method, StepResult
from trainables.metric_names import SCALAR_METRICS
from trainables.trial import (
    DirectoryReporter,
    NonFiniteLossError,
    batches,
    epoch_generator,
    load_state,
    lr_at,
    run_trial,
)


def test_every_epoch_reports_design_metric_names(tmp_path, fmnist_small):
    seen = []
    reporter = DirectoryReporter(tmp_path, on_report=seen.append)
    result = run_trial(tiny_config(), reporter, splits=fmnist_small)
    assert [m["epoch"] for m in seen] == [1, 2]
    for m in seen:
        for split in ("val", "test"):
            for name in SCALAR_METRICS:
                assert 0 <= m[f"{split}_{name}"] <= 1 or name == "boundary_error"
            assert len(m[f"{split}_class_natural_acc"]) == 10
        assert m["train_loss"] > 0 and m["train_samples_per_s"] > 0
    # The final evaluation covers the whole test split; intermediate ones a capped subset.
    assert len(result.problem.test_y) == 1000
    assert result.metrics["test_natural_acc"] > 0.5  # it learnt something real
    assert result.model.training is False
    assert load_state(reporter.checkpoint_dir)["epoch"] == 2


def test_eval_test_final_evaluates_test_only_at_the_last_epoch(tmp_path, fmnist_small):
    seen = []
    cfg = tiny_config(optim={"epochs": 3}, eval={"steps": 2, "max_samples": 200,
                                                 "test": "final"})
    run_trial(cfg, DirectoryReporter(tmp_path, on_report=seen.append), splits=fmnist_small)
    assert [("val_robust_acc" in m, "test_robust_acc" in m) for m in seen] == [
        (True, False), (True, False), (True, True)]
    seen.clear()
    cfg["eval"]["test"] = "none"
    run_trial(cfg, DirectoryReporter(tmp_path / "none", on_report=seen.append),
              splits=fmnist_small)
    assert [("val_robust_acc" in m, "test_robust_acc" in m) for m in seen] == [
        (True, False)] * 3


@pytest.mark.parametrize("method", ["pgd_at", "trades", "caat"])
def test_resume_equals_an_uninterrupted_run(tmp_path, fmnist_small, method):
    # CAAT: meta steps every 3 batches, so the meta-net, its Adam state, the multipliers
    # and the class-loss feature all carry state across the interruption.
    knobs = {"meta_interval": 3} if method == "caat" else {}
    cfg = tiny_config(method={"name": method, **knobs}, optim={"epochs": 3})
    straight = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    with pytest.raises(Interrupt):
        run_trial(cfg, StopAfter(tmp_path / "b", 1), splits=fmnist_small)
    resumed = run_trial(cfg, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert resumed.history[0]["train_loss"] == straight.history[0]["train_loss"]
    for key in ("train_loss", "test_robust_acc", "val_natural_acc"):
        assert resumed.metrics[key] == straight.metrics[key]
    a = flat_tensors(load_state(tmp_path / "a" / "checkpoint")["method"])
    b = flat_tensors(load_state(tmp_path / "b" / "checkpoint")["method"])
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        assert same, k
    if method == "caat":
        assert {"meta.net.net.1.weight", "meta.optimizer.state.0.exp_avg", "meta.batches",
                "multipliers.lam", "class_mean_loss"} <= set(a)
        # The per-class diagnostics' history survives the interruption too.
        for key in ("train_class_frac_anti_by_epoch", "train_class_mean_eps_by_epoch"):
            assert len(resumed.metrics[key]) == 3
            assert resumed.metrics[key] == straight.metrics[key]


def test_same_seed_same_result_other_seed_differs(tmp_path, fmnist_small):
    runs = [run_trial(tiny_config(runtime={"seed": s}, optim={"epochs": 1}),
                      DirectoryReporter(tmp_path / str(i)), splits=fmnist_small)
            for i, s in enumerate([3, 3, 4])]
    assert runs[0].metrics["train_loss"] == runs[1].metrics["train_loss"]
    assert runs[0].metrics["train_loss"] != runs[2].metrics["train_loss"]


class Exploding(Method):
    name = "exploding_test_method"

    def step(self, batch, lr):
        loss = self.model(batch.x).sum() * 0
        return StepResult(loss + (float("nan") if self.calls() > 3 else 1.0))

    def calls(self):
        self.n = getattr(self, "n", 0) + 1
        return self.n


def test_non_finite_loss_names_the_epoch(tmp_path, fmnist_small, monkeypatch):
    monkeypatch.setitem(methods.METHODS.table, Exploding.name, Exploding)
    cfg = tiny_config(method={"name": Exploding.name})
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 4: training loss is nan"):
        run_trial(cfg, DirectoryReporter(tmp_path), splits=fmnist_small)


def test_lr_schedules():
    assert lr_at("cosine", 0.1, 0.0) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 0.5) == pytest.approx(0.05)
    assert lr_at("step", 0.1, 0.49) == pytest.approx(0.1)
    assert lr_at("step", 0.1, 0.5) == pytest.approx(0.01)
    assert lr_at("step", 0.1, 0.8) == pytest.approx(0.001)
    assert lr_at("constant", 0.1, 0.9) == 0.1
    assert not math.isnan(lr_at("cosine", 0.1, 0.999))


def test_batches_cover_each_sample_once_and_replay_per_epoch():
    g = lambda e: epoch_generator(1, e, 0, torch.device("cpu"))  # noqa: E731
    first = torch.cat(list(batches(103, 10, g(0))))
    assert len(first) == 100 and len(set(first.tolist())) == 100  # last partial batch dropped
    assert torch.equal(first, torch.cat(list(batches(103, 10, g(0)))))
    assert not torch.equal(first, torch.cat(list(batches(103, 10, g(1)))))


def test_init_checkpoint_must_match_the_model(tmp_path, fmnist_small):
    from trainables import models
    from trainables.errors import ConfigError

    other = models.build("small_cnn", 5, 1, input_shape=(1, 28, 28))
    models.save_checkpoint(other, tmp_path / "m.pt")
    cfg = load_config(tiny_config(init={"checkpoint": str(tmp_path / "m.pt")}))
    with pytest.raises(ConfigError, match="init.checkpoint: .* for 5 classes"):
        run_trial(cfg, DirectoryReporter(tmp_path / "out"), splits=fmnist_small)


def test_erm_warm_start_is_cached_and_identical_to_training_it(tmp_path, fmnist_small):
    from trainables.trial import warm_start_key

    cache = tmp_path / "cache"
    cfg = load_config(tiny_config(method={"name": "pgd_at"}, optim={"epochs": 1},
                                  init={"erm_epochs": 1, "cache_dir": str(cache)}))
    first = run_trial(cfg, DirectoryReporter(tmp_path / "a"), splits=fmnist_small)
    [entry] = list(cache.glob("erm-*.pt"))
    assert warm_start_key(cfg) in entry.name
    # The cached entry is used (and a method change keeps the same key) ...
    other = cfg.model_copy(deep=True)
    other.method = {"name": "trades"}
    assert warm_start_key(other) == warm_start_key(cfg)
    second = run_trial(cfg, DirectoryReporter(tmp_path / "b"), splits=fmnist_small)
    assert list(cache.glob("erm-*.pt")) == [entry]
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    # ... and a warm start handed over in memory gives the same trial again.
    state = torch.load(entry, weights_only=True)
    third = run_trial(cfg.model_copy(update={"init": cfg.init.model_copy(
        update={"cache_dir": None})}), DirectoryReporter(tmp_path / "c"),
        splits=fmnist_small, warm_starts={warm_start_key(cfg): state})
    assert third.metrics["train_loss"] == first.metrics["train_loss"]
    # The warm start really is a trained model: the trial starts from a lower loss.
    cold = run_trial(cfg.model_copy(update={"init": cfg.init.model_copy(
        update={"erm_epochs": 0})}), DirectoryReporter(tmp_path / "d"), splits=fmnist_small)
    assert first.history[0]["train_loss"] < cold.history[0]["train_loss"] - 0.1
