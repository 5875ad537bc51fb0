"""Pixel robustness map and masked PGD (Hwang et al., "Where to be Adversarial
Perturbations Added? Investigating and Manipulating Pixel Robustness using Input
Gradients", ICLR 2019 DebugML workshop, Section 2 "Measuring Pixel Robustness").

* Pixel robustness map (:mod:`pipeline.attacks.robustness_map`, which PRM's defense imports
  too): the mean absolute input gradient of the loss per pixel,
  ``R_ij = 1/(|D| C) * sum_{x in D} sum_c |d L(x, y) / d x_cij|`` with ``L`` the
  cross-entropy of the true label. Averaging over a data set removes the effect of
  individual images; what remains depends on the architecture (the paper's
  observation on ImageNet). Large values mark the vulnerable pixels.
* Masked PGD: PGD (:func:`pipeline.attacks.pgd.pgd` with a ``mask``) allowed to
  change only the top-k (largest ``R``) or bottom-k (smallest ``R``) fraction of
  pixels, all channels of a chosen pixel. The paper plots top-1 accuracy after
  masked PGD against k for both choices (its accuracy-versus-k figure): top-k
  pixels hurt more, so high-gradient pixels are the vulnerable ones.
  :func:`accuracy_vs_k` computes that curve.

Units: ``k`` is a fraction (0, 1] of the H x W pixels; budgets as in
:mod:`pipeline.attacks.pgd` (pixel units of [0, 1]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from .base import Attack, register_attack
from .pgd import PGDParams, ThreatModel, frozen_eval, pgd
from .robustness_map import pixel_mask, pixel_robustness_map

__all__ = ["MaskedPGDAttack", "MaskedPGDParams", "accuracy_vs_k", "pixel_mask", "pixel_robustness_map"]


def accuracy_vs_k(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rmap: torch.Tensor,
    ks: Sequence[float],
    threat: ThreatModel,
    which: Literal["top", "bottom"] = "top",
    target: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> list[dict]:
    """Robust accuracy after masked PGD for each pixel fraction ``k`` (the paper's accuracy-versus-k curve).

    Hwang et al. 2019, Section 2 (figure "Top-1 accuracy ... after masked PGD
    attacks"). For every ``k``, PGD under ``threat`` restricted to
    :func:`pixel_mask` ``(rmap, k, which)`` attacks all images in batches of
    ``batch_size``; the model is in eval mode with frozen weights meanwhile.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits.
        x: float32 (N, C, H, W) in [0, 1] (test images); y: int64 (N,) labels.
        rmap: float (H, W) pixel robustness map (computed on training images).
        ks: pixel fractions, each in (0, 1].
        threat: the PGD budget and search settings.
        which: ``"top"`` or ``"bottom"`` pixels.
        target: class for a targeted attack, or None.
        batch_size: images per attack call.
        generator: CPU generator of the random starts (default: seeded 0).

    Returns:
        One dict per ``k``, in order: ``{"k": float, "which": str, "n_pixels": int
        (pixels attacked), "accuracy": float in [0, 1] (fraction of images still
        classified ``y``), "n_images": int}``.

    Raises:
        ValueError: no images, ``rmap`` not of shape (H, W) of ``x``, or a bad
            ``k`` / ``which`` (see :func:`pixel_mask`).
    """
    if x.ndim != 4 or len(x) == 0 or y.shape != (len(x),):
        raise ValueError(f"expected images (N, C, H, W) with N >= 1 and labels (N,), got {tuple(x.shape)}, {tuple(y.shape)}")
    if tuple(rmap.shape) != tuple(x.shape[-2:]):
        raise ValueError(f"rmap {tuple(rmap.shape)} does not match the images' (H, W) {tuple(x.shape[-2:])}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    rows = []
    with frozen_eval(model):
        for k in ks:
            mask = pixel_mask(rmap.to(x.device), k, which)
            correct = 0
            for s in range(0, len(x), batch_size):
                xb, yb = x[s : s + batch_size], y[s : s + batch_size]
                x_adv = pgd(model, xb, yb, threat, target, generator, mask=mask, record_loss=False).x_adv
                with torch.no_grad():
                    correct += int((model(x_adv).argmax(1) == yb).sum())
            rows.append({"k": float(k), "which": which, "n_pixels": int(mask.sum()),
                         "accuracy": correct / len(x), "n_images": len(x)})
    return rows


class MaskedPGDParams(PGDParams):
    """Params of ``masked_pgd``: the fields of :class:`pipeline.attacks.pgd.PGDParams` and two more.

    Attributes:
        k: fraction of the H x W pixels attacked, in (0, 1].
        which: ``"top"`` (pixels with the largest robustness-map values) or ``"bottom"``.
    """

    k: float = Field(0.25, gt=0, le=1, description="fraction of pixels attacked, in (0, 1]")
    which: Literal["top", "bottom"] = "top"


@register_attack("masked_pgd")
class MaskedPGDAttack(Attack):
    """PGD restricted to the top-k / bottom-k pixels of a pixel robustness map (Hwang et al. 2019).

    Attributes:
        robustness_map: float (H, W) map from :func:`pixel_robustness_map`, set by
            :meth:`fit` (or directly by the caller) from training images, the
            paper's data-set mean; ``None`` (default) makes :meth:`perturb` compute
            it from the batch it attacks (with the true labels), i.e. per batch of
            ``params.batch_size`` images.
        needs_fit: True: the evaluation stage calls :meth:`fit` on clean training
            images before attacking.
    """

    Params = MaskedPGDParams
    params: MaskedPGDParams
    needs_fit = True

    def __init__(self, params: MaskedPGDParams | None = None) -> None:
        super().__init__(params)
        self.robustness_map: torch.Tensor | None = None

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Set ``robustness_map`` to :func:`pixel_robustness_map` of clean training images.

        Args:
            model: the attacked model (eval mode and frozen weights for the call).
            x: float32 (N, C, H, W) in [0, 1]; y: int64 (N,).

        Raises:
            ValueError: no images or shapes that do not match.
        """
        self.robustness_map = pixel_robustness_map(model, x, y, batch_size=self.params.batch_size)

    def fitted_state(self) -> torch.Tensor | None:
        """The robustness map, float (H, W) on the CPU (``None`` before :meth:`fit`)."""
        return None if self.robustness_map is None else self.robustness_map.detach().cpu()

    def load_fitted_state(self, state: torch.Tensor | None) -> None:
        """Use ``state`` (a map from :meth:`fitted_state`) as ``robustness_map``."""
        self.robustness_map = state

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """PGD on the ``k`` fraction of pixels chosen by ``which``; float (N, C, H, W) in [0, 1].

        Uses ``self.robustness_map`` if set, else the map of this batch.

        Raises:
            ValueError: ``robustness_map`` does not have the images' (H, W) shape.
        """
        rmap = self.robustness_map if self.robustness_map is not None else pixel_robustness_map(model, x, y)
        if tuple(rmap.shape) != tuple(x.shape[-2:]):
            raise ValueError(f"robustness_map {tuple(rmap.shape)} does not match the images' (H, W) {tuple(x.shape[-2:])}")
        mask = pixel_mask(rmap.to(x.device), self.params.k, self.params.which)
        return pgd(model, x, y, self.params.threat_model(), self.params.target, generator, mask=mask,
                   record_loss=False).x_adv
