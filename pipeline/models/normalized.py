"""The wrapper that puts input normalisation inside every model, so attacks and defenses
work on images in ``[0, 1]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalized"]


class Normalized(nn.Module):
    """A network preceded by per-channel input normalisation.

    ``forward(x)`` takes images ``x`` of shape ``(N, 3, H, W)``, floating point
    (``float32`` unless the module was cast), values in ``[0, 1]``, computes
    ``(x - mean) / std`` with ``mean`` and ``std`` stored as buffers of shape
    ``(1, 3, 1, 1)`` (so they follow ``.to(device)`` and appear in ``state_dict()``
    as ``mean`` / ``std``), and returns ``self.net`` of that: logits of shape
    ``(N, num_classes)``. The value range is not checked (that would cost a device
    sync); the shape is.

    Keeping normalisation inside the model lets attacks and defences work directly
    in ``[0, 1]`` pixel space (patches are pasted and clipped there).

    Args:
        net: the raw network, kept as attribute ``net``.
        mean: 3 per-channel means (RGB).
        std: 3 per-channel standard deviations (RGB), all > 0.

    Raises:
        ValueError: ``mean`` / ``std`` do not have 3 entries or some ``std <= 0``
            (constructor); ``x`` is not 4-D with 3 channels (forward).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() != 3 or std_t.numel() != 3:
            raise ValueError(
                f"Normalized: mean and std need 3 values (RGB), got {len(mean_t)} and {len(std_t)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"Normalized: std must be > 0, got {std_t.tolist()}")
        self.net = net
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1))
        self.register_buffer("std", std_t.view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images in ``[0, 1]`` -> ``(N, num_classes)`` logits."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Normalized: expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


