"""How an RP2 sticker does: BlurNet's L2 dissimilarity, the lambda that reaches a distortion,
and the rates on the victims (Raju and Lipasti, 2019; Eykholt et al., CVPR 2018)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.attacks.base import frozen_eval

from .params import RP2Params
from .sticker import apply_rp2
from .transforms import sample_transforms, transform_images

__all__ = ["evaluate_rp2", "l2_dissimilarity", "lambda_for_dissimilarity"]


def l2_dissimilarity(x: torch.Tensor, x_adv: torch.Tensor) -> float:
    """BlurNet's L2 dissimilarity: ``mean_n ||x_n - x_adv_n||_2 / ||x_adv_n||_2``.

    Raju and Lipasti (2019), after Eykholt et al. (2018); each norm over the
    C x H x W values of one image, the ratio per image, then the mean over images.
    Unit-free (the same for images in [0, 1] or 0-255, as long as both use one scale).
    Same definition as ``l2_dissimilarity`` in :func:`pipeline.metrics.perturbation_sizes`.

    Args:
        x: clean images (N, C, H, W), float in [0, 1] or uint8.
        x_adv: adversarial images, same shape and scale.

    Returns:
        The mean ratio, a float >= 0.

    Raises:
        ValueError: shapes differ, are not 4-D, N = 0, or an ``x_adv`` image is all zero.
    """
    if x.shape != x_adv.shape or x.ndim != 4 or len(x) == 0:
        raise ValueError(f"expected two equal non-empty (N, C, H, W) batches, got {tuple(x.shape)}, {tuple(x_adv.shape)}")
    xf, af = x.float().flatten(1), x_adv.to(x.device).float().flatten(1)
    denom = af.norm(dim=1)
    if bool((denom == 0).any()):
        raise ValueError("l2_dissimilarity: an adversarial image is all zero (its norm divides)")
    return float(((xf - af).norm(dim=1) / denom).mean())


def lambda_for_dissimilarity(lambdas: list[float], dissimilarities: list[float], target: float) -> float:
    """The ``lambda`` at which RP2's mean L2 dissimilarity meets ``target``, from a measured sweep.

    The penalty ``lambda * ||M . delta||_p`` of Eykholt et al. (2018, Eq. 3) sets the
    sticker's size only indirectly; BlurNet's slides compare defenses at one distortion
    (mean L2 dissimilarity 0.207 on the undefended model). Given stickers trained at a grid
    of lambdas (on validation images, never the evaluation's victims) and their mean
    :func:`l2_dissimilarity`, this returns the lambda that meets ``target``: linear
    interpolation in ``log lambda`` between the two neighbouring grid points whose
    dissimilarities bracket it (the first such pair in increasing lambda), or the grid
    point nearest to ``target`` when no pair brackets it.

    Args:
        lambdas: the grid, each > 0, any order.
        dissimilarities: the mean L2 dissimilarity measured at each lambda (unit-free, >= 0).
        target: the wanted mean L2 dissimilarity.

    Returns:
        The lambda, a float > 0.

    Raises:
        ValueError: empty or unequal lists, or a lambda <= 0.
    """
    if not lambdas or len(lambdas) != len(dissimilarities) or min(lambdas) <= 0:
        raise ValueError(f"need equal non-empty lists and every lambda > 0, got {lambdas} and {dissimilarities}")
    pairs = sorted(zip(lambdas, dissimilarities, strict=True))
    for (lam0, d0), (lam1, d1) in zip(pairs, pairs[1:], strict=False):
        if d0 != d1 and min(d0, d1) <= target <= max(d0, d1):
            t = (target - d0) / (d1 - d0)
            return math.exp(math.log(lam0) + t * (math.log(lam1) - math.log(lam0)))
    return min(pairs, key=lambda p: abs(p[1] - target))[0]


@torch.no_grad()
def evaluate_rp2(
    model: nn.Module,
    victims_uint8: torch.Tensor,
    labels: torch.Tensor,
    delta: torch.Tensor,
    mask: torch.Tensor,
    cfg: RP2Params,
    transforms: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """How the sticker does on the victims (digitally, and optionally under transforms).

    Args:
        model: maps float images in [0, 1] to logits; used in eval mode (restored after).
        victims_uint8: uint8 (N, 3, H, W), 0-255.
        labels: int64 (N,) true classes.
        delta: float (3, H, W) from :func:`train_rp2`.
        mask: (1, H, W) of 0 / 1.
        cfg: the settings it was trained with (target, sticker_fill, transform ranges).
        transforms: if > 0, also the target rate over this many random transforms of
            each adversarial victim (same ranges as training, drawn with ``seed``).
        seed: seed of those transforms.

    Returns:
        ``clean_accuracy`` (predictions == labels, clean), ``fooling_rate`` (BlurNet's
        "attack success rate": predictions changed by the sticker), ``target_success``
        (adversarial predictions == target), ``l2_dissimilarity`` (see
        :func:`l2_dissimilarity`), ``n_images``, and with ``transforms > 0``
        ``target_success_transformed``. Fractions in [0, 1]. Also ``fooled``: bool (N,),
        CPU, which victims the sticker fools (for paired comparisons between models).

    Raises:
        ValueError: as :func:`apply_rp2`.
    """
    from pipeline.metrics import clean_accuracy, fooling_rate

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with frozen_eval(model):
        x = victims_uint8.to(device).float().div_(255)
        y = labels.to(device)
        adv = apply_rp2(x, delta.to(device), mask.to(device), cfg.sticker_fill)
        pred_clean, pred_adv = model(x).argmax(1), model(adv).argmax(1)
        out = {
            "clean_accuracy": clean_accuracy(pred_clean, y).value,
            "fooling_rate": fooling_rate(pred_clean, pred_adv).value,
            "target_success": float((pred_adv == cfg.target).float().mean()),
            "l2_dissimilarity": l2_dissimilarity(x, adv),
            "n_images": float(len(x)),
            "fooled": (pred_adv != pred_clean).cpu(),
        }
        if transforms > 0:
            gen = torch.Generator().manual_seed(seed)
            batch = adv.repeat(transforms, 1, 1, 1)
            pred = model(transform_images(batch, sample_transforms(len(batch), cfg, gen))).argmax(1)
            out["target_success_transformed"] = float((pred == cfg.target).float().mean())
    return out
