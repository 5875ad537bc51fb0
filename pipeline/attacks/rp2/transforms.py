"""The synthetic physical-condition transforms of RP2's expectation over transformations: rotation,
scale, translation and brightness (Eykholt et al., CVPR 2018, Section 4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .params import RP2Params

__all__ = ["Transforms", "sample_transforms", "transform_images"]


@dataclass
class Transforms:
    """Random physical-condition transforms for N images (all float32 (N,) tensors).

    Attributes:
        angle: rotation in radians about the image centre (positive: clockwise as displayed).
        scale: zoom factor (> 1 enlarges the content).
        shift_x, shift_y: translation as a fraction of the image width / height.
        brightness: factor multiplying every pixel.
    """

    angle: torch.Tensor
    scale: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    brightness: torch.Tensor

    def __len__(self) -> int:
        return len(self.angle)

    def to(self, device: torch.device | str) -> Transforms:
        """The same transforms with every tensor on ``device``."""
        return Transforms(*(t.to(device) for t in (self.angle, self.scale, self.shift_x, self.shift_y, self.brightness)))


def sample_transforms(n: int, cfg: RP2Params, generator: torch.Generator | None = None) -> Transforms:
    """Draw ``n`` transforms, each parameter uniform in its ``cfg`` range.

    Args:
        n: number of transforms (>= 0).
        cfg: ``rotation`` (degrees), ``scale``, ``translate``, ``brightness``.
        generator: CPU generator, for reproducibility.

    Returns:
        :class:`Transforms` on the CPU.
    """

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    rot = math.radians(cfg.rotation)
    return Transforms(
        angle=uniform(-rot, rot),
        scale=uniform(*cfg.scale),
        shift_x=uniform(-cfg.translate, cfg.translate),
        shift_y=uniform(-cfg.translate, cfg.translate),
        brightness=uniform(*cfg.brightness),
    )


def transform_images(images: torch.Tensor, tf: Transforms) -> torch.Tensor:
    """Apply one transform per image: warp (rotation, zoom, shift), then brightness.

    The content is rotated by ``angle`` about the centre (positive: clockwise as
    displayed, row 0 at the top; ``pi/2`` equals ``torch.rot90(x, -1, (2, 3))`` on a
    square image), zoomed by ``scale`` about the centre and shifted by
    ``(shift_x * W, shift_y * H)`` pixels (positive: right, down): ``affine_grid`` + bilinear
    ``grid_sample`` (``align_corners=False``; pixels sampled from outside the image
    repeat its border). Then every pixel is multiplied by ``brightness`` and the
    result clipped to [0, 1]. Transforms that are exactly the identity leave their
    images unchanged bit for bit (no resampling).

    Args:
        images: float (N, C, H, W) in [0, 1].
        tf: N transforms (any device; moved to the images').

    Returns:
        float (N, C, H, W) in [0, 1] on the images' device; differentiable in ``images``.

    Raises:
        ValueError: the number of transforms differs from N.
    """
    n, _, h, w = images.shape
    if len(tf) != n:
        raise ValueError(f"{len(tf)} transforms for {n} images")
    # Decided where the transforms live (the CPU in training), so no device sync.
    identity = (tf.angle == 0) & (tf.scale == 1) & (tf.shift_x == 0) & (tf.shift_y == 0)
    all_identity, any_identity = bool(identity.all()), bool(identity.any())
    unit_brightness = bool((tf.brightness == 1).all())
    t = tf.to(images.device)
    out = images
    if not all_identity:
        cos, sin, s = t.angle.cos(), t.angle.sin(), t.scale
        # Output -> input map in normalised coordinates: p_in = A (p_out - d) with
        # A = D^-1 R(-angle) D / s, D = diag(W/2, H/2) (rotation in pixel units), d = 2 shift.
        a = torch.stack(
            [torch.stack([cos / s, sin * (h / w) / s], -1), torch.stack([-sin * (w / h) / s, cos / s], -1)], -2
        )  # (N, 2, 2)
        d = torch.stack([2 * t.shift_x, 2 * t.shift_y], -1).unsqueeze(-1)  # (N, 2, 1)
        theta = torch.cat([a, -(a @ d)], dim=-1).to(images.dtype)  # (N, 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = torch.where(identity.to(images.device).view(n, 1, 1, 1), images, warped) if any_identity else warped
    if not unit_brightness:
        out = (out * t.brightness.to(images.dtype).view(n, 1, 1, 1)).clamp(0, 1)
    return out
