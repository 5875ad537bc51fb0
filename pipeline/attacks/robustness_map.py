"""The pixel robustness map and its top-k / bottom-k pixel masks (Hwang et al., "Where to be
Adversarial Perturbations Added? Investigating and Manipulating Pixel Robustness using Input
Gradients", ICLR 2019 DebugML workshop, Section 2 "Measuring Pixel Robustness").

``R_ij = 1/(|D| C) * sum_{x in D} sum_c |d L(x, y) / d x_cij|``, ``L`` the cross-entropy of
the true label: large values mark the vulnerable pixels. Masked PGD
(:mod:`pipeline.attacks.masked_pgd`) attacks the top or bottom k of them; the PRM defense
(:mod:`pipeline.defenses.prm`) measures how well its designated pixels match them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import frozen_eval

__all__ = ["pixel_mask", "pixel_robustness_map"]


def pixel_robustness_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mean over images and channels of ``|grad_x CE(model(x), y)|``, per pixel (Hwang et al. 2019, Section 2).

    Each image's gradient is that of its own loss (not of the batch mean), so the map
    does not depend on ``batch_size``. The model is put in eval mode with frozen
    weights for the call.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits.
        x: float32 (N, C, H, W) in [0, 1], e.g. training images.
        y: int64 (N,) their labels.
        batch_size: images per forward/backward pass (>= 1).

    Returns:
        float32 (H, W) on ``x``'s device, >= 0, in units of loss per pixel unit of [0, 1].

    Raises:
        ValueError: no images, shapes that do not match, or ``batch_size < 1``.
    """
    if x.ndim != 4 or len(x) == 0 or y.shape != (len(x),):
        raise ValueError(f"expected images (N, C, H, W) with N >= 1 and labels (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = torch.zeros(x.shape[-2:], dtype=torch.float32, device=x.device)
    with frozen_eval(model):
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[s : s + batch_size], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
            total += grad.abs().sum(dim=(0, 1)).float()
    return total / (x.shape[0] * x.shape[1])


def pixel_mask(rmap: torch.Tensor, k: float, which: Literal["top", "bottom"] = "top") -> torch.Tensor:
    """The ``k`` fraction of pixels with the largest (``"top"``) or smallest (``"bottom"``) map values.

    Selects ``round(k * H * W)`` pixels (at least 1); ties are broken by position
    (row-major, earlier first), so the result is deterministic.

    Args:
        rmap: float (H, W), e.g. :func:`pixel_robustness_map`.
        k: fraction of pixels, in (0, 1].
        which: ``"top"`` (most vulnerable pixels) or ``"bottom"`` (least).

    Returns:
        bool (H, W) on ``rmap``'s device; broadcasts over (N, C, H, W) images.

    Raises:
        ValueError: ``rmap`` not 2-D, ``k`` outside (0, 1], or ``which`` unknown.
    """
    if rmap.ndim != 2:
        raise ValueError(f"rmap must be (H, W), got {tuple(rmap.shape)}")
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction of the pixels, in (0, 1], got {k}")
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom', got {which!r}")
    flat = rmap.flatten()
    n = min(max(round(k * flat.numel()), 1), flat.numel())
    order = torch.sort(flat, descending=which == "top", stable=True).indices[:n]
    return torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, order, True).view_as(rmap)
