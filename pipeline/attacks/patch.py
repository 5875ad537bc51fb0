"""Universal adversarial patches: AdvP (Brown et al., "Adversarial Patch", 2017)
and LaVAN (Karmon, Zoran and Goldberg, "LaVAN: Localized and Visible
Adversarial Noise", ICML 2018), in the form the FNC paper uses (Yu et al.,
ICCV 2021, Section 3, Eq. 1-2).

The two differ only in the loss (:func:`patch_loss`): AdvP minimises the
cross-entropy to the target class; LaVAN, as in the FNC authors' code,
minimises the mean of (true-class logit - target logit). Both are universal
(one patch for every image) and localized; the location is random per image
(``location="random"``, EOT) or fixed at one corner (``location="fixed"``, as
in the LaVAN paper's fixed-location setting).

Patched input ``x_hat = (1 - M) * x + M * A(p, t)``: ``A`` places the square
patch ``p`` under a random transform ``t`` (location; optionally rotation and
scale: expectation over transformation, EOT) and ``M`` is the binary mask of the
pixels it covers. The patch maximises ``E_{x,t} log Pr(y_target | x_hat)``
(targeted) or the loss of the true class (untargeted), by signed-gradient
steps as in the FNC authors' CIFAR-10 code (jschenthu/FNS,
CIFAR10/patchattack_exp.py: zero initialisation, step 2/255 halved at
mid-training, batch 80).

Everything is batched: one ``grid_sample`` places a patch in every image of a
batch under its own transform; only the patch gets gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from pipeline.attacks.base import UniversalAttack, register_attack
from pipeline.attacks.patch_losses import get_patch_loss
from pipeline.precision import amp_dtype, autocast


def patch_side(area_fraction: float, height: int, width: int) -> int:
    """Side in pixels of a square patch covering ``area_fraction`` of an H x W image:
    ``floor(sqrt(f * H * W))`` as in the FNC authors' code (10 % of 32 x 32 -> 10).

    Raises:
        ValueError: the fraction is outside (0, 1) or the side rounds to 0.
    """
    if not 0 < area_fraction < 1:
        raise ValueError(f"patch.area_fraction must be in (0, 1), got {area_fraction}")
    side = math.floor(math.sqrt(area_fraction * height * width))
    if side < 1:
        raise ValueError(f"patch.area_fraction {area_fraction} gives a 0-pixel patch on {height}x{width} images")
    return side


@dataclass
class Placements:
    """Where and how a patch is pasted in each of N images.

    Attributes:
        top, left: float32 (N,), pixel coordinates of the top-left corner of the
            transformed patch's bounding box (integers when there is no rotation
            or scaling, so the patch pixels land exactly on image pixels).
        angle: float32 (N,), rotation in radians.
        scale: float32 (N,), side of the pasted patch over its side in pixels.
    """

    top: torch.Tensor
    left: torch.Tensor
    angle: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return len(self.top)

    def to(self, device: torch.device | str) -> Placements:
        return Placements(*(t.to(device) for t in (self.top, self.left, self.angle, self.scale)))

    def __getitem__(self, idx: slice | torch.Tensor) -> Placements:
        return Placements(self.top[idx], self.left[idx], self.angle[idx], self.scale[idx])


def sample_placements(
    n: int,
    image_size: tuple[int, int],
    side: int,
    *,
    rotation_deg: float = 0.0,
    scale_range: tuple[float, float] = (1.0, 1.0),
    generator: torch.Generator | None = None,
) -> Placements:
    """Draw N random placements with the whole (rotated, scaled) patch inside the image.

    Args:
        n: number of placements.
        image_size: (H, W) in pixels.
        side: patch side in pixels (<= min(H, W)).
        rotation_deg: angles are uniform in [-rotation_deg, rotation_deg] degrees.
        scale_range: scales are uniform in [min, max] (each <= 1).
        generator: CPU generator for reproducible placements.

    Returns:
        :class:`Placements` on the CPU.

    Raises:
        ValueError: the patch does not fit in the image.
    """
    h, w = image_size
    if side > min(h, w):
        raise ValueError(f"a {side}-pixel patch does not fit in {h}x{w} images")
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotation_deg)
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(n, generator=generator)
    extent = side * scale * (angle.cos().abs() + angle.sin().abs())  # bounding-box side
    extent = torch.where((angle == 0) & (scale == 1), torch.full_like(extent, side), extent.ceil())
    top = (torch.rand(n, generator=generator) * (h - extent + 1)).floor().clamp(min=0)
    left = (torch.rand(n, generator=generator) * (w - extent + 1)).floor().clamp(min=0)
    return Placements(top, left, angle, scale)


def _patch_grid(placements: Placements, side: int, image_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Sampling grid (N, H, W, 2) mapping each image pixel to patch coordinates in [-1, 1]."""
    h, w = image_size
    p = placements.to(device)
    extent = side * p.scale * (p.angle.cos().abs() + p.angle.sin().abs())
    cy = p.top + extent / 2  # centre of the bounding box, pixel units
    cx = p.left + extent / 2
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    dy = ys.view(1, h, 1) - cy.view(-1, 1, 1)  # (N, H, 1)
    dx = xs.view(1, 1, w) - cx.view(-1, 1, 1)  # (N, 1, W)
    cos, sin = p.angle.cos().view(-1, 1, 1), p.angle.sin().view(-1, 1, 1)
    half = (side * p.scale / 2).view(-1, 1, 1)
    gx = (cos * dx + sin * dy) / half  # inverse rotation, then to [-1, 1]
    gy = (-sin * dx + cos * dy) / half
    return torch.stack([gx, gy], dim=-1)


