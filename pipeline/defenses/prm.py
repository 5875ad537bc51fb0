"""PRM, the Pixel Robustness Manipulator (Hwang et al., "Where to be Adversarial
Perturbations Added? Investigating and Manipulating Pixel Robustness using Input
Gradients", ICLR 2019 DebugML workshop, Section 3; seed 004).

The first convolution is given sparse connections: it sees a designated set ``M`` of
about 25 % of the pixels at full weight and the others attenuated by ``1 - lambda``,
``conv(x * (1 - lambda * (1 - M)))``. Input gradients then concentrate on the designated
pixels (the gradient at an other pixel is ``1 - lambda`` times what it would be), more so
as ``lambda`` grows, at some cost in accuracy; the paper measures this with the IoU
between the top-25 % pixels of the mean absolute input gradient and ``M``
(:func:`designated_iou`). As a defense, ``M`` is re-drawn at random at every inference
(``randomize: true``), so an attack aimed at the pixels that mattered when it was made
meets a model that now weights other pixels.

The source gives the module only as a figure ("the first convolutional layer can be
replaced with any convolutional filter with sparse connections") and a weight
``lambda``; the attenuation above is this project's reading of it, stated so that it can
be checked: ``lambda = 0`` is the unmodified network, ``lambda = 1`` sees only ``M``.
``M`` is a seeded random set of pixels (the same for every channel and image).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pipeline.attacks.robustness_map import pixel_robustness_map
from pipeline.defenses.base import DefenseParams, register_defense

__all__ = ["PRMConv", "PRMParams", "designated_iou", "designated_mask", "insert_prm", "prm_iou"]


def designated_mask(height: int, width: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A random set of ``round(fraction * H * W)`` pixels: bool (H, W).

    Raises:
        ValueError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"prm.fraction must be in (0, 1], got {fraction}")
    n = max(1, round(fraction * height * width))
    idx = torch.randperm(height * width, generator=generator)[:n]
    mask = torch.zeros(height * width, dtype=torch.bool)
    mask[idx] = True
    return mask.view(height, width)


class PRMConv(nn.Module):
    """The first convolution with PRM's sparse connections.

    Args:
        conv: the network's first ``nn.Conv2d`` (its weights are kept and trained).
        fraction: share of designated pixels, in (0, 1] (0.25 in the paper).
        lam: ``lambda`` in [0, 1]: other pixels are multiplied by ``1 - lam``.
        seed: seeds the designated set (and the re-draws).
        randomize: in eval mode, draw a new designated set at every forward pass.

    ``forward``: float (N, C, H, W) -> the convolution's output. The designated set is
    drawn for the first input size seen and kept (``mask``, bool (H, W)).
    """

    def __init__(self, conv: nn.Conv2d, fraction: float, lam: float, seed: int, randomize: bool) -> None:
        super().__init__()
        if not 0 <= lam <= 1:
            raise ValueError(f"prm.lam must be in [0, 1], got {lam}")
        self.conv, self.fraction, self.lam, self.randomize = conv, float(fraction), float(lam), bool(randomize)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.mask: torch.Tensor | None = None

    @property
    def randomized(self) -> bool:
        """True when the forward pass draws a new designated set (``randomize`` in eval mode)."""
        return self.randomize and not self.training

    def weights(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The per-pixel input weights (1 on the designated set, ``1 - lam`` elsewhere), (H, W)."""
        if self.mask is None or self.mask.shape != (height, width) or (self.randomize and not self.training):
            self.mask = designated_mask(height, width, self.fraction, self.generator)
        m = self.mask.to(device)
        return torch.where(m, 1.0, 1.0 - self.lam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(x.shape[-2], x.shape[-1], x.device).to(x.dtype)
        return self.conv(x * w)

    def training_mask(self, height: int, width: int) -> torch.Tensor:
        """The designated set the network was trained with, bool (H, W): the first draw
        of a generator seeded with ``seed`` (training keeps it; it is not in the state dict)."""
        return designated_mask(height, width, self.fraction, torch.Generator().manual_seed(self.seed))

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}, lam={self.lam}, randomize={self.randomize}"


class PRMParams(DefenseParams):
    """Params of the ``prm`` defense: ``fraction`` of designated pixels (0.25), ``lam``
    (``lambda`` in [0, 1]), ``seed`` of the designated set, ``randomize`` (re-draw it at
    every inference: the defense)."""

    fraction: float = Field(0.25, gt=0, le=1)
    lam: float = Field(0.5, ge=0, le=1)
    seed: int = 0
    randomize: bool = True

    def trainable(self) -> bool:
        """Always: the network is trained (fine-tuned) with the sparse first layer."""
        return True


def insert_prm(model: nn.Module, params: PRMParams) -> PRMConv:
    """Replace the first ``nn.Conv2d`` of ``model`` by a :class:`PRMConv` around it, in place.

    The wrapped convolution's state-dict keys gain a ``.conv`` level.

    Raises:
        ValueError: the model has no convolution or already has a PRM.
    """
    if any(isinstance(m, PRMConv) for m in model.modules()):
        raise ValueError("PRM is already inserted in this model")
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                prm = PRMConv(child, params.fraction, params.lam, params.seed, params.randomize)
                parent.add_module(name, prm)
                return prm
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d for PRM to replace")


@register_defense("prm", PRMParams, "network", source="Hwang et al., ICLR 2019 DebugML workshop, Section 3")
def apply_prm(model: nn.Module, params: PRMParams) -> nn.Module:
    """Registry entry: :func:`insert_prm`; returns ``model``."""
    insert_prm(model, params)
    return model


def designated_iou(robustness_map: torch.Tensor, mask: torch.Tensor) -> float:
    """IoU between the top pixels of a robustness map and the designated set (the paper's metric).

    Args:
        robustness_map: float (H, W), the mean absolute input gradient per pixel
            (:func:`pipeline.attacks.robustness_map.pixel_robustness_map`).
        mask: bool (H, W), the designated pixels; as many top pixels are taken as it has.

    Returns:
        ``|top ∩ M| / |top ∪ M|`` in [0, 1].
    """
    k = int(mask.sum())
    top = torch.zeros(mask.numel(), dtype=torch.bool)
    top[robustness_map.flatten().topk(k).indices] = True
    m = mask.flatten().cpu()
    return float((top & m).sum()) / float((top | m).sum())


def prm_iou(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float | None:
    """The paper's PRM metric for a model: IoU between the top pixels of its pixel
    robustness map and the designated set it was trained with (Hwang et al. 2019, Section 3).

    The map is measured with that set held fixed (re-drawing it at every inference, the
    defense, would average the map over random sets); the layer's settings are restored.

    Args:
        model: a network with a :class:`PRMConv` (the first one is measured).
        x: float (N, C, H, W) in [0, 1]; y: int64 (N,).

    Returns:
        The IoU in [0, 1], or ``None`` when the model has no PRM layer.
    """
    layer = next((m for m in model.modules() if isinstance(m, PRMConv)), None)
    if layer is None:
        return None
    mask = layer.training_mask(x.shape[-2], x.shape[-1])
    saved = layer.randomize, layer.mask
    layer.randomize, layer.mask = False, mask
    try:
        rmap = pixel_robustness_map(model, x, y, batch_size)
    finally:
        layer.randomize, layer.mask = saved
    return designated_iou(rmap, mask)
