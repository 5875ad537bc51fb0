"""Adjusting a network after feature norm clipping is inserted.

Clipping shifts the statistics of the features every later BatchNorm sees, so
without an adjustment FNC can cost many points of clean accuracy. Two
adjustments from the FNC authors:

* :func:`recalibrate_batchnorm`: re-estimate the BatchNorm running statistics
  on clean training images with clipping in place (the authors' README);
* :func:`finetune_classifier`: train only the final linear classifier for an
  epoch at learning rate 0.001 with BatchNorm frozen (jschenthu/FNS,
  ImageNet/train_exp.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> int:
    """Replace every BatchNorm's running mean/var by their exact average over ``batches``.

    Args:
        model: network with BatchNorm layers; left in eval mode.
        batches: float images (B, 3, H, W) in [0, 1] (clean, unaugmented).
        device: where to compute.

    Returns:
        Number of images seen.

    Raises:
        ValueError: the model has no BatchNorm layer or ``batches`` is empty.
    """
    bns = _batchnorms(model)
    if not bns:
        raise ValueError("the model has no BatchNorm layer to recalibrate")
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: exact mean over the batches
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for bn, m in zip(bns, saved, strict=True):
            bn.momentum = m
        model.eval()
    if seen == 0:
        raise ValueError("no batches given to recalibrate BatchNorm")
    return seen


def final_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (its classifier)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to fine-tune")
    return linears[-1]


def finetune_classifier(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    lr: float = 1e-3,
    momentum: float = 0.9,
    device: torch.device | str = "cpu",
) -> float:
    """One pass of SGD on the final linear layer only, BatchNorm frozen (eval mode).

    Args:
        model: network; only its last ``nn.Linear`` is updated; left in eval mode.
        batches: ``(float images (B, 3, H, W) in [0, 1], int64 labels (B,))``.
        lr, momentum: SGD settings (the authors: 0.001).
        device: where to compute.

    Returns:
        Mean training cross-entropy over the pass.
    """
    head = final_linear(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach() * len(x)
        n += len(x)
    for p in model.parameters():
        p.requires_grad_(True)
    return float(total) / max(n, 1)