def apply_patch(images: torch.Tensor, patch: torch.Tensor, placements: Placements) -> torch.Tensor:
    """Paste ``patch`` into every image: ``(1 - M) * x + M * A(p, t)``.

    Args:
        images: float (N, 3, H, W) in [0, 1].
        patch: float (3, s, s) in [0, 1], or (N, 3, s, s) for one patch per image;
            gradients flow to it.
        placements: N placements (:func:`sample_placements`).

    Returns:
        Float (N, 3, H, W) in [0, 1]; pixels outside the patch are the input's, bit for bit.

    Raises:
        ValueError: mismatched batch sizes or a non-square patch.
    """
    n, c, h, w = images.shape
    if len(placements) != n:
        raise ValueError(f"{len(placements)} placements for {n} images")
    if patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"patch must be square, got {tuple(patch.shape)}")
    side = patch.shape[-1]
    grid = _patch_grid(placements, side, (h, w), images.device)
    src = patch.to(images.dtype).expand(n, c, side, side) if patch.ndim == 3 else patch.to(images.dtype)
    ones = torch.ones(n, 1, side, side, device=images.device, dtype=images.dtype)
    pasted = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.where(mask.bool(), pasted, images)


def patch_loss(logits: torch.Tensor, labels: torch.Tensor, target: int | None, attack: str = "advp") -> torch.Tensor:
    """The objective a universal patch minimises (scalar, mean over the batch).

    Args:
        logits: float (N, K).
        labels: int64 (N,) true classes.
        target: target class, or None (untargeted).
        attack: a registered loss (:mod:`pipeline.attacks.patch_losses`): ``"advp"``:
            cross-entropy to ``target`` (targeted) or minus the cross-entropy of the true
            labels (untargeted), Brown et al. 2017 as in FNC Eq. 2; ``"lavan"``:
            ``mean(z_true - z_target)`` (targeted) or ``mean(z_true - max_{k != true} z_k)``
            (untargeted), the logit margin of the FNC authors' LaVAN code (jschenthu/FNS).

    Raises:
        ValueError: unknown ``attack``.
    """
    return get_patch_loss(attack).fn(logits, labels, target)


def corner_placements(n: int, image_size: tuple[int, int], side: int) -> Placements:
    """N identical placements with the patch in the bottom-right corner (LaVAN's
    fixed-location setting), on the CPU.

    Raises:
        ValueError: the patch does not fit in the image.
    """
    h, w = image_size
    if side > min(h, w):
        raise ValueError(f"a {side}-pixel patch does not fit in {h}x{w} images")
    return Placements(torch.full((n,), float(h - side)), torch.full((n,), float(w - side)), torch.zeros(n), torch.ones(n))


