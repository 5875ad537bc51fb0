"""Calibration of the patch detectors of LGS and DW on the validation split.

The detector of Local Gradients Smoothing (Naseer et al., WACV 2019, Section 3) and of
this project's Digital Watermarking (Hayes, CVPR Workshops 2018, Section 3) has three
free values: the window, the stride and the threshold on the mean normalised gradient
(:func:`pipeline.defenses.input_transforms.dense_gradient_mask`). The papers give them for
ImageNet-sized images only, so for 32x32 images they are chosen here, on the validation
split (training images held out by prepare, ``data.val_per_class``) and with a patch made
for the calibration on other training images: neither the test split nor the evaluation's
own patches take part, so the test numbers are not tuned to (Carlini et al., "On
Evaluating Adversarial Robustness", 2019, Section 3).

For every candidate setting :func:`calibrate_detector` measures, on the validation images,
the defended model's clean accuracy, its robust accuracy under the calibration patch, and
what the detector flags (clean pixels, patch pixels, the rest on patched images); the
setting kept is the one with the highest robust accuracy among those whose clean accuracy
is at most ``max_clean_drop`` below the undefended model's and, optionally, that flag at least
``min_patch_recall`` of the patch's pixels (ties: the smaller clean drop).
"""

from __future__ import annotations

from itertools import product
from typing import TYPE_CHECKING, Any

import torch

from pipeline.attacks.patch import Placements, apply_patch
from pipeline.checkpoint import apply_defenses, build_from_spec
from pipeline.defenses.input_transforms import dense_gradient_mask
from pipeline.metrics import clean_accuracy, robust_accuracy

if TYPE_CHECKING:  # pandas is imported where a table is built: the defense registry imports this module
    import pandas as pd

__all__ = ["calibrate_detector", "detector_grid", "select_setting"]

DETECTOR_DEFENSES = ("lgs", "dw")
"""Defenses whose detector :func:`calibrate_detector` calibrates."""


def detector_grid(windows: list[tuple[int, int]], thresholds: list[float]) -> list[dict[str, Any]]:
    """Every (window, stride) pair with every threshold, as defense params dicts.

    Args:
        windows: ``(window, stride)`` pairs in pixels.
        thresholds: thresholds in [0, 1].
    """
    return [{"window": w, "stride": s, "threshold": t} for (w, s), t in product(windows, thresholds)]


@torch.no_grad()
def calibrate_detector(
    spec: dict[str, Any],
    defense: str,
    x: torch.Tensor,
    y: torch.Tensor,
    patch: torch.Tensor,
    placements: Placements,
    target: int | None,
    grid: list[dict[str, Any]],
    batch_size: int = 500,
) -> pd.DataFrame:
    """Measure every detector setting of ``grid`` for defense ``defense`` on validation images.

    Args:
        spec: checkpoint dict of the undefended model.
        defense: ``"lgs"`` or ``"dw"``.
        x: uint8 (N, 3, H, W) validation images (none of the patch's target class).
        y: int64 (N,) their labels.
        patch: float (3, s, s) in [0, 1], made for the calibration on training images.
        placements: N placements of the patch (one per image).
        target: the patch's target class, or None.
        grid: detector params dicts (window, stride, threshold; other params keep their defaults).
        batch_size: images per forward pass.

    Returns:
        One row per setting: its params, ``clean_accuracy`` and ``robust_accuracy`` of the defended
        model, ``clean_drop`` (the undefended model's clean accuracy minus the defended one's),
        ``clean_flagged`` (fraction of clean pixels the detector flags), ``patch_recall``
        (fraction of patch pixels flagged), ``other_flagged`` (fraction of the other pixels of
        patched images flagged), ``n_images``; fractions in [0, 1].

    Raises:
        ValueError: an unknown defense or placements that do not match the images.
    """
    if defense not in DETECTOR_DEFENSES:
        raise ValueError(f"calibration is for the detectors of {DETECTOR_DEFENSES}, got {defense!r}")
    if len(placements) != len(x):
        raise ValueError(f"{len(placements)} placements for {len(x)} images")
    xf = x.float().div(255)
    patched = torch.cat([apply_patch(xf[s : s + batch_size], patch, placements[slice(s, s + batch_size)])
                         for s in range(0, len(xf), batch_size)])
    region = torch.cat([apply_patch(torch.zeros_like(xf[s : s + batch_size, :1]).expand(-1, xf.shape[1], -1, -1),
                                    torch.ones_like(patch), placements[slice(s, s + batch_size)])
                        for s in range(0, len(xf), batch_size)])[:, :1] > 0  # (N, 1, H, W): the patch's pixels

    def predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(images[s : s + batch_size]).argmax(1) for s in range(0, len(images), batch_size)])

    base_clean = clean_accuracy(predict(build_from_spec(spec).eval(), xf), y).value
    rows = []
    for setting in grid:
        model = apply_defenses(build_from_spec(spec), [{"name": defense, **setting}]).eval()
        flagged = dense_gradient_mask(patched, setting["window"], setting["stride"], setting["threshold"])
        clean = clean_accuracy(predict(model, xf), y).value
        rows.append({**setting, "clean_accuracy": clean, "clean_drop": base_clean - clean,
                     "robust_accuracy": robust_accuracy(predict(model, patched), y, target).value,
                     "clean_flagged": float(dense_gradient_mask(xf, setting["window"], setting["stride"],
                                                                setting["threshold"]).float().mean()),
                     "patch_recall": float((flagged & region).sum() / region.sum().clamp_min(1)),
                     "other_flagged": float((flagged & ~region).sum() / (~region).sum().clamp_min(1)),
                     "n_images": len(x)})
    import pandas as pd

    return pd.DataFrame(rows)


def select_setting(table: pd.DataFrame, max_clean_drop: float, min_patch_recall: float = 0.0) -> pd.Series | None:
    """The row of :func:`calibrate_detector`'s table to keep.

    Args:
        table: :func:`calibrate_detector`'s table (validation-split measurements).
        max_clean_drop: largest clean-accuracy drop admitted (fraction, 0.05 = 5 points).
        min_patch_recall: smallest fraction of the calibration patch's pixels the detector must
            flag (0: any); with a positive value only settings that find the patch are kept.

    Returns:
        The admitted row of highest robust accuracy (ties: the smaller clean drop), or None when
        no setting is admitted.
    """
    ok = table[(table["clean_drop"] <= max_clean_drop + 1e-9) & (table["patch_recall"] >= min_patch_recall - 1e-9)]
    if ok.empty:
        return None
    return ok.sort_values(["robust_accuracy", "clean_drop"], ascending=[False, True]).iloc[0]
