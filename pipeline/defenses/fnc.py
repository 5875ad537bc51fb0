"""Feature norm clipping (FNC).

Yu, Chen, Xue, Liu, Wan, Bao, Ma, "Defending Against Universal Adversarial
Patches by Clipping Feature Norms", ICCV 2021, Section 4, Eq. (4): for the
output ``f`` (N, C, H, W) of every cascaded block, at each spatial position
(i, j) of each sample,

    g_ij = f_ij / ||f_ij|| * min(||f_ij||, alpha * mean_ij ||f_ij||)

where ``||.||`` is the L2 norm over channels and the mean is over the H x W
positions of that sample's feature map (per sample, as in the authors' code,
so a prediction never depends on the other images in its batch).

A universal patch makes a few feature vectors far larger than the rest, and
global average pooling lets them dominate the logits; clipping caps them
without retraining. Inserting it shifts the feature statistics, so the
authors adjust the model afterwards (:mod:`pipeline.defenses.adjust`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pydantic import Field, model_serializer
from torch import nn

from pipeline.defenses.base import DefenseParams, register_defense
from pipeline.models import find_blocks


def feature_norm_clip(f: torch.Tensor, alpha: float, eps: float = 1e-6, bpda: bool = False) -> torch.Tensor:
    """Clip the channel L2 norm at every position to ``alpha`` x the sample's mean norm.

    Args:
        f: float feature map (N, C, H, W), any device and float dtype.
        alpha: clipping factor, > 0 (the authors use 1.0 to 1.2).
        eps: added to norms before dividing, so all-zero vectors (common after
            ReLU) stay zero instead of becoming NaN.
        bpda: Backward Pass Differentiable Approximation (Athalye et al., ICML 2018,
            Section 4.1): the forward value is the clipped map, the backward pass
            treats the clipping as the identity (straight-through). For an adaptive
            attacker: the clipping's own gradient vanishes along exactly the feature
            vectors a patch inflates (their norm is fixed at the threshold once clipped).

    Returns:
        Tensor of the same shape, dtype and device: vectors whose norm is at most
        the threshold are unchanged; longer ones are rescaled to the threshold.

    Raises:
        ValueError: ``f`` is not 4-D or ``alpha`` is not positive.
    """
    if f.ndim != 4:
        raise ValueError(f"feature_norm_clip expects (N, C, H, W) features, got shape {tuple(f.shape)}")
    if alpha <= 0:
        raise ValueError(f"fnc.alpha must be > 0, got {alpha}")
    norm = torch.linalg.vector_norm(f, ord=2, dim=1, keepdim=True)  # (N, 1, H, W)
    threshold = alpha * norm.mean(dim=(2, 3), keepdim=True)  # (N, 1, 1, 1), per sample
    if bpda:  # the identity-backward of input_transforms.bpda, the clipping computed without a graph
        with torch.no_grad():
            clipped = feature_norm_clip(f, alpha, eps)
        return f + (clipped - f).detach()
    scale = torch.clamp(threshold / (norm + eps), max=1.0)
    return f * scale


class FeatureNormClipping(nn.Module):
    """:func:`feature_norm_clip` as a module (no parameters, no buffers).

    Args:
        alpha: clipping factor ``fnc.alpha`` (> 0).
        eps: zero-norm guard.

    Attributes:
        bpda: when True the backward pass treats the clipping as the identity (see
            :func:`feature_norm_clip`); set by :func:`set_fnc_bpda` for adaptive attacks only.
    """

    def __init__(self, alpha: float, eps: float = 1e-6) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"fnc.alpha must be > 0, got {alpha}")
        self.alpha, self.eps = float(alpha), float(eps)
        self.bpda = False

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W), see :func:`feature_norm_clip`."""
        return feature_norm_clip(f, self.alpha, self.eps, self.bpda)

    def set_bpda(self, on: bool) -> None:
        """The BPDA hook (:func:`pipeline.defenses.base.set_bpda`): identity backward when ``on``."""
        self.bpda = bool(on)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, eps={self.eps}"


def _clip_output_hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return module.fnc(output)


