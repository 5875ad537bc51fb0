"""Feature norms under a universal patch and the incremental feature norm ratio (IFNR).

Yu et al., "Defending Against Universal Adversarial Patches by Clipping Feature Norms",
ICCV 2021, Section 3 (seed 000): a universal patch makes the spatial feature vectors
under and around it far longer than elsewhere, increasingly so with depth. For the
output of a block, with ``f~`` the clean features and ``f*`` the change the patch
causes (``f(patched) - f(clean)``), both (C, H, W) for one image,

    IFNR = max_ij ||f*_ij||_2 / mean_ij ||f~_ij||_2

(norms over channels at each position). The paper's ResNet-50 table gives the mean
over images per stage: conv2_3 1.05, conv3_4 1.80, conv4_6 2.98, conv5_3 3.39.

The blocks are those feature norm clipping acts on (:func:`pipeline.models.find_blocks`);
with FNC inserted, the recorded outputs are the clipped ones, so the same analysis
shows what clipping leaves of the patch's effect.
"""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.io import show_image  # noqa: E402
from pipeline.models import find_blocks  # noqa: E402

__all__ = ["block_outputs", "channel_norms", "ifnr", "ifnr_table", "norm_map_figure"]


@torch.no_grad()
def block_outputs(model: nn.Module, x: torch.Tensor,
                  block_types: Iterable[type | str] | None = None) -> dict[str, torch.Tensor]:
    """The output of every block of ``model`` for the batch ``x``.

    Args:
        model: maps float (N, 3, H, W) in [0, 1] to logits; used as it is (put it in
            eval mode first).
        x: float (N, 3, H, W) in [0, 1].
        block_types: module classes or class names recorded (default: FNC's rule,
            :func:`pipeline.models.find_blocks`).

    Returns:
        ``{qualified block name: float (N, C, h, w)}`` in forward order (after any
        FNC clipping of that block).

    Raises:
        ValueError: no block of those types in the model.
    """
    out: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_hook(lambda _m, _i, o, name=name: out.__setitem__(name, o.detach()))
               for name, module in find_blocks(model, block_types)]
    if not handles:
        raise ValueError(f"{type(model).__name__} has no blocks ({block_types or 'the rule of find_blocks'})")
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def channel_norms(f: torch.Tensor) -> torch.Tensor:
    """L2 norm over channels at every position: (N, C, h, w) -> (N, h, w)."""
    if f.ndim != 4:
        raise ValueError(f"expected features (N, C, h, w), got {tuple(f.shape)}")
    return torch.linalg.vector_norm(f, dim=1)


def ifnr(clean: torch.Tensor, patched: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-image IFNR of one block: ``max_ij ||f*_ij|| / mean_ij ||f~_ij||``.

    Args:
        clean: float (N, C, h, w) block output for the clean images (``f~``).
        patched: the same for the patched images; ``f* = patched - clean``.
        eps: guards an all-zero clean feature map.

    Returns:
        float (N,), >= 0 (0 when the patch changes nothing).
    """
    if clean.shape != patched.shape:
        raise ValueError(f"clean and patched features differ in shape: {tuple(clean.shape)} vs {tuple(patched.shape)}")
    change = channel_norms(patched - clean).flatten(1).amax(dim=1)
    return change / (channel_norms(clean).flatten(1).mean(dim=1) + eps)


def ifnr_table(model: nn.Module, clean: torch.Tensor, patched: torch.Tensor, batch_size: int = 200,
               block_types: Iterable[type | str] | None = None) -> pd.DataFrame:
    """IFNR of every block, mean and standard deviation over the images.

    Args:
        model: the network (eval mode).
        clean: float (N, 3, H, W) in [0, 1]; patched: the same images with the patch.
        batch_size: images per forward pass.
        block_types: as :func:`block_outputs`.

    Returns:
        One row per block in forward order: ``block`` (name), ``depth`` (1-based),
        ``ifnr_mean``, ``ifnr_std``, ``n_images``.
    """
    per_block: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(clean), batch_size):
        fc = block_outputs(model, clean[s : s + batch_size], block_types)
        fp = block_outputs(model, patched[s : s + batch_size], block_types)
        for name in fc:
            per_block.setdefault(name, []).append(ifnr(fc[name], fp[name]))
    rows = []
    for depth, (name, parts) in enumerate(per_block.items(), start=1):
        v = torch.cat(parts)
        rows.append({"block": name, "depth": depth, "ifnr_mean": float(v.mean()),
                     "ifnr_std": float(v.std()) if len(v) > 1 else 0.0, "n_images": len(v)})
    return pd.DataFrame(rows)


def norm_map_figure(model: nn.Module, clean: torch.Tensor, patched: torch.Tensor, title: str = "",
                    max_blocks: int = 5) -> plt.Figure:
    """Channel-norm maps of one image, clean (top row) and patched (bottom row), at up to
    ``max_blocks`` blocks spread over depth, each pair on one colour scale.

    Args:
        model: the network (eval mode); clean, patched: float (1, 3, H, W) in [0, 1].

    Returns:
        The matplotlib figure (the caller saves and closes it).
    """
    fc, fp = block_outputs(model, clean[:1]), block_outputs(model, patched[:1])
    names = list(fc)
    pick = [names[round(i * (len(names) - 1) / max(1, max_blocks - 1))] for i in range(min(max_blocks, len(names)))]
    pick = list(dict.fromkeys(pick))
    fig, axes = plt.subplots(2, len(pick) + 1, figsize=(2.2 * (len(pick) + 1), 4.6), squeeze=False)
    for row, img in enumerate((clean[0], patched[0])):
        show_image(axes[row, 0], img, interpolation="nearest")
        axes[row, 0].set_title("clean" if row == 0 else "patched", fontsize=9)
    for col, name in enumerate(pick, start=1):
        a, b = channel_norms(fc[name])[0], channel_norms(fp[name])[0]
        vmax = float(torch.maximum(a.max(), b.max()))
        for row, m in enumerate((a, b)):
            im = axes[row, col].imshow(m.numpy(), cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        axes[0, col].set_title(name, fontsize=8)
        fig.colorbar(im, ax=axes[:, col], shrink=0.7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title or "feature norms ||f_ij|| per block", fontsize=10)
    return fig
