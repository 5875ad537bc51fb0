"""The wrapper that puts input normalisation inside every model, so attacks and defenses
work on images in ``[0, 1]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalized"]


class Normalized(nn.Module):
    """A network preceded by per-channel input normalisation.

    ``forward(x)`` takes images ``x`` of shape ``(N, C, H, W)``, floating point
    (``float32`` unless the module was cast), values in ``[0, 1]``, computes
    ``(x - mean) / std`` with ``mean`` and ``std`` stored as buffers of shape
    ``(1, C, 1, 1)`` (so they follow ``.to(device)`` and appear in ``state_dict()``
    as ``mean`` / ``std``), and returns ``self.net`` of that: logits of shape
    ``(N, num_classes)``. The value range is not checked (that would cost a device
    sync); the shape is.

    Keeping normalisation inside the model lets attacks and defences work directly
    in ``[0, 1]`` pixel space (patches are pasted and clipped there).

    Args:
        net: the raw network, kept as attribute ``net``.
        mean: ``C`` per-channel means (3 for RGB, 1 for grey).
        std: ``C`` per-channel standard deviations, all > 0.

    Raises:
        ValueError: ``mean`` / ``std`` are empty or differ in length, or some ``std <= 0``
            (constructor); ``x`` is not 4-D with ``C`` channels (forward).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() == 0 or mean_t.numel() != std_t.numel():
            raise ValueError(
                f"Normalized: mean and std need one value a channel (3 for RGB, 1 for grey), got {len(mean_t)} and "
                f"{len(std_t)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"Normalized: std must be > 0, got {std_t.tolist()}")
        self.net = net
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    @property
    def in_channels(self) -> int:
        """``C``, the channels of the images the model takes."""
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images in ``[0, 1]`` -> ``(N, num_classes)`` logits."""
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Normalized: expected images of shape (N, {self.mean.shape[1]}, H, W), got "
                             f"{tuple(x.shape)}")
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


