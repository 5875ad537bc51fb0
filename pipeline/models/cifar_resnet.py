"""CIFAR-10 ResNets (resnet20/32/44/56/110).

Source: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016,
Section 4.2 ("CIFAR-10 and Analysis"): a 3x3 convolution with 16 filters, then three
stages of ``n`` basic blocks with 16, 32 and 64 filters on 32x32, 16x16 and 8x8 feature
maps (stride 2 in the first block of stages 2 and 3), global average pooling and a fully
connected layer; depth ``6n + 2``. Shortcuts are option A (parameter-free identity;
when the shape changes, the input is subsampled with ``[::2, ::2]`` and zero-padded in
channels), following the widely used akamaster/pytorch_resnet_cifar10 implementation.
Parameter counts for 10 classes: resnet20 269,722 (0.27M), resnet32 0.46M, resnet44
0.66M, resnet56 0.85M, resnet110 1,727,962 (1.7M). Conv and linear weights get Kaiming-normal
initialisation.

Tensors: input ``float32`` ``(N, 3, H, W)``, already normalised (use
:class:`pipeline.models.normalized.Normalized` / ``build_model`` for ``[0, 1]`` images),
``H = W = 32`` intended (any size works thanks to global pooling); output logits
``(N, num_classes)``.

Module names: ``conv1``, ``bn1``, ``layer1``, ``layer2``, ``layer3`` (``nn.Sequential``
of :class:`BasicBlock`), ``fc`` (named like torchvision; checkpoints of akamaster's
implementation, which calls it ``linear``, are renamed on load by ``build_model``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


class _ShortcutA(nn.Module):
    """Option A shortcut: ``x[:, :, ::2, ::2]`` zero-padded from ``in_planes`` to ``planes`` channels.

    Parameter-free. ``(N, C, H, W) -> (N, planes, ceil(H/2), ceil(W/2))``; the padding is
    split evenly on both sides of the channel dimension, as in akamaster's code.
    """

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.in_planes = in_planes
        self.planes = planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.planes - self.in_planes
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, extra // 2, extra - extra // 2), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"{self.in_planes} -> {self.planes}, stride=2"


class BasicBlock(nn.Module):
    """Residual basic block: two 3x3 conv-BN layers, ``relu(out + shortcut(x))``.

    He et al. 2016, Section 3.3 / 4.2. ``(N, in_planes, H, W) -> (N, planes, H/stride, W/stride)``.
    The shortcut is the identity, or option A (:class:`_ShortcutA`, no parameters) when
    ``stride != 1`` or the channel count changes.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (1 or 2).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes < in_planes:
                raise ValueError(
                    f"BasicBlock: option A shortcut needs stride 2 and planes >= in_planes, "
                    f"got stride={stride}, {in_planes} -> {planes}"
                )
            self.shortcut = _ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016, Section 4.2), depth ``6n + 2``.

    Args:
        depth: total number of weighted layers; ``(depth - 2)`` must be divisible by 6
            (20, 32, 44, 56, 110, ...).
        num_classes: number of output logits.

    Raises:
        ValueError: invalid ``depth`` or ``num_classes``.

    ``forward``: ``(N, in_channels, H, W)`` normalised float images -> ``(N, num_classes)`` logits
    (``in_channels`` 3 for RGB, 1 for grey).
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet: depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if num_classes < 1:
            raise ValueError(f"CifarResNet: num_classes must be >= 1, got {num_classes}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


@register_model("resnet20", input_size=32, family="cifar_resnet")
def resnet20(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 for CIFAR (n=3, 0.27M parameters for 10 classes)."""
    return CifarResNet(20, num_classes, in_channels)


@register_model("resnet32", input_size=32, family="cifar_resnet")
def resnet32(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for CIFAR (n=5, 0.46M parameters for 10 classes)."""
    return CifarResNet(32, num_classes, in_channels)


@register_model("resnet44", input_size=32, family="cifar_resnet")
def resnet44(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-44 for CIFAR (n=7, 0.66M parameters for 10 classes)."""
    return CifarResNet(44, num_classes, in_channels)


@register_model("resnet56", input_size=32, family="cifar_resnet")
def resnet56(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-56 for CIFAR (n=9, 0.85M parameters for 10 classes)."""
    return CifarResNet(56, num_classes, in_channels)


@register_model("resnet110", input_size=32, family="cifar_resnet")
def resnet110(num_classes: int, in_channels: int = 3) -> CifarResNet:
    """ResNet-110 for CIFAR (n=18, 1.7M parameters for 10 classes)."""
    return CifarResNet(110, num_classes, in_channels)
