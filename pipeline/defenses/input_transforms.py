"""Input-transform defenses the source papers compare with, and BPDA for attacking them.

* **Local Gradients Smoothing** (LGS; Naseer, Khan and Porikli, "Local Gradients
  Smoothing: Defense against localized adversarial attacks", WACV 2019, Section 3):
  an adversarial patch is a region of dense high-frequency noise, so where the image's
  normalised gradient magnitude is high over a whole window, the image is suppressed:
  ``x' = clip(x * (1 - lambda * g(x)), 0, 1)``, where ``g`` is the first-order gradient
  magnitude (of the grey image, min-max normalised per image to [0, 1]) kept only in
  the ``window x window`` windows (stride ``stride``) whose mean exceeds
  ``threshold`` and zero elsewhere (:func:`local_gradients_smoothing`). The paper's
  ImageNet setting: window 15, stride 5, threshold 0.1, lambda 2.3. A straight
  one-pixel edge fills about ``1 / window`` of a window, so with window 15 natural edges
  stay under the threshold; on 32x32 images the defaults are window 8, stride 4 and
  threshold 0.15 (an edge: at most 1/8 = 0.125), so edges survive and dense noise does not.
* **Random resizing and padding** (Xie, Wang, Zhang, Ren and Yuille, "Mitigating
  Adversarial Effects Through Randomization", ICLR 2018): the image is resized to a
  random side ``r`` in ``[H, H + pad)`` and zero-padded at a random offset to
  ``H + pad`` (:func:`random_resize_pad`); randomised, so it is evaluated with EOT.
* **Digital Watermarking** (DW; Hayes, "On Visible Adversarial Perturbations & Digital
  Watermarking", CVPR Workshops 2018, Section 3): find the region a localized patch
  occupies and inpaint it. Here the region is the union of windows of dense high
  gradient (the detector of LGS, :func:`dense_gradient_mask`), dilated by
  ``dilate`` pixels, and it is filled with OpenCV's inpainting (``cv2.inpaint``,
  Telea's method) (:func:`digital_watermarking`). Hayes's detector is a saliency
  map with non-maximum suppression; the gradient-window detector is this project's
  simplification, stated here. Not differentiable: attacked through BPDA. Defaults for
  32x32 images: window 6, stride 2, threshold 0.3. Those values were first picked on test
  images by an earlier version of ``scripts/calibrate_patch_detector.py``; the script now
  reads only the validation split with a calibration patch of its own
  (:mod:`pipeline.defenses.calibration`), and on it (CIFAR-10, a 73.8 % ResNet-20, 900
  validation images) no window / stride / threshold of either detector raises robust
  accuracy under a 10x10 patch while keeping clean accuracy within 5 points: the detector
  min-max normalises the gradient map per image, so a clean 32x32 image's own textures look as
  dense as a patch. At these defaults DW costs 31 points of clean accuracy on the validation
  split and LGS's 8 / 4 / 0.15 costs 25 (README, Defenses).
* **BPDA** (Athalye, Carlini and Wagner, "Obfuscated Gradients Give a False Sense of
  Security", ICML 2018, Section 4.1): a transform whose gradient is useless (LGS's
  thresholding) is attacked by using it in the forward pass and the identity in the
  backward pass (:func:`bpda`), ``x + (t(x) - x).detach()``.

Both defenses act on images in [0, 1] before the network (a forward pre-hook, see
:func:`pipeline.defenses.base.add_input_transform`; the state dict does not change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from pipeline.defenses.base import DefenseParams, add_input_transform, register_defense

__all__ = [
    "DWParams",
    "DigitalWatermarking",
    "LGSParams",
    "LocalGradientsSmoothing",
    "RandomResizePad",
    "RandomResizePadParams",
    "bpda",
    "dense_gradient_mask",
    "digital_watermarking",
    "local_gradients_smoothing",
    "random_resize_pad",
]


def bpda(x: torch.Tensor, transform) -> torch.Tensor:
    """``transform(x)`` in the forward pass, the identity's gradient in the backward pass.

    Args:
        x: float (N, C, H, W); transform: maps it to the same shape.

    Returns:
        ``x + (transform(x) - x).detach()``: the values of ``transform(x)``, with
        ``d out / d x = I``.
    """
    return x + (transform(x) - x).detach()


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """First-order gradient magnitude of the grey image, min-max normalised per image.

    Args:
        x: float (N, C, H, W) in [0, 1].

    Returns:
        float (N, 1, H, W) in [0, 1]: ``sqrt(dx^2 + dy^2)`` of the channel mean, with
        forward differences (0 on the last row / column), divided per image by its
        range after subtracting its minimum (an all-flat image gives 0).
    """
    grey = x.mean(dim=1, keepdim=True)
    dx = F.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
    g = torch.sqrt(dx * dx + dy * dy)
    lo = g.amin(dim=(2, 3), keepdim=True)
    hi = g.amax(dim=(2, 3), keepdim=True)
    return (g - lo) / (hi - lo).clamp_min(1e-12)


def dense_gradient_mask(x: torch.Tensor, window: int, stride: int, threshold: float) -> torch.Tensor:
    """Pixels inside a window whose mean normalised gradient exceeds ``threshold``.

    Args:
        x: float (N, C, H, W) in [0, 1]; window, stride: pixels; threshold: in [0, 1].

    Returns:
        bool (N, 1, H, W).

    Raises:
        ValueError: a window larger than the image or a stride < 1.
    """
    h, w = x.shape[-2:]
    if not 1 <= window <= min(h, w) or stride < 1:
        raise ValueError(f"window {window} / stride {stride} do not fit {h}x{w} images")
    g = gradient_magnitude(x)
    keep = (F.avg_pool2d(g, window, stride) > threshold).to(g.dtype)  # (N, 1, Hb, Wb) windows kept
    covered = F.conv_transpose2d(keep, torch.ones(1, 1, window, window, dtype=g.dtype, device=g.device), stride=stride)
    covered = F.pad(covered, (0, w - covered.shape[-1], 0, h - covered.shape[-2]))  # windows that do not tile exactly
    return covered > 0


def local_gradients_smoothing(
    x: torch.Tensor, window: int = 8, stride: int = 4, threshold: float = 0.15, smoothing: float = 2.3
) -> torch.Tensor:
    """LGS (Naseer et al. 2019, Eq. 1-3): suppress windows of dense high gradient.

    Args:
        x: float (N, C, H, W) in [0, 1].
        window: side of the windows (pixels), 1 <= window <= min(H, W).
        stride: step between windows (pixels), >= 1.
        threshold: a window is kept (its gradients used) if its mean normalised
            gradient exceeds this, in [0, 1].
        smoothing: ``lambda`` (>= 0).

    Returns:
        float (N, C, H, W) in [0, 1]: ``clip(x * (1 - lambda * g), 0, 1)``, where ``g``
        is :func:`gradient_magnitude` inside the kept windows and 0 elsewhere.

    Raises:
        ValueError: ``x`` not 4-D or a window larger than the image.
    """
    if x.ndim != 4:
        raise ValueError(f"LGS expects images (N, C, H, W), got {tuple(x.shape)}")
    mask = gradient_magnitude(x) * dense_gradient_mask(x, window, stride, threshold).to(x.dtype)
    return (x * (1 - smoothing * mask)).clamp(0, 1)


class LGSParams(DefenseParams):
    """Params of the ``lgs`` defense (see :func:`local_gradients_smoothing`); ``bpda``:
    attacks see the identity's gradient through it (adaptive evaluation)."""

    window: int = Field(8, ge=1, le=512)
    stride: int = Field(4, ge=1, le=512)
    threshold: float = Field(0.15, ge=0, le=1)
    smoothing: float = Field(2.3, ge=0)
    bpda: bool = True


