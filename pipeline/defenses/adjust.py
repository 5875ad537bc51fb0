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

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.registry import Registry


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


@dataclass(frozen=True)
class AdjustSettings:
    """What every adjustment may read: ``batch_size`` (images per batch), the seeded
    ``generator`` of its draws, ``adjust_batches``, ``finetune_epochs``, ``finetune_lr`` (the
    ``fnc`` keys of the same names), ``horizontal_flip`` (the training augmentation's) and
    ``device``."""

    batch_size: int
    generator: torch.Generator
    adjust_batches: int
    finetune_epochs: int
    finetune_lr: float
    horizontal_flip: bool
    device: torch.device | str


AdjustmentFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, AdjustSettings], dict[str, "float | int"]]
"""``adjust(model, x_train uint8 (N, 3, H, W), y_train int64 (N,), settings) -> metrics``, in place."""

ADJUSTMENT_REGISTRY: Registry[AdjustmentFn] = Registry("adjustment", None, ordered=True)
"""The post-insertion adjustments by name (``fnc.adjustment``, ``defended.*.adjustment``), in
registration order; a new one is a function registered with ``@ADJUSTMENT_REGISTRY.decorator``."""


@ADJUSTMENT_REGISTRY.decorator("none")
def _no_adjustment(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                   s: AdjustSettings) -> dict[str, float | int]:
    """Nothing."""
    return {}


@ADJUSTMENT_REGISTRY.decorator("bn_recalibration")
def _bn_recalibration(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                      s: AdjustSettings) -> dict[str, float | int]:
    """:func:`recalibrate_batchnorm` on ``adjust_batches * batch_size`` augmented training images."""
    from pipeline.train import CROP_PADDING, batch_crop_flip, iterate_batches

    idx = torch.randperm(len(x_train), generator=s.generator)[: s.adjust_batches * s.batch_size]
    seen = batch_crop_flip(x_train[idx], CROP_PADDING, s.horizontal_flip, s.generator)
    return {"adjust_images": recalibrate_batchnorm(model, iterate_batches(seen, None, s.batch_size, s.device),
                                                   s.device)}


@ADJUSTMENT_REGISTRY.decorator("finetune_classifier")
def _finetune_classifier(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                         s: AdjustSettings) -> dict[str, float | int]:
    """``finetune_epochs`` passes of :func:`finetune_classifier`, each over a fresh permutation."""
    from pipeline.train import iterate_batches

    out: dict[str, float | int] = {}
    for _ in range(s.finetune_epochs):
        idx = torch.randperm(len(x_train), generator=s.generator)
        out["finetune_loss"] = finetune_classifier(
            model, iterate_batches(x_train[idx], y_train[idx], s.batch_size, s.device), lr=s.finetune_lr,
            device=s.device)
    return out


ADJUSTMENTS: tuple[str, ...] = tuple(ADJUSTMENT_REGISTRY.names())
"""The adjustments :func:`adjust_after_insertion` applies (``fnc.adjustment``)."""


def adjust_after_insertion(
    model: nn.Module,
    adjustment: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    batch_size: int,
    seed: int,
    adjust_batches: int = 100,
    finetune_epochs: int = 1,
    finetune_lr: float = 1e-3,
    horizontal_flip: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, float | int]:
    """Adjust a model after a defense (FNC) was inserted, in place, as ``adjustment`` says:
    the one code path of ``train_defended`` (:func:`pipeline.tasks.defend_task`) and of every
    cell of the FNC trade-off, so equal settings give equal weights.

    * ``none``: nothing;
    * ``bn_recalibration``: :func:`recalibrate_batchnorm` on ``adjust_batches * batch_size``
      training images drawn without replacement (one seeded permutation), each under the
      training augmentation (:func:`pipeline.train.batch_crop_flip`: a random crop of the
      zero-padded image, a flip where ``horizontal_flip``), the augmentation the project's
      ``Trainer`` trains with (for weights trained elsewhere, e.g. torchvision's ImageNet
      models under random resized crops, a mild stand-in). The weights were trained under
      those statistics: recalibrating on unaugmented images, without FNC at
      all, cost the default profile's ResNet-20 5 points of clean accuracy (88.2 % to
      83.2 % on 2,000 test images), with the augmentation none (88.3 %);
    * ``finetune_classifier``: ``finetune_epochs`` passes of :func:`finetune_classifier` at
      ``finetune_lr``, each over a fresh seeded permutation of the training images.

    Args:
        model: the defended network, on ``device``; left in eval mode.
        adjustment: one of :data:`ADJUSTMENTS` (a name in :data:`ADJUSTMENT_REGISTRY`).
        x_train: uint8 (N, 3, H, W) training images (clean, unaugmented), on the CPU.
        y_train: int64 (N,) their labels.
        batch_size: images per batch (>= 1).
        seed: seeds the draws of training images (``torch.Generator``).
        adjust_batches, finetune_epochs, finetune_lr: as ``fnc.adjust_batches`` etc.
        horizontal_flip: whether the training augmentation flips (the dataset's
            ``DatasetInfo.horizontal_flip``: False for traffic signs).
        device: where to compute.

    Returns:
        ``{}`` for ``none``; ``{"adjust_images": n}`` (images seen) for ``bn_recalibration``;
        ``{"finetune_loss": mean cross-entropy of the last pass}`` for ``finetune_classifier``.

    Raises:
        ValueError: an unknown adjustment, or one :func:`recalibrate_batchnorm` /
            :func:`final_linear` refuses (no BatchNorm, no linear classifier).
    """
    adjust = ADJUSTMENT_REGISTRY.get(adjustment)
    settings = AdjustSettings(batch_size, torch.Generator().manual_seed(seed), adjust_batches, finetune_epochs,
                              finetune_lr, horizontal_flip, device)
    return adjust(model, x_train, y_train, settings)
