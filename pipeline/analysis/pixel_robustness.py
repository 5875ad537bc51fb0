"""Pixel robustness (Hwang et al., ICLR 2019 DebugML workshop; seed 004): what the
analysis stage writes about PRM models and the reference their IoU is read against.

The robustness map and masked PGD are in :mod:`pipeline.attacks.masked_pgd`, the PRM
layer and its IoU in :mod:`pipeline.defenses.prm`.
"""

from __future__ import annotations

__all__ = ["PRM_IOU_CSV", "random_set_iou"]

PRM_IOU_CSV = "prm_iou.csv"
"""Written by the pixel-robustness analysis when a model has a PRM layer: ``defense``,
``prm_iou`` and ``random_set_iou`` (the IoU a map unrelated to the designated set scores)."""


def random_set_iou(fraction: float) -> float:
    """The IoU that a pixel ranking unrelated to the designated set scores: two independent
    uniformly random sets of ``fraction`` of the pixels each meet in ``f^2`` of the image
    on average and cover ``2f - f^2``, so the ratio is ``f / (2 - f)`` (0.143 for PRM's
    25 %). The reference a PRM model's :func:`pipeline.defenses.prm.designated_iou` is read
    against.

    Args:
        fraction: share of the pixels in each set, in (0, 1].

    Returns:
        ``f / (2 - f)`` in (0, 1].
    """
    return fraction / (2 - fraction)