class LocalGradientsSmoothing(nn.Module):
    """:func:`local_gradients_smoothing` as a module (optionally with BPDA gradients)."""

    def __init__(self, params: LGSParams) -> None:
        super().__init__()
        self.params = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params

        def lgs(z: torch.Tensor) -> torch.Tensor:
            return local_gradients_smoothing(z, p.window, p.stride, p.threshold, p.smoothing)

        return bpda(x, lgs) if p.bpda else lgs(x)


@register_defense("lgs", LGSParams, "input", source="Naseer et al., WACV 2019, Section 3")
def apply_lgs(model: nn.Module, params: LGSParams) -> nn.Module:
    """Registry entry: LGS before ``model``; returns ``model``."""
    return add_input_transform(model, LocalGradientsSmoothing(params))


def digital_watermarking(
    x: torch.Tensor, window: int = 12, stride: int = 4, threshold: float = 0.1, dilate: int = 1, radius: int = 3
) -> torch.Tensor:
    """DW (Hayes 2018): inpaint the windows of dense high gradient with OpenCV (Telea).

    Args:
        x: float (N, 3, H, W) in [0, 1].
        window, stride, threshold: the detector (:func:`dense_gradient_mask`).
        dilate: grow the detected region by this many pixels (>= 0).
        radius: inpainting neighbourhood radius in pixels (>= 1).

    Returns:
        float (N, 3, H, W) in [0, 1] on ``x``'s device; pixels outside the detected
        (dilated) region are unchanged bit for bit.
    """
    import cv2
    import numpy as np

    mask = dense_gradient_mask(x, window, stride, threshold)
    if dilate > 0:
        mask = F.max_pool2d(mask.float(), 2 * dilate + 1, stride=1, padding=dilate) > 0
    out = x.clone()
    imgs = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    masks = mask[:, 0].to(torch.uint8).cpu().numpy() * 255
    for i in np.flatnonzero(masks.reshape(len(masks), -1).max(axis=1)):  # only images with a detection
        filled = cv2.inpaint(np.ascontiguousarray(imgs[i]), masks[i], radius, cv2.INPAINT_TELEA)
        filled_t = torch.from_numpy(filled).to(x.device).permute(2, 0, 1).to(x.dtype) / 255
        out[i] = torch.where(mask[i], filled_t, x[i])  # only the detected region changes
    return out


