import math

import pytest
import torch
from torch import nn

from trainables.metric_names import SCALAR_METRICS
from trainables.metrics import class_accuracy, evaluate, metrics_from_correct


def test_metrics_from_correct_matches_hand_computation():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    nat = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    rob = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    m = metrics_from_correct(nat, rob, y, num_classes=4)
    assert m["natural_acc"] == pytest.approx(6 / 8)
    assert m["robust_acc"] == pytest.approx(2 / 8)
    assert m["class_natural_acc"][:3] == pytest.approx([0.75, 0.5, 1.0])
    assert math.isnan(m["class_natural_acc"][3])  # class 3 absent: not counted as 0 or 1
    assert m["worst_class_natural_acc"] == pytest.approx(0.5)
    assert m["worst_class_robust_acc"] == pytest.approx(0.0)
    mean = (0.75 + 0.5 + 1.0) / 3
    std = math.sqrt(((0.75 - mean) ** 2 + (0.5 - mean) ** 2 + (1.0 - mean) ** 2) / 3)
    assert m["class_natural_acc_std"] == pytest.approx(std)
    assert m["boundary_error"] == pytest.approx(0.5)
    assert set(SCALAR_METRICS) <= set(m)


def test_class_accuracy_uses_the_labels_given():
    correct = torch.tensor([1.0, 0.0, 1.0])
    acc = class_accuracy(correct, torch.tensor([2, 2, 0]), 3)
    assert acc[0] == 1.0 and acc[2] == 0.5 and torch.isnan(acc[1])


class Constant(nn.Module):
    """Ignores its input: no perturbation can change its prediction."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_robust_equals_natural_for_an_input_independent_model():
    x = torch.rand(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))
    m = evaluate(Constant([0.0, 2.0, 1.0]), x, y, 3, eps=0.3, steps=3, step_size=0.1,
                 batch_size=16)
    assert m["natural_acc"] == pytest.approx((y == 1).float().mean().item())
    assert m["robust_acc"] == m["natural_acc"]
    assert m["boundary_error"] == 0


def test_attack_breaks_a_fragile_linear_model_and_mode_is_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x = torch.rand(64, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model is right on every sample by construction
    model.train()
    m = evaluate(model, x, y, 2, eps=0.5, steps=10, step_size=0.1)
    assert m["natural_acc"] == 1.0
    assert m["robust_acc"] < 0.5
    assert model.training
