"""Calibrate the patch detector of LGS and DW on the validation split of a finished run.

Run from the project root after ``dvc repro`` (it reads ``params.yaml``, the prepared
validation split ``data/prepared/<dataset>/val.pt`` and ``models/<model>/baseline.pt``):

    python scripts/calibrate_patch_detector.py [--defense lgs] [--max-clean-drop 0.05]

It first makes a calibration patch on the undefended model, with the run's patch params
but on training images drawn with a seed of its own (``--patch-seed``) and not on the
evaluation's patches, then measures every (window, stride, threshold) of the grid on the
validation images: the defended model's clean and robust accuracy, and what the detector
flags (:mod:`pipeline.defenses.calibration`). Neither the test split nor the evaluation's
patches are read. It prints the table and the setting to keep (the highest validation
robust accuracy among those losing at most ``--max-clean-drop`` of clean accuracy), and
writes the table to ``--out`` (CSV). Pixels in [0, 1]; windows and strides in pixels;
thresholds on the per-image min-max normalised gradient magnitude.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.attacks.patch import (
    corner_placements,
    patch_side,
    patch_training_config,
    patch_training_images,
    train_universal_patch,
)
from pipeline.checkpoint import build_from_spec, load_checkpoint
from pipeline.config import load_params
from pipeline.data import load_meta, load_tensors, load_validation
from pipeline.defenses.calibration import calibrate_detector, detector_grid, select_setting
from pipeline.evaluation import fixed_placements
from pipeline.io import atomic_write


def main(argv: list[str] | None = None) -> None:
    """Calibrate one detector; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", default="lgs", choices=["lgs", "dw"])
    parser.add_argument("--windows", default="8:4,6:2,10:2,12:4", help="window:stride pairs (pixels)")
    parser.add_argument("--thresholds", default="0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.5")
    parser.add_argument("--max-clean-drop", type=float, default=0.05, help="fraction (0.05 = 5 points)")
    parser.add_argument("--min-patch-recall", type=float, default=0.0,
                        help="keep only settings that flag at least this fraction of the patch's pixels")
    parser.add_argument("--patch-seed", type=int, default=1000, help="seed of the calibration patch's images")
    parser.add_argument("--patch-epochs", type=int, default=None, help="default: patch.epochs of params.yaml")
    parser.add_argument("--out", default=None, help="CSV of the table (default: calibration/<defense>.csv)")
    args = parser.parse_args(argv)
    params = load_params()
    prepared = Path("data/prepared") / params.data.dataset
    _, h, w = load_meta(prepared)["image_shape"]
    p = params.patch
    side = patch_side(p.area_fraction, h, w)
    x_val, y_val = patch_training_images(*load_validation(prepared), p.target, None, params.seed)
    spec = load_checkpoint(Path("models") / params.model.name / "baseline.pt")

    # the calibration patch: the run's recipe on training images of its own draw
    x_tr, y_tr = patch_training_images(*load_tensors(prepared, "train"), p.target, p.train_images, args.patch_seed)
    cfg = patch_training_config(p, side, "advp")
    if args.patch_epochs is not None:
        cfg = cfg.model_copy(update={"epochs": args.patch_epochs})
    patch, _ = train_universal_patch(build_from_spec(spec), x_tr, y_tr, cfg, args.patch_seed)

    placements = (corner_placements(len(x_val), (h, w), side) if p.location == "fixed"
                  else fixed_placements(len(x_val), 1, (h, w), side, args.patch_seed))
    windows = [tuple(int(v) for v in pair.split(":")) for pair in args.windows.split(",")]
    grid = detector_grid(windows, [float(t) for t in args.thresholds.split(",")])
    table = calibrate_detector(spec, args.defense, x_val, y_val, patch, placements, p.target, grid)
    out = Path(args.out or f"calibration/{args.defense}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(table.to_csv(index=False).encode()))
    print(f"{params.data.dataset} validation split: {len(x_val)} images (target class {p.target} left out), "
          f"calibration AdvP patch {side}x{side} on {len(x_tr)} training images (seed {args.patch_seed}), "
          f"{params.model.name}, defense {args.defense}")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    best = select_setting(table, args.max_clean_drop, args.min_patch_recall)
    if best is None:
        print(f"no setting keeps clean accuracy within {args.max_clean_drop:.0%} of the undefended model's "
              f"while flagging >= {args.min_patch_recall:.0%} of the patch; the smallest drop is "
              f"{table['clean_drop'].min():.1%}")
    else:
        print(f"keep: window {int(best['window'])}, stride {int(best['stride'])}, threshold {best['threshold']:g} "
              f"(validation clean {best['clean_accuracy']:.1%}, drop {best['clean_drop']:.1%}, robust "
              f"{best['robust_accuracy']:.1%})")
    print(f"table written to {out}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