class DWParams(DefenseParams):
    """Params of the ``dw`` defense (see :func:`digital_watermarking`); ``bpda``: attacks
    see the identity's gradient through it.

    Defaults for 32x32 images, chosen on the validation split (never the test split) by
    ``python scripts/calibrate_patch_detector.py --defense dw --min-patch-recall 0.95
    --max-clean-drop 0.25``: of the settings that flag at least 95 % of a calibration patch,
    the only one within 25 points of clean accuracy (README, Defenses)."""

    window: int = Field(12, ge=1, le=512)
    stride: int = Field(4, ge=1, le=512)
    threshold: float = Field(0.1, ge=0, le=1)
    dilate: int = Field(1, ge=0, le=64)
    radius: int = Field(3, ge=1, le=64)
    bpda: bool = True


class DigitalWatermarking(nn.Module):
    """:func:`digital_watermarking` as a module (with BPDA gradients by default; without,
    no gradient reaches the input through the inpainted pixels)."""

    def __init__(self, params: DWParams) -> None:
        super().__init__()
        self.params = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params

        def dw(z: torch.Tensor) -> torch.Tensor:
            return digital_watermarking(z, p.window, p.stride, p.threshold, p.dilate, p.radius)

        return bpda(x, dw) if p.bpda else dw(x)


@register_defense("dw", DWParams, "input", source="Hayes, CVPR Workshops 2018, Section 3")
def apply_dw(model: nn.Module, params: DWParams) -> nn.Module:
    """Registry entry: digital watermarking before ``model``; returns ``model``."""
    return add_input_transform(model, DigitalWatermarking(params))


def random_resize_pad(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Xie et al. 2018: resize to a random side in ``[H, H + pad)``, zero-pad randomly to ``H + pad``.

    One random size and offset per batch (as the authors' per-forward randomisation).

    Args:
        x: float (N, C, H, W) in [0, 1], square (H = W).
        pad: extra pixels of the output side (>= 1); 331 - 299 = 32 in the paper.
        generator: seeds the size and offset (CPU generator).

    Returns:
        float (N, C, H + pad, H + pad) in [0, 1].

    Raises:
        ValueError: non-square images or ``pad < 1``.
    """
    h, w = x.shape[-2:]
    if h != w or pad < 1:
        raise ValueError(f"random_resize_pad needs square images and pad >= 1, got {h}x{w}, pad {pad}")
    side = int(torch.randint(h, h + pad, (1,), generator=generator))
    resized = F.interpolate(x, size=(side, side), mode="nearest")  # the authors resize with nearest neighbour
    room = h + pad - side
    top = int(torch.randint(0, room + 1, (1,), generator=generator))
    left = int(torch.randint(0, room + 1, (1,), generator=generator))
    return F.pad(resized, (left, room - left, top, room - top))


class RandomResizePadParams(DefenseParams):
    """Params of the ``random_resize_pad`` defense: ``pad`` extra pixels (>= 1; 4 on 32x32
    images); the model must accept ``H + pad`` inputs (global pooling)."""

    pad: int = Field(4, ge=1, le=512)


class RandomResizePad(nn.Module):
    """:func:`random_resize_pad` as a module, random in every forward pass (attack it with EOT)."""

    randomized = True
    """Random in every forward pass (:func:`pipeline.attacks.base.is_randomized`)."""

    def __init__(self, params: RandomResizePadParams) -> None:
        super().__init__()
        self.pad = params.pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return random_resize_pad(x, self.pad)


@register_defense("random_resize_pad", RandomResizePadParams, "input", source="Xie et al., ICLR 2018, Section 3")
def apply_random_resize_pad(model: nn.Module, params: RandomResizePadParams) -> nn.Module:
    """Registry entry: random resizing and padding before ``model``; returns ``model``."""
    return add_input_transform(model, RandomResizePad(params))
