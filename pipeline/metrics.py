"""Robustness metrics, one definition each (DESIGN.md, metric definitions).

All take integer class predictions and labels as 1-D int64 tensors of equal
length N (any device) and return a :class:`Metric`: a fraction in [0, 1] and
the number of images it counts over. A metric over zero images is NaN.

| name | over which images | counts |
| --- | --- | --- |
| clean_accuracy | all | pred_clean == label |
| robust_accuracy | all; targeted: label != target | pred_adv == label |
| attack_success_rate, untargeted | pred_clean == label | pred_adv != label |
| attack_success_rate, targeted | label != target | pred_adv == target |
| fooling_rate | all | pred_adv != pred_clean |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metric:
    """A fraction in [0, 1] (NaN over no images) and its denominator."""

    value: float
    n_images: int

    @staticmethod
    def of(hits: torch.Tensor, over: torch.Tensor) -> Metric:
        """``sum(hits & over) / sum(over)`` for boolean tensors (N,)."""
        n = int(over.sum())
        return Metric(float((hits & over).sum()) / n if n else math.nan, n)


def _check(*tensors: torch.Tensor) -> None:
    n = tensors[0].shape
    for t in tensors:
        if t.ndim != 1 or t.shape != n:
            raise ValueError(f"predictions and labels must be 1-D of equal length, got {[tuple(t.shape) for t in tensors]}")


def clean_accuracy(pred_clean: torch.Tensor, labels: torch.Tensor) -> Metric:
    """Fraction of all images classified correctly when clean."""
    _check(pred_clean, labels)
    return Metric.of(pred_clean == labels, torch.ones_like(labels, dtype=torch.bool))


def robust_accuracy(pred_adv: torch.Tensor, labels: torch.Tensor, target: int | None = None) -> Metric:
    """Accuracy under attack; for a targeted attack, over images whose label is not the target."""
    _check(pred_adv, labels)
    over = torch.ones_like(labels, dtype=torch.bool) if target is None else labels != target
    return Metric.of(pred_adv == labels, over)


def attack_success_rate(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, labels: torch.Tensor, target: int | None = None
) -> Metric:
    """Untargeted: fraction of the correctly classified images that the attack
    makes wrong. Targeted: fraction of images not of the target class that the
    attack makes classified as the target."""
    _check(pred_clean, pred_adv, labels)
    if target is None:
        return Metric.of(pred_adv != labels, pred_clean == labels)
    return Metric.of(pred_adv == target, labels != target)


def fooling_rate(pred_clean: torch.Tensor, pred_adv: torch.Tensor) -> Metric:
    """Fraction of all images whose prediction the attack changes (BlurNet's
    "attack success rate"; Moosavi-Dezfooli et al.'s fooling rate)."""
    _check(pred_clean, pred_adv)
    return Metric.of(pred_adv != pred_clean, torch.ones_like(pred_clean, dtype=torch.bool))
