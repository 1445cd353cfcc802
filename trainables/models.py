"""Model registry, normalisation inside the model, and checkpoints that rebuild themselves.

Every model takes pixels in [0, 1] and normalises inside ``forward``, so attacks can work in
pixel space (an L-inf ball around x, clipped to [0, 1]) without knowing the dataset's
statistics. Normalisation lives in one wrapper (:class:`NormalizedModel`) rather than in each
architecture, so a new architecture cannot forget it.

A built model carries its build spec (``model.spec``, plain types only) and checkpoints store
it next to the weights, so ``load_checkpoint(path)`` needs nothing but the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.registry import MODELS

Factory = Callable[[int, int, "tuple[int, int, int] | None"], nn.Module]

_SPEC_KEYS = ("arch", "num_classes", "in_channels", "input_shape", "mean", "std")


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Register ``factory(num_classes, in_channels, input_shape) -> nn.Module`` under ``name``
    (the built-in architectures are listed in `trainables.registry`).

    The factory builds the bare network (normalised input in, logits out); :func:`build`
    wraps it with the normalisation.
    """
    return MODELS.register(name)


# --------------------------------------------------------------------------------------------
# Normalisation wrapper


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics as buffers so they follow ``.to()``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        as_buffer = lambda v: torch.tensor(list(v), dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        self.register_buffer("mean", as_buffer(mean))
        self.register_buffer("std", as_buffer(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """``net(normalize(x))``; carries the build spec used by checkpoints."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 spec: dict[str, Any]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _channel_stats(name: str, values: Sequence[float] | None, in_channels: int) -> list[float]:
    """Per-channel statistics as plain floats; one value is broadcast to every channel."""
    if values is None:
        return [0.5] * in_channels
    vals = [float(v) for v in values]
    if len(vals) == 1:
        vals = vals * in_channels
    if len(vals) != in_channels:
        raise ValueError(f"model.{name}: expected 1 or {in_channels} values, got {len(vals)}")
    if name == "std" and any(not v > 0 for v in vals):
        raise ValueError(f"model.std: every value must be > 0, got {vals}")
    return vals


def _check_input_shape(input_shape: Sequence[int] | None, in_channels: int
                       ) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"model.input_shape: expected (C, H, W) of positive ints, got {shape}")
    if shape[0] != in_channels:
        raise ValueError(
            f"model.input_shape: {shape} has {shape[0]} channels but in_channels={in_channels}"
        )
    return shape  # type: ignore[return-value]


def build(arch: str, num_classes: int, in_channels: int = 3, *,
          input_shape: tuple[int, int, int] | None = None,
          mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None) -> nn.Module:
    """Build a registered architecture that takes pixels in [0, 1] and returns logits.

    ``input_shape`` (C, H, W) is required by ``linear`` and ``mlp`` (their first layer's width
    depends on it); if given, its C must equal ``in_channels``. ``mean``/``std`` default to
    0.5 per channel, i.e. inputs mapped to [-1, 1].
    """
    factory = MODELS.get(arch)
    if int(num_classes) < 2:
        raise ValueError(f"model.num_classes: must be >= 2, got {num_classes}")
    if int(in_channels) < 1:
        raise ValueError(f"model.in_channels: must be >= 1, got {in_channels}")
    num_classes, in_channels = int(num_classes), int(in_channels)
    shape = _check_input_shape(input_shape, in_channels)
    mean_l = _channel_stats("mean", mean, in_channels)
    std_l = _channel_stats("std", std, in_channels)
    net = factory(num_classes, in_channels, shape)
    # Plain types only (lists, not tuples or tensors): checkpoints load with weights_only=True
    # and the spec may be logged as JSON.
    spec = {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_shape": list(shape) if shape is not None else None,
        "mean": mean_l,
        "std": std_l,
    }
    return NormalizedModel(net, mean_l, std_l, spec)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------
# Low-dimensional models (synthetic data)


def _flat_dim(arch: str, input_shape: tuple[int, int, int] | None) -> int:
    if input_shape is None:
        raise ValueError(f"model.arch '{arch}' needs input_shape (C, H, W) to size its first layer")
    return math.prod(input_shape)


def _linear(num_classes: int, in_channels: int, input_shape: tuple[int, int, int] | None
            ) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_dim("linear", input_shape), num_classes))


def _mlp(num_classes: int, in_channels: int, input_shape: tuple[int, int, int] | None
         ) -> nn.Module:
    width = 128
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_flat_dim("mlp", input_shape), width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


# --------------------------------------------------------------------------------------------
# Small CNN (Fashion-MNIST and other small images)


def _small_cnn(num_classes: int, in_channels: int, input_shape: tuple[int, int, int] | None
               ) -> nn.Module:
    # The adaptive pool is the identity on 28x28 inputs (7x7 after two max-pools) and lets the
    # same weights shapes serve 32x32 and other sizes, so the head never depends on input size.
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
        nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
        nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(7), nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


# --------------------------------------------------------------------------------------------
# Pre-activation ResNet-18 (He et al. 2016, CIFAR variant as in Rice et al. 2020)


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # Global pooling instead of avg_pool2d(4): same result on 32x32, and works on 28x28.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _preact_resnet18(num_classes: int, in_channels: int,
                     input_shape: tuple[int, int, int] | None) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes, in_channels)


# --------------------------------------------------------------------------------------------
# WideResNet-28-10 (Zagoruyko and Komodakis 2016; the TRADES/CAAT CIFAR backbone)


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
                 ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._group(widths[0], widths[1], n, 1)
        self.block2 = self._group(widths[1], widths[2], n, 2)
        self.block3 = self._group(widths[2], widths[3], n, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _group(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _wrn28_10(num_classes: int, in_channels: int, input_shape: tuple[int, int, int] | None
              ) -> nn.Module:
    return WideResNet(28, 10, num_classes, in_channels)


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-32 (He et al. 2016, Sec. 4.2): 3 stages x 5 basic blocks, 16/32/64 channels


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and zero-pad channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes - in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _resnet32(num_classes: int, in_channels: int, input_shape: tuple[int, int, int] | None
              ) -> nn.Module:
    return CifarResNet(5, num_classes, in_channels)


# --------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str],
                    extra: dict[str, Any] | None = None) -> None:
    """Write ``{"spec", "state_dict", **extra}`` so :func:`load_checkpoint` can rebuild it.

    Weights are moved to CPU so the file loads anywhere. ``extra`` must hold only tensors and
    plain containers/scalars, since the file is read back with ``weights_only=True``.
    """
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict):
        raise ValueError("save_checkpoint: model has no build spec; build it with models.build")
    extra = dict(extra or {})
    clash = {"spec", "state_dict"} & set(extra)
    if clash:
        raise ValueError(f"save_checkpoint: extra may not use the reserved keys {sorted(clash)}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"spec": dict(spec), "state_dict": state, **extra}, os.fspath(path))


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict (spec, state_dict and extras), validated, safely loaded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is "not a checkpoint"
        raise ValueError(f"{path}: not a caat-sweeper checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    spec = payload.get("spec") if isinstance(payload, dict) else None
    if (not isinstance(spec, dict) or not set(_SPEC_KEYS) <= set(spec)
            or not isinstance(payload.get("state_dict"), dict)):
        raise ValueError(f"{path}: not a caat-sweeper checkpoint (expected a dict with 'spec' "
                         f"holding {list(_SPEC_KEYS)} and 'state_dict')")
    return payload


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_checkpoint`, with its weights, in eval mode."""
    payload = read_checkpoint(path, map_location)
    spec = payload["spec"]
    try:
        model = build(spec["arch"], spec["num_classes"], spec["in_channels"],
                      input_shape=spec["input_shape"], mean=spec["mean"], std=spec["std"])
        model.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{os.fspath(path)}: checkpoint does not rebuild: {e}") from e
    if map_location is not None and not callable(map_location) and not isinstance(map_location,
                                                                                  dict):
        model.to(map_location)
    return model.eval()