def insert_fnc(
    model: nn.Module, alpha: float, eps: float = 1e-6, block_types: Iterable[type | str] | None = None
) -> list[str]:
    """Insert feature norm clipping after every cascaded block of ``model``, in place.

    The generic mechanism: every block :func:`pipeline.models.find_blocks` finds (instances of
    ``block_types``, classes or class names, ``fnc.block_types``; by default
    :func:`pipeline.models.fnc_block_types`: residual blocks of the CIFAR ResNets and
    torchvision ResNets, inverted residual blocks of MobileNet-V2, Inception blocks A-E of
    Inception-V3, and for other architectures the blocks inside ``nn.Sequential`` stages) gets a
    :class:`FeatureNormClipping` child named ``fnc`` and a forward hook that
    replaces the block's output by the clipped one. The state dict is unchanged
    (the clipping has no parameters), so a baseline checkpoint loads as is.

    Args:
        model: any network; modified in place.
        alpha: ``fnc.alpha``, > 0.
        eps: zero-norm guard.
        block_types: classes or class names counted as blocks; default: the rule above.

    Returns:
        Qualified names of the blocks clipped, in forward-registration order.

    Raises:
        ValueError: no block of the given types in ``model``, or FNC already
            inserted (use :func:`set_fnc_alpha` to change alpha).
    """
    blocks = find_blocks(model, block_types)
    if not blocks:
        which = "the registered block types or blocks inside nn.Sequential stages" if block_types is None else \
            [t if isinstance(t, str) else t.__name__ for t in block_types]
        raise ValueError(f"{type(model).__name__} has no block of {which}; name its block classes in fnc.block_types")
    for name, module in blocks:
        if hasattr(module, "fnc"):
            raise ValueError(f"{name}: feature norm clipping is already inserted")
    for _, module in blocks:
        module.add_module("fnc", FeatureNormClipping(alpha, eps))
        module.register_forward_hook(_clip_output_hook)
    return [name for name, _ in blocks]


def fnc_modules(model: nn.Module) -> list[FeatureNormClipping]:
    """The :class:`FeatureNormClipping` modules inserted in ``model``."""
    return [m for m in model.modules() if isinstance(m, FeatureNormClipping)]


def set_fnc_bpda(model: nn.Module, on: bool) -> int:
    """Switch BPDA (identity backward through the clipping) on or off for every FNC module of
    ``model``; the forward values never change. Returns the number of modules switched."""
    modules = fnc_modules(model)
    for m in modules:
        m.set_bpda(on)
    return len(modules)


def set_fnc_alpha(model: nn.Module, alpha: float) -> None:
    """Change ``alpha`` of every inserted clipping.

    Raises:
        ValueError: ``alpha`` <= 0 or no FNC inserted.
    """
    mods = fnc_modules(model)
    if not mods:
        raise ValueError("no feature norm clipping inserted; call insert_fnc first")
    if alpha <= 0:
        raise ValueError(f"fnc.alpha must be > 0, got {alpha}")
    for m in mods:
        m.alpha = float(alpha)


class FNCParams(DefenseParams):
    """Params of the ``fnc`` defense: ``alpha`` (> 0, clip to alpha x the mean norm),
    ``eps`` (zero-norm guard, > 0) and ``block_types`` (class names of the blocks clipped, for
    an architecture the registry does not know; null: :func:`pipeline.models.find_blocks`' rule)."""

    alpha: float = Field(1.0, gt=0)
    eps: float = Field(1e-6, gt=0)
    block_types: list[str] | None = Field(None, min_length=1)

    @model_serializer(mode="wrap")
    def _without_default_blocks(self, handler: Any) -> dict[str, Any]:
        """Leave ``block_types`` out of the dump when null, so the checkpoints' defense entries of
        the registered models stay ``{"name": "fnc", "alpha": ..., "eps": ...}``."""
        out = handler(self)
        if out.get("block_types") is None:
            out.pop("block_types", None)
        return out


@register_defense("fnc", FNCParams, "network", source="Yu et al., ICCV 2021, Section 4, Eq. (4)", bpda=True)
def apply_fnc(model: nn.Module, params: FNCParams) -> nn.Module:
    """Registry entry: :func:`insert_fnc` with ``params``; returns ``model`` (modified in place).

    Raises:
        ValueError: the model has no cascaded blocks, or FNC is already inserted.
    """
    insert_fnc(model, alpha=params.alpha, eps=params.eps, block_types=params.block_types)
    return model
