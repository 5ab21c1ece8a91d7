"""Image-classifier architectures and their registry.

Every model maps float images in ``[0, 1]`` of shape ``(N, C, H, W)`` to logits ``(N, num_classes)``.
Per-channel normalisation happens *inside* the model (``mean``/``std`` are registered buffers), so
attacks can work directly in ``[0, 1]`` pixel space. Activations are switched to channels-last memory
format inside ``forward`` (oneDNN CPU convolutions are much faster so; weights and outputs are
unaffected). No model uses dropout in eval mode, so eval-mode
forward passes are deterministic.

Architectures:

* ``convnet-tiny`` / ``convnet-small``: airbench-style conv nets (after Keller Jordan's CIFAR-10
  speedruns): a 2x2 conv stem, then three blocks of ``conv-maxpool-BN-GELU-conv-BN-GELU``, global
  max pool and a bias-free linear head. Fast on CPU; ``convnet-small`` (~0.3M parameters) is the CPU
  default base classifier.
* ``resnet18``: the CIFAR variant of ResNet-18 (3x3 stem, no stem max pool), ~11M parameters.
* ``wrn-28-10``: WideResNet-28-10 (Zagoruyko & Komodakis 2016), ~36M parameters, the usual base
  classifier of adversarial-purification papers.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.core.errors import UsageError
from harness.core.registry import Registry

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Normalize",
    "ConvNet",
    "ResNet",
    "WideResNet",
    "architecture_registry",
    "build_classifier",
    "count_parameters",
    "penultimate_features",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
GRAY_MEAN = (0.2860,)  # Fashion-MNIST's training-set statistics: mostly dark 28x28 grayscale images
GRAY_STD = (0.3530,)
_DEFAULT_STATS = {3: (CIFAR10_MEAN, CIFAR10_STD), 1: (GRAY_MEAN, GRAY_STD)}


def _channel_stats(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Defaults: the CIFAR-10 statistics for 3 channels, Fashion-MNIST's for 1, 0.5/0.25 otherwise."""
    default_mean, default_std = _DEFAULT_STATS.get(channels, ((0.5,) * channels, (0.25,) * channels))
    if mean is None:
        mean = default_mean
    if std is None:
        std = default_std
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
    if any(s <= 0 for s in std):
        raise UsageError(f"std values must be positive, got {std}")
    return mean, std


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers (saved with the weights)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


# ----------------------------------------------------------------------------------------------
# airbench-style conv net


class ConvGroup(nn.Module):
    """``conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU``."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class ConvNet(nn.Module):
    """Airbench-style conv net.

    ``stem`` channels of a 2x2 convolution (no padding: 32x32 -> 31x31), three :class:`ConvGroup`
    of ``widths``, a global max pool and a bias-free linear head whose output is multiplied by
    ``logit_scale`` (airbench uses 1/9, which keeps initial logits small).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        stem: int = 24,
        logit_scale: float = 1 / 9,
        bn_momentum: float = 0.1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        mean, std = _channel_stats(mean, std, in_channels)
        self.normalize = Normalize(mean, std)
        self.stem = nn.Conv2d(in_channels, stem, 2, padding=0, bias=True)
        self.stem_act = nn.GELU()
        groups, c = [], stem
        for w in widths:
            groups.append(ConvGroup(c, w, bn_momentum))
            c = w
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(c, num_classes, bias=False)
        self.logit_scale = float(logit_scale)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.stem:
                # Dirac (identity) init on the first in-channels, as airbench does: a well-conditioned
                # start for a net this shallow without residual connections.
                w = m.weight.data
                nn.init.kaiming_normal_(w, nonlinearity="relu")
                torch.nn.init.dirac_(w[: w.size(1)])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features ``(N, widths[-1])``: the global max pool before the linear head."""
        # channels-last activations make oneDNN's CPU convolutions ~1.6x faster (forward and backward),
        # whatever the memory format of the weights and of the caller's input
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
        x = self.stem_act(self.stem(x))
        x = self.groups(x)
        return torch.amax(x, dim=(2, 3))

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(x))


# ----------------------------------------------------------------------------------------------
# ResNet-18 (CIFAR variant)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem conv, no stem max pool)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        mean, std = _channel_stats(mean, std, in_channels)
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c = [], widths[0]
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, stride if j == 0 else 1))
                c = w
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features: the global average pool before the linear layer."""
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)  # faster CPU convolutions
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(x))


# ----------------------------------------------------------------------------------------------
# WideResNet


class WideBasic(nn.Module):
    """Pre-activation wide block: ``BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3`` plus shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.dropout = float(dropout)
        self.equal = c_in == c_out and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(o)
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:  # F.dropout is the identity in eval mode
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen``; ``depth = 6n + 4``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise UsageError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        mean, std = _channel_stats(mean, std, in_channels)
        self.normalize = Normalize(mean, std)
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBasic(c, w, (1 if i == 0 else 2) if j == 0 else 1, dropout))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features: the global average pool before the linear layer."""
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)  # faster CPU convolutions
        out = self.blocks(self.conv1(x))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(x))


# ----------------------------------------------------------------------------------------------
# registry

ARCHITECTURE_GROUP = "harness.architectures"
_registry: Registry[Callable[..., nn.Module]] | None = None


def architecture_registry() -> Registry[Callable[..., nn.Module]]:
    """Every classifier architecture: harness's own, then plugins of the ``harness.architectures`` group
    (each a callable ``(num_classes=, in_channels=, **kwargs) -> nn.Module``)."""
    global _registry
    if _registry is None:
        registry: Registry[Callable[..., nn.Module]] = Registry("classifier architecture", group=ARCHITECTURE_GROUP)
        registry.add("convnet-tiny", partial(ConvNet, widths=(16, 32, 64), stem=24),
                     summary="3-stage convnet, widths 16/32/64 (tests)")
        registry.add("convnet-small", partial(ConvNet, widths=(32, 64, 128), stem=24),
                     summary="3-stage convnet, widths 32/64/128 (the CPU preset)")
        registry.add("resnet18", partial(ResNet, num_blocks=(2, 2, 2, 2)), summary="ResNet-18",
                     paper="He et al., CVPR 2016")
        registry.add("wrn-28-10", partial(WideResNet, depth=28, widen=10), summary="WideResNet-28-10",
                     paper="Zagoruyko & Komodakis, BMVC 2016")
        _registry = registry
    return _registry


def build_classifier(arch: str, num_classes: int, image_shape: Sequence[int] = (3, 32, 32), **kwargs) -> nn.Module:
    """Builds architecture ``arch`` for ``num_classes`` classes and images of ``image_shape`` (C, H, W).

    Extra keyword arguments (e.g. ``mean``/``std``) go to the architecture's constructor.
    Raises :class:`~harness.core.errors.UsageError` listing the valid names when ``arch`` is unknown.
    """
    factory = architecture_registry().get(arch)
    if int(num_classes) < 2:
        raise UsageError(f"num_classes must be at least 2, got {num_classes}")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        raise UsageError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    c, h, w = shape
    if arch.startswith("convnet") and min(h, w) < 9:
        raise UsageError(f"{arch} needs images of at least 9x9 pixels, got {h}x{w}")
    return factory(num_classes=int(num_classes), in_channels=c, **kwargs)


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model.features(x)`` for harness's architectures (and any network with a ``features`` method);
    a :class:`UsageError` for a network without one."""
    features = getattr(model, "features", None)
    if not callable(features):
        raise UsageError(f"{type(model).__name__} has no features() method: harness cannot read its "
                         f"penultimate features")
    return features(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
