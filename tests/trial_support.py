"""A tiny trial config for the tests that train (`from trial_support import tiny_config`)."""


def tiny_config(**sections) -> dict:
    """A trial config that trains in about a second on the Fashion-MNIST slice."""
    cfg = {
        "dataset": {"name": "fashion_mnist", "train_size": 600},
        "scenario": {"meta_per_class": 5, "val_per_class": 10},
        "method": {"name": "erm", "steps": 2},
        "optim": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "eval": {"steps": 2, "max_samples": 200},
        "runtime": {"seed": 0, "device": "cpu"},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg
