"""RP2's victim set and sticker masks (Eykholt et al., "Robust Physical-World Attacks on
Deep Learning Visual Classification", CVPR 2018), read in place.

The folder layout is that of ``shared/datasets/rp2-stop-signs`` (taken from the authors'
repository evtimovi/robust_physical_perturbations, see that folder's README)::

    victim-32/<n>.png      40 US stop-sign photographs, 32x32 RGB (n = 1..41, 14 missing)
    victim-256/<n>.png     the same 40 signs at 256x256
    masks/rectangles-32.png, masks/octagon-32.png, masks/rectangles-256.png

Every victim is a stop sign: with a GTSRB classifier their true label is class 14
(:data:`pipeline.data.datasets.GTSRB_STOP`).

Mask rule (:func:`binarize_mask`, :func:`load_mask`): a mask PNG is read as 8-bit RGB
(grey, palette and RGBA files are converted to RGB by Pillow, alpha dropped); each
pixel's value is the maximum of its three channels, 0-255; when the PNG's size differs
from the images', that grey map is resized to the image size by area averaging
(Pillow's ``BOX`` filter); a pixel belongs to the mask iff its value is >= 128
(:data:`MASK_THRESHOLD`, half of 255). The shipped ``rectangles-32.png`` holds a few
stray channel values of 1 and 2, which this rule drops (30 pixels, 2.93 % of the image,
remain). For a black-and-white PNG resized down, a pixel is kept iff at least half its
area was white.

Every problem is a :class:`pipeline.data.sources.DatasetError` with a one-line message
naming the file and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.data.datasets import decode_image
from pipeline.data.sources import IMAGE_SUFFIXES, DatasetError

__all__ = [
    "MASK_THRESHOLD",
    "RP2_VICTIMS",
    "binarize_mask",
    "load_mask",
    "load_victims",
    "rectangles_mask",
]

MASK_THRESHOLD = 128
"""A mask pixel whose channel maximum (0-255) is at least this is part of the sticker."""

RP2_VICTIMS = 40
"""Number of stop signs in RP2's victim set."""


