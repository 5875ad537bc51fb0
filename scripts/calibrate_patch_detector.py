"""Calibrate the dense-gradient patch detector of LGS and DW on a finished run's data.

For each (window, stride, threshold) it prints, over the first ``--images`` test images, the
fraction of clean pixels the detector flags and, with the run's first AdvP patch pasted at
a random place in each image, the fraction of patch pixels it flags (recall) and of the
other pixels (false alarms). Run from the project root after ``dvc repro``:

    python scripts/calibrate_patch_detector.py [--images 1000] [--attack advp]

Pixels in [0, 1]; windows and strides in pixels; thresholds on the per-image min-max
normalised gradient magnitude (:func:`pipeline.defenses.input_transforms.dense_gradient_mask`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import load_params
from pipeline.data import load_tensors
from pipeline.defenses.input_transforms import dense_gradient_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--attack", default="advp")
    parser.add_argument("--windows", default="8:4,6:2,10:2", help="window:stride pairs")
    parser.add_argument("--thresholds", default="0.15,0.2,0.25,0.3,0.35,0.4")
    args = parser.parse_args()
    params = load_params()
    x, _ = load_tensors(Path("data/prepared") / params.data.dataset, "test")
    x = x[: args.images].float() / 255
    patch = torch.load(Path("patches") / params.model.name / args.attack / "seed_0.pt", weights_only=True)
    n, side, (h, w) = len(x), patch.shape[-1], x.shape[-2:]
    gen = torch.Generator().manual_seed(0)
    top = torch.randint(0, h - side + 1, (n,), generator=gen)
    left = torch.randint(0, w - side + 1, (n,), generator=gen)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    region = ((rows >= top.view(n, 1, 1)) & (rows < top.view(n, 1, 1) + side)
              & (cols >= left.view(n, 1, 1)) & (cols < left.view(n, 1, 1) + side)).unsqueeze(1)  # (N, 1, H, W)
    canvas = torch.zeros_like(x)
    for i in range(n):  # paste: n small copies, once
        canvas[i, :, top[i]:top[i] + side, left[i]:left[i] + side] = patch
    patched = torch.where(region, canvas, x)
    out = []
    for pair in args.windows.split(","):
        window, stride = (int(v) for v in pair.split(":"))
        for thr in (float(t) for t in args.thresholds.split(",")):
            flagged = dense_gradient_mask(patched, window, stride, thr)
            out.append({"window": window, "stride": stride, "threshold": thr,
                        "clean_flagged": dense_gradient_mask(x, window, stride, thr).float().mean().item(),
                        "patch_recall": (flagged & region).sum().item() / region.sum().item(),
                        "other_flagged": (flagged & ~region).sum().item() / (~region).sum().item()})
    print(f"{params.data.dataset}, {n} test images, {args.attack} patch {side}x{side} of {params.model.name}")
    print(pd.DataFrame(out).to_markdown(index=False, floatfmt=("g", "g", ".2f", ".3f", ".3f", ".3f")))


if __name__ == "__main__":
    main()