class PatchTrainingConfig(BaseModel):
    """Settings of :func:`train_universal_patch` and :class:`PatchAttack` (mirrors ``patch`` in
    params; frozen, unknown keys rejected).

    ``side`` is the patch side in pixels; ``step_size`` is in pixel units of [0, 1];
    ``decay_epochs`` halve it; ``attack`` picks the loss (a registered patch loss,
    :func:`patch_loss`); ``location`` is ``"random"`` (a fresh placement per image and step,
    EOT) or ``"fixed"`` (bottom-right corner, :func:`corner_placements`); ``amp`` runs the
    forward passes in bf16 autocast where the device supports it (:mod:`pipeline.precision`;
    the patch and its gradient stay float32).

    Raises:
        pydantic.ValidationError (a ValueError): a loss that is not registered, an unknown
            location, or a value out of range.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    side: int = Field(gt=0)
    attack: str = "advp"
    location: Literal["random", "fixed"] = "random"
    target: int | None = Field(5, ge=0)
    epochs: int = Field(10, ge=0)
    step_size: float = Field(2 / 255, gt=0)
    decay_epochs: tuple[int, ...] = (5,)
    batch_size: int = Field(80, ge=1)
    rotation_deg: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    amp: bool = False

    @field_validator("attack")
    @classmethod
    def _registered_loss(cls, v: str) -> str:
        get_patch_loss(v)  # ValueError listing the registered losses
        return v


def train_universal_patch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: PatchTrainingConfig,
    seed: int,
    device: torch.device | str = "cpu",
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Optimise one universal patch against ``model`` by signed-gradient descent on
    :func:`patch_loss` (AdvP or LaVAN), a fresh random placement (EOT) per image
    per step, or the fixed corner.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits; used in eval mode,
            its parameters get no gradients.
        images: uint8 (N, C, H, W), 0-255, C 3 (RGB) or 1 (grey) (the training images;
            for a targeted patch pass only images whose label is not the target).
        labels: int64 (N,).
        cfg: patch settings.
        seed: seeds the placements and the image order.
        device: where to compute.
        init: the starting patch, float (C, s, s) in [0, 1] (a warm start from a
            transferred patch, or a random start); ``None``: zeros, as the FNC authors.

    Returns:
        ``(patch, history)``: float32 (3, s, s) in [0, 1] on the CPU, and the
        mean loss of every epoch (floats).

    Raises:
        ValueError: ``init`` of another shape or outside [0, 1] (the loss and location are
            checked by :class:`PatchTrainingConfig`).
    """
    from tqdm.auto import tqdm

    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = amp_dtype(device, cfg.amp)
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = images.shape
    if init is None:
        patch = torch.zeros(c, cfg.side, cfg.side, device=device)  # zero start, as the authors
    elif init.shape != (c, cfg.side, cfg.side) or init.min() < 0 or init.max() > 1:
        raise ValueError(f"init patch must be ({c}, {cfg.side}, {cfg.side}) in [0, 1], got {tuple(init.shape)}")
    else:
        patch = init.detach().to(device, torch.float32).clone()
    history = []
    step = cfg.step_size
    for epoch in tqdm(range(cfg.epochs), desc=f"patch seed {seed}", leave=False, disable=None):
        if epoch in cfg.decay_epochs:
            step /= 2
        order = torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = images[idx].to(device, non_blocking=True).float().div_(255)
            y = labels[idx].to(device, non_blocking=True)
            if cfg.location == "fixed":
                pl = corner_placements(len(idx), (h, w), cfg.side)
            else:
                pl = sample_placements(len(idx), (h, w), cfg.side, rotation_deg=cfg.rotation_deg,
                                       scale_range=cfg.scale_range, generator=gen)
            patch.requires_grad_(True)
            with autocast(device, dtype):
                logits = model(apply_patch(x, patch, pl)).float()
            loss = patch_loss(logits, y, cfg.target, cfg.attack)
            (grad,) = torch.autograd.grad(loss, patch)
            with torch.no_grad():
                patch = (patch - step * grad.sign()).clamp_(0, 1)
            total += loss.detach() * len(idx)
        history.append(float(total) / n)
    return patch.detach().cpu(), history


