"""Regenerate the README's pictures and result files from a finished ``dvc repro``.

Run from the project root after the default profile has run to the end:

    python scripts/readme_figures.py [--out docs/results/default-profile]

Writes ``patch_fnc.png`` (the first AdvP patch, and test images clean, patched under the
baseline, patched under FNC, each with its prediction) and copies the run's metrics,
plots, report, every defended model's training metrics and ``dvc.lock`` into ``--out``.
Nothing here is drawn by hand: every number and picture comes from the run's outputs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.patch import apply_patch, sample_placements  # noqa: E402
from pipeline.checkpoint import build_from_spec, load_checkpoint  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import load_meta, load_tensors  # noqa: E402
from pipeline.io import load_torch, save_figure  # noqa: E402

COPY = ["metrics/prepare.json", "metrics/train_baseline.json", "metrics/generate_patches.json",
        "metrics/evaluate.json", "metrics/evaluate.md", "plots/evaluate.csv", "plots/evaluate.png",
        "plots/train_baseline.csv", "plots/patch_loss.csv", "reports/report.md", "reports/report.html", "dvc.lock",
        "analysis/{model}/feature_norms/ifnr.png", "analysis/{model}/feature_norms/ifnr.csv",
        "analysis/{model}/pixel_robustness/pixel_robustness.png", "analysis/{model}/pixel_robustness/prm_iou.csv",
        "analysis/{model}/loss_landscape/loss_landscape.png",
        "analysis/{model}/gradcam_distance/confidence_vs_distance.png"]


def patch_figure(params, out: Path, n: int = 4) -> Path:
    """The patch and ``n`` test images the patch fools on the baseline, with predictions
    clean, patched (baseline) and patched (FNC)."""
    name = params.model.name
    meta = load_meta(Path("data/prepared") / params.data.dataset)
    classes, target = meta["classes"], params.patch.target
    base = build_from_spec(load_checkpoint(Path("models") / name / "baseline.pt")).eval()
    fnc = build_from_spec(load_checkpoint(Path("models") / name / "fnc.pt")).eval()
    patch = load_torch(Path("patches") / name / "advp" / f"seed_{params.patch.seeds[0]}.pt")
    x, y = load_tensors(Path("data/prepared") / params.data.dataset, "test")
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:500]
    x, y = x[keep].float() / 255, y[keep]
    pl = sample_placements(len(x), x.shape[-2:], patch.shape[-1], generator=torch.Generator().manual_seed(1))
    xp = apply_patch(x, patch, pl)
    with torch.no_grad():
        pc, pb, pf = base(x).argmax(1), base(xp).argmax(1), fnc(xp).argmax(1)
    show = ((pc == y) & (pb == target) & (pf == y) & (y != target)).nonzero().flatten()[:n]
    fig, axes = plt.subplots(len(show), 4, figsize=(8.4, 2.2 * len(show)), squeeze=False)
    for row, i in zip(axes, show.tolist(), strict=True):
        row[0].imshow(patch.permute(1, 2, 0).numpy(), interpolation="nearest")
        row[0].set_title("AdvP patch", fontsize=8)
        for ax, img, label in ((row[1], x[i], f"clean: {classes[pc[i]]}"),
                               (row[2], xp[i], f"patched, baseline: {classes[pb[i]]}"),
                               (row[3], xp[i], f"patched, FNC: {classes[pf[i]]}")):
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_title(label, fontsize=8, color="tab:red" if "baseline" in label else "black")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{name}: a {params.patch.area_fraction:.0%} patch targeted at '{classes[target]}', "
                 f"FNC alpha {params.fnc.alpha}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out / "patch_fnc.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/default-profile", type=Path)
    args = parser.parse_args()
    params = load_params()
    args.out.mkdir(parents=True, exist_ok=True)
    for rel in COPY:
        src = Path(rel.format(model=params.model.name))
        if src.is_file():
            shutil.copy2(src, args.out / src.name)
    for src in sorted(Path("metrics/train_defended").glob("*.json")):  # one file per defended model
        shutil.copy2(src, args.out / f"train_defended_{src.name}")
    print(patch_figure(params, args.out))


if __name__ == "__main__":
    main()
