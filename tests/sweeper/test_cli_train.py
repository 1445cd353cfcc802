import json
import subprocess
import sys

import pytest
import torch
import yaml
from trial_support import tiny_config

from sweeper.cli import main
from trainables.models import load_checkpoint


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("content, sets, expected", [
    ({"method": {"betta": 1}}, [], "method.betta: unknown key for method 'trades'; allowed:"),
    ({"optim": {"epochs": "ten"}}, [], "optim.epochs:"),
    ({"optim": {"batch_size": 0}}, [], "optim.batch_size: Input should be greater than or equal"),
    ({"scenario": {"noise_rate": 2}}, [], "scenario.noise_rate:"),
    ({}, ["dataset.name=imagenet"], "dataset.name: unknown 'imagenet'; allowed: cifar10"),
    ({}, ["method.name=fgsm"], "method.name: unknown 'fgsm'; allowed: "),
    ({}, ["dataset.data_dir=/nonexistent/data"], "dataset.data_dir: no "),
    ({}, ["scenario.meta_per_class=7000"], "scenario.meta_per_class"),
    ({}, ["method.beta"], "--set 'method.beta': expected KEY=VALUE"),
    ("method: [unclosed\n", [], "malformed YAML"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, content, sets,
                                                             expected):
    path = tmp_path / "cfg.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    out = tmp_path / "out"
    argv = ["train", str(path), "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_train_writes_metrics_and_a_loadable_model(tmp_path):
    cfg = tiny_config(method={"name": "pgd_at"}, eval={"steps": 1, "batch_size": 2000})
    path = write_config(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "run"
    # A real process: the console entry point and its exit status, not just main().
    proc = subprocess.run([sys.executable, "-m", "sweeper.cli", "train", str(path), "--out",
                           str(out), "--set", "optim.epochs=1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("natural_acc", "robust_acc", "worst_class_natural_acc", "worst_class_robust_acc",
                "class_natural_acc_std", "boundary_error"):
        assert 0 <= metrics[key] <= 1
    assert len(metrics["class_natural_acc"]) == len(metrics["class_robust_acc"]) == 10
    assert metrics["config"]["method"]["name"] == "pgd_at"
    assert metrics["config"]["optim"]["epochs"] == 1
    assert metrics["config"]["method"]["eps"] == pytest.approx(0.1)
    assert metrics["val"]["natural_acc"] > 0
    model = load_checkpoint(out / "model.pt")
    assert not model.training
    # The saved model reproduces the reported natural accuracy on the full test split.
    from trainables.config import DatasetConfig
    from trainables.data import load

    test = load(DatasetConfig())
    with torch.no_grad():
        acc = (model(test.test_x).argmax(1) == test.test_y).float().mean().item()
    assert acc == pytest.approx(metrics["natural_acc"], abs=1e-6)
    # One epoch: the best checkpoint is that epoch's, saved beside it with the same figures.
    assert metrics["best_epoch"] == 1 and metrics["best_natural_acc"] == metrics["natural_acc"]
    best = load_checkpoint(out / "model_best.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, best.state_dict()[k]), k
    assert "best checkpoint (epoch 1 by val_robust_acc)" in proc.stdout
    assert not (out / "checkpoint").exists()


def test_unfinished_run_of_another_config_is_refused(tmp_path, capsys, fmnist_small):
    from trainables.trial import DirectoryReporter, run_trial

    cfg = tiny_config(optim={"epochs": 1})
    run_trial(cfg, DirectoryReporter(tmp_path / "out"), splits=fmnist_small)
    path = write_config(tmp_path / "cfg.yaml", tiny_config())
    assert main(["train", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "different config" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