@register_attack("patch")
class PatchAttack(UniversalAttack):
    """A universal adversarial patch (AdvP, Brown et al. 2017; LaVAN, Karmon et al., ICML 2018; in
    the form of Yu et al., ICCV 2021, Eq. 1-2) of the loss ``params.attack``: :meth:`fit` is
    :func:`train_universal_patch`, :meth:`apply` is :func:`apply_patch`.

    Args:
        params: a :class:`PatchTrainingConfig`.
    """

    Params = PatchTrainingConfig

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device | str = "cpu",
            init: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
        """``(patch float32 (3, side, side) in [0, 1], per-epoch mean loss)``; see :func:`train_universal_patch`."""
        return train_universal_patch(model, x, y, self.params, seed, device, init=init)

    def apply(self, artifact: torch.Tensor, x: torch.Tensor, placements: Any = None) -> torch.Tensor:
        """``x`` with the patch at ``placements`` (:class:`Placements`; for ``location="fixed"``
        the corner when None).

        Raises:
            ValueError: no placements for a randomly placed patch.
        """
        if placements is None:
            if self.params.location != "fixed":
                raise ValueError("a randomly placed patch needs placements (sample_placements / fixed_placements)")
            placements = corner_placements(len(x), tuple(x.shape[-2:]), self.params.side)
        return apply_patch(x, artifact, placements)


@torch.no_grad()
def patch_objective(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    patch: torch.Tensor,
    placements: Placements,
    target: int | None,
    batch_size: int = 500,
    attack: str = "advp",
) -> float:
    """Mean :func:`patch_loss` of ``patch`` over uint8 ``images`` at fixed ``placements``
    (the quantity the optimisation lowers; lower is a stronger attack)."""
    model.eval()
    device = patch.device
    total, n = 0.0, len(images)
    for s in range(0, n, batch_size):
        x = images[s : s + batch_size].to(device).float().div_(255)
        y = labels[s : s + batch_size].to(device)
        logits = model(apply_patch(x, patch, placements[slice(s, s + batch_size)]))
        total += float(patch_loss(logits, y, target, attack)) * len(x)
    return total / n


def patch_training_config(patch: Any, side: int, attack: str) -> PatchTrainingConfig:
    """The :class:`PatchTrainingConfig` of ``attack`` (``advp`` / ``lavan``) from the
    ``patch`` params section (:class:`pipeline.config.PatchConfig`) and the patch side in pixels."""
    return PatchTrainingConfig(
        side=side, attack=attack, location=patch.location, target=patch.target, epochs=patch.epochs,
        step_size=patch.step_size, decay_epochs=tuple(patch.decay_epochs), batch_size=patch.batch_size,
        rotation_deg=patch.rotation, scale_range=(patch.scale_min, patch.scale_max), amp=bool(patch.amp),
    )


def patch_cache_params(patch: Any) -> dict[str, Any]:
    """The ``patch`` params a trained patch depends on, for its cache key: all but
    ``attacks`` and ``seeds`` (each patch is keyed by its own attack and seed),
    ``adaptive_restarts`` (each start of an adaptive search is keyed by its own name), and
    ``amp`` only when set (so that keys from before it existed stay valid)."""
    return patch.model_dump(exclude={"attacks", "seeds", "adaptive_restarts"} | ({"amp"} if patch.amp is None else set()))


def patch_training_images(
    x: torch.Tensor, y: torch.Tensor, target: int | None, n: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images a universal patch is optimised on: ``x`` (uint8 (N, 3, H, W)) and ``y``
    (int64 (N,)) without the ``target`` class, then a subset of ``n`` drawn with ``seed``
    (kept in their original order; ``n`` None or >= N keeps all)."""
    if target is not None:
        keep = y != target
        x, y = x[keep], y[keep]
    if n is not None and n < len(x):
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        x, y = x[idx], y[idx]
    return x.contiguous(), y.contiguous()
