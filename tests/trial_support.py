"""A tiny trial config for the tests that train (`from trial_support import tiny_config`)."""

from trainables.config import knobs_model


def tiny_config(**sections) -> dict:
    """A trial config that trains in about a second on the Fashion-MNIST slice; a method
    that attacks takes 2 steps unless told otherwise."""
    cfg = {
        "dataset": {"name": "fashion_mnist", "train_size": 600},
        "scenario": {"meta_per_class": 5, "val_per_class": 10},
        "method": {"name": "erm"},
        "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "eval": {"steps": 2, "max_samples": 200},
        "runtime": {"seed": 0, "device": "cpu"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    method = cfg["method"]
    if "steps" in knobs_model(method["name"]).model_fields:
        method.setdefault("steps", 2)
    return cfg
