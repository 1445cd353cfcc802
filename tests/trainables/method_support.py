"""A method on a small synthetic batch, for the method tests (`from method_support import
build_method`)."""

import torch

from trainables import methods, models
from trainables.config import knobs_model, load_config
from trainables.methods import Batch, MethodData


def build_method(name: str, *, num_classes: int, n: int, side: int, meta_per_class: int,
                 arch: str = "small_cnn", seed: int = 0, **knobs):
    """(model, method, batch): n random 1 x side x side images with labels cycling over the
    classes, and a meta set of ``meta_per_class`` random images per class. Of ``knobs``,
    those the method has are set (the tests give all methods the same few)."""
    torch.manual_seed(seed)
    own = knobs_model(name).model_fields
    knobs = {k: v for k, v in knobs.items() if k in own}
    cfg = load_config({"dataset": {"name": "synthetic"}, "method": {"name": name, **knobs}})
    shape = (1, side, side)
    model = models.build(arch, num_classes, 1, input_shape=shape)
    x = torch.rand(n, *shape)
    y = torch.arange(n) % num_classes
    meta_y = torch.arange(meta_per_class * num_classes) % num_classes
    data = MethodData(num_classes=num_classes, train_labels=y,
                      class_counts=torch.bincount(y, minlength=num_classes),
                      meta_x=torch.rand(len(meta_y), *shape), meta_y=meta_y, device=x.device,
                      train_x=x, val_x=torch.rand(len(meta_y), *shape), val_y=meta_y.clone())
    return model, methods.build(name, model, cfg, data), Batch(x=x, y=y, idx=torch.arange(n))
