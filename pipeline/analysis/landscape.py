"""Two of the papers' analyses of where and how attacks bite.

* **PGD loss landscape** (Madry et al., ICLR 2018, Section 3, Figures 1-2; seed 003):
  the adversarial loss against PGD iteration over many random restarts, and the
  histogram of the final losses. The paper's observations: the loss plateaus after a
  few iterations and the final values are concentrated across restarts (no outliers);
  an adversarially trained model has a much lower adversarial loss.
  :func:`pgd_loss_landscape` runs :func:`pipeline.attacks.pgd.pgd` and keeps its per
  restart history; :func:`landscape_figure` draws one or more models side by side.
* **Noise block versus distance from the Grad-CAM centre** (Yu 2022, Section 3; seed
  002): a fixed noise block placed ever farther from the centre of the image's
  Grad-CAM map lowers the confidence in the predicted class less and less, which is
  why Mask-FGSM perturbs the Grad-CAM region. :func:`gradcam_distance_curve` measures
  the mean confidence against distance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.attacks.base import frozen_eval  # noqa: E402
from pipeline.attacks.gradcam import gradcam  # noqa: E402
from pipeline.attacks.pgd import ThreatModel, pgd  # noqa: E402

__all__ = ["gradcam_distance_curve", "landscape_figure", "pgd_loss_landscape"]


def pgd_loss_landscape(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Cross-entropy loss along PGD, for every random restart.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits.
        x: float (N, C, H, W) in [0, 1]; y: int64 (N,).
        threat: the budget, steps and ``restarts`` (the number of random starts drawn;
            ``random_start`` should be true).
        seed: seeds the random starts.

    Returns:
        ``{"history": float (restarts, steps + 1)`` (mean loss over the batch at the
        start and after each iteration), ``"final": float (restarts, N)`` (each image's
        final loss per restart)``}``, on the CPU.
    """
    with frozen_eval(model):
        res = pgd(model, x, y, threat, None, torch.Generator().manual_seed(seed))
    return {"history": res.loss_history.detach().cpu(), "final": res.restart_losses.detach().cpu()}


def landscape_figure(results: Mapping[str, Mapping[str, torch.Tensor]], title: str = "") -> plt.Figure:
    """Loss against iteration (one line per restart) and the histogram of final losses,
    one row per model (``results``: model label -> :func:`pgd_loss_landscape` output)."""
    fig, axes = plt.subplots(len(results), 2, figsize=(9, 3.2 * len(results)), squeeze=False)
    for row, (label, r) in zip(axes, results.items(), strict=True):
        hist = r["history"].numpy()
        for line in hist:
            row[0].plot(range(len(line)), line, color="tab:blue", alpha=0.3, lw=0.8)
        row[0].set_xlabel("PGD iteration")
        row[0].set_ylabel("cross-entropy loss")
        row[0].set_title(f"{label}: loss along PGD ({hist.shape[0]} restarts)", fontsize=9)
        row[1].hist(r["final"].flatten().numpy(), bins=40, color="tab:orange", log=True)
        row[1].set_xlabel("final loss")
        row[1].set_title(f"{label}: final losses (all restarts x images)", fontsize=9)
    fig.suptitle(title or "PGD adversarial loss landscape (Madry et al. 2018)", fontsize=10)
    fig.tight_layout()
    return fig


def _centre(cam: torch.Tensor) -> torch.Tensor:
    """Centroid (row, col) of each map, weighted by its values: (N, H, W) -> float (N, 2);
    the image centre for an all-zero map."""
    n, h, w = cam.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=cam.dtype), torch.arange(w, dtype=cam.dtype), indexing="ij")
    mass = cam.sum(dim=(1, 2))
    safe = mass.clamp_min(1e-12)
    cy = torch.where(mass > 0, (cam * yy).sum(dim=(1, 2)) / safe, torch.full_like(mass, (h - 1) / 2))
    cx = torch.where(mass > 0, (cam * xx).sum(dim=(1, 2)) / safe, torch.full_like(mass, (w - 1) / 2))
    return torch.stack([cy, cx], dim=1)


@torch.no_grad()
def _confidence(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return model(x).softmax(dim=1).gather(1, classes[:, None])[:, 0]


def gradcam_distance_curve(
    model: nn.Module,
    x: torch.Tensor,
    distances: Sequence[float],
    block: int = 6,
    angles: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Confidence in the predicted class with a noise block at a distance from the Grad-CAM centre.

    For each image: the predicted class ``c``, its Grad-CAM map and the map's centroid
    (the centre); for each distance ``d`` and each of ``angles`` directions the block's
    centre is put at ``centre + d (cos t, sin t)`` (clamped so the block stays inside
    the image), the pixels under it are replaced by the same fixed uniform noise, and the
    softmax probability of ``c`` is recorded; the curve is its mean over images and
    directions.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits (eval mode).
        x: float (N, C, H, W) in [0, 1].
        distances: distances in pixels (>= 0).
        block: side of the square noise block in pixels (1 to min(H, W)).
        angles: directions per distance (>= 1).
        seed: seeds the noise.

    Returns:
        ``{"distance": float (D,), "confidence": float (D,), "clean_confidence": float
        (scalar tensor)}``.

    Raises:
        ValueError: a block that does not fit or a negative distance.
    """
    n, c, h, w = x.shape
    if not 1 <= block <= min(h, w) or any(d < 0 for d in distances) or angles < 1:
        raise ValueError(f"block {block} must fit {h}x{w} and distances must be >= 0 (got {list(distances)})")
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    cam = gradcam(model, x, pred)
    centre = _centre(cam.cpu())
    noise = torch.rand(c, block, block, generator=torch.Generator().manual_seed(seed)).to(x.device)
    conf = []
    for d in distances:
        values = []
        for k in range(angles):
            t = 2 * math.pi * k / angles
            cy = (centre[:, 0] + d * math.sin(t)).round().long()
            cx = (centre[:, 1] + d * math.cos(t)).round().long()
            top = (cy - block // 2).clamp(0, h - block)
            left = (cx - block // 2).clamp(0, w - block)
            rows = top[:, None] + torch.arange(block)[None]  # (N, block)
            cols = left[:, None] + torch.arange(block)[None]
            m = torch.zeros(n, h, w, dtype=torch.bool)
            m[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = True
            placed = torch.zeros_like(x)
            placed[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]] = noise[None]
            xb = torch.where(m[:, None].to(x.device), placed, x)
            values.append(_confidence(model, xb, pred))
        conf.append(torch.stack(values).mean())
    return {"distance": torch.tensor([float(d) for d in distances]), "confidence": torch.stack(conf).cpu(),
            "clean_confidence": _confidence(model, x, pred).mean().cpu()}