def _sort_key(path: Path) -> tuple[int, int | str]:
    """Numeric stems first in numeric order (1, 2, ..., 41), then other names."""
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def load_victims(root: str | Path, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Read RP2's victim images (all stop signs) as uint8 tensors.

    Args:
        root: the RP2 folder (holding ``victim-<size>/``), or directly a folder of
            image files.
        size: side of the victim images in pixels: 32 (the 32x32 classifiers' input)
            or 256; picks ``victim-<size>/`` and is checked against every image.

    Returns:
        ``(images, names)``: uint8 tensor ``(N, 3, size, size)``, RGB, 0-255 (N = 40 for
        the shipped set), in numeric file order ``1, 2, ..., 41``; and the file stems
        in the same order (``["1", "2", ...]``).

    Raises:
        DatasetError: the folder is missing or holds no images, an image does not
            decode, or an image is not ``size`` x ``size``.
    """
    root = Path(root).expanduser()
    folder = root / f"victim-{size}" if (root / f"victim-{size}").is_dir() else root
    if not folder.is_dir():
        raise DatasetError(f"{root}: no such folder; point it at the RP2 folder holding victim-{size}/")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_sort_key)
    if not files:
        raise DatasetError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)}); expected victim-{size}/<n>.png")
    arrays = []
    for f in files:
        try:
            a = decode_image(f.read_bytes(), str(f))
        except (ValueError, OSError) as exc:
            raise DatasetError(str(exc).splitlines()[0]) from exc
        if a.shape != (3, size, size):
            raise DatasetError(f"{f}: image is {a.shape[2]}x{a.shape[1]}, expected {size}x{size}; use victim-{a.shape[1]}")
        arrays.append(a)
    return torch.from_numpy(np.stack(arrays)), [f.stem for f in files]


def binarize_mask(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Binarise an 8-bit mask: a pixel is in the mask iff its channel maximum >= 128.

    Args:
        values: integer (uint8) mask values 0-255, shape ``(H, W)`` or channels-first
            ``(C, H, W)`` (tensor or numpy array).

    Returns:
        float32 tensor ``(1, H, W)`` holding exactly 0.0 and 1.0 (1 = the
        perturbation may go there), on the input's device for a tensor input.

    Raises:
        ValueError: a floating-point input (pass 0-255 integers) or a shape other
            than 2-D / 3-D.
    """
    t = torch.from_numpy(np.array(values)) if isinstance(values, np.ndarray) else torch.as_tensor(values)
    if t.is_floating_point():
        raise ValueError("binarize_mask: pass integer mask values 0-255, not floats")
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim != 3:
        raise ValueError(f"binarize_mask: expected (H, W) or (C, H, W) values, got shape {tuple(t.shape)}")
    return (t.amax(dim=0, keepdim=True) >= MASK_THRESHOLD).to(torch.float32)


def load_mask(path: str | Path, size: int | Sequence[int] = 32) -> torch.Tensor:
    """Read a sticker mask PNG, resize it to the image size and binarise it.

    The rule is in the module docstring: channel maximum, area-average resize to
    ``size`` when needed, keep pixels >= 128.

    Args:
        path: the mask image (white = where the perturbation may go, black elsewhere).
        size: image side ``S`` or ``(H, W)`` of the images the mask is for.

    Returns:
        float32 tensor ``(1, H, W)`` of exactly 0.0 / 1.0, on the CPU.

    Raises:
        DatasetError: the file is missing or does not decode; its aspect ratio differs
            from the images' by more than 1 % (resizing would distort the sticker);
            or no pixel is >= 128 after resizing (an empty mask).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"load_mask: size must be positive, got {size!r}")
    if not path.is_file():
        raise DatasetError(f"{path}: mask file not found; give the path of a mask PNG (white where the sticker goes)")
    try:
        with Image.open(path) as im:
            grey = Image.fromarray(np.asarray(im.convert("RGB"), dtype=np.uint8).max(axis=2))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: not a decodable image ({exc}); replace the mask file") from exc
    mh, mw = grey.height, grey.width
    if (mh, mw) != (h, w):
        if abs((mh / mw) / (h / w) - 1) > 0.01:
            raise DatasetError(
                f"{path}: mask is {mw}x{mh} but the images are {w}x{h}; its aspect ratio differs, so resizing "
                "would distort the sticker; make a mask with the images' aspect ratio"
            )
        grey = grey.resize((w, h), resample=Image.Resampling.BOX)
    mask = binarize_mask(np.asarray(grey, dtype=np.uint8))
    if not bool(mask.any()):
        peak = int(np.asarray(grey).max())
        raise DatasetError(
            f"{path}: mask is empty after binarising at {MASK_THRESHOLD} (largest value {peak} at {w}x{h}); "
            "white (>= 128) must mark where the sticker goes"
        )
    return mask


def rectangles_mask(
    size: int = 32,
    bars: Sequence[tuple[float, float]] = ((0.22, 0.28), (0.72, 0.78)),
    columns: tuple[float, float] = (0.25, 0.75),
) -> torch.Tensor:
    """A generated sticker mask of horizontal bars, for images without a shipped mask.

    Two bars by default, one above and one below a sign's centre, like the two
    graffiti-style stickers of RP2 (Eykholt et al., CVPR 2018, Fig. 1, "LOVE" /
    "HATE" above and below the STOP lettering). On the 32x32 victims the default bars
    are rows 7-8 and 23-24, columns 8-23 (64 pixels, 6.25 % of the image): on the red
    field just above and below the lettering.

    Args:
        size: image side ``S`` in pixels.
        bars: ``(top, bottom)`` of each bar as fractions of the side in [0, 1];
            a bar covers rows ``round(top*S)`` to ``round(bottom*S) - 1``.
        columns: ``(left, right)`` of every bar as fractions of the side; columns
            ``round(left*S)`` to ``round(right*S) - 1``.

    Returns:
        float32 tensor ``(1, S, S)`` of exactly 0.0 / 1.0, on the CPU.

    Raises:
        ValueError: ``size < 1``, no bars, a fraction outside [0, 1], a bar or the
            column range with ``start >= end``, or a bar that rounds to no pixel.
    """
    if size < 1:
        raise ValueError(f"rectangles_mask: size must be >= 1, got {size}")
    if not bars:
        raise ValueError("rectangles_mask: give at least one bar")
    mask = torch.zeros(1, size, size, dtype=torch.float32)
    left, right = columns
    if not 0 <= left < right <= 1:
        raise ValueError(f"rectangles_mask: columns must satisfy 0 <= left < right <= 1, got {columns}")
    c0, c1 = round(left * size), round(right * size)
    for top, bottom in bars:
        if not 0 <= top < bottom <= 1:
            raise ValueError(f"rectangles_mask: each bar must satisfy 0 <= top < bottom <= 1, got {(top, bottom)}")
        r0, r1 = round(top * size), round(bottom * size)
        if r1 <= r0 or c1 <= c0:
            raise ValueError(f"rectangles_mask: bar {(top, bottom)} x columns {columns} covers no pixel at size {size}")
        mask[:, r0:r1, c0:c1] = 1.0
    return mask
