"""RP2 as a universal attack of the registry (Eykholt et al., CVPR 2018, Eq. 3-4): one sticker
learnt over the victim set, then put on any image under the same mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.attacks.base import UniversalAttack, register_attack

from .optimize import train_rp2
from .params import RP2Params
from .sticker import _check_mask, apply_rp2

__all__ = ["RP2Attack"]


@register_attack("rp2")
class RP2Attack(UniversalAttack):
    """RP2: :meth:`fit` is :func:`~pipeline.attacks.rp2.optimize.train_rp2` on the victims,
    :meth:`apply` is :func:`~pipeline.attacks.rp2.sticker.apply_rp2` under the mask.

    Args:
        params: an :class:`RP2Params` (its ``target`` set).
        mask: (1, H, W) or (H, W) of exactly 0 / 1, where the sticker goes
            (:func:`pipeline.data.rp2.load_mask`).

    Raises:
        ValueError: a mask that is not binary or not (1, H, W) / (H, W).
    """

    Params = RP2Params

    def __init__(self, params: RP2Params, mask: torch.Tensor) -> None:
        super().__init__(params)
        _check_mask(mask, mask.shape[-2], mask.shape[-1])
        self.mask = mask

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device | str = "cpu",
            init: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """``(delta float32 (3, H, W), per-step loss terms)`` over the victims ``x`` (uint8) of
        labels ``y``; see :func:`~pipeline.attacks.rp2.optimize.train_rp2` (which starts at zero).

        Raises:
            ValueError: an ``init`` (RP2 starts from zero), or what ``train_rp2`` raises.
        """
        if init is not None:
            raise ValueError("RP2 starts its sticker at zero; init is not supported")
        return train_rp2(model, x, y, self.mask, self.params, seed, device)

    def apply(self, artifact: torch.Tensor, x: torch.Tensor, placements: Any = None) -> torch.Tensor:
        """``x`` with the sticker ``artifact`` (``delta``) under the mask, with the params' ``sticker_fill``."""
        return apply_rp2(x, artifact, self.mask, self.params.sticker_fill)
