"""The universal patches as a figure (the stage ``generate_patches``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.patch import apply_patch, sample_placements  # noqa: E402
from pipeline.io import save_figure, show_image  # noqa: E402


def patches_figure(patches: list[torch.Tensor], seeds: list[int], example: torch.Tensor, classes: list[str],
                   target: int | None, path: Path, attack: str) -> None:
    """``patches.png`` of generate_patches: the patches side by side (float (3, s, s) in [0, 1],
    one per seed), and ``example`` (uint8 (1, 3, H, W)) with the first patch pasted at a seeded
    random place; titled with the attack and its target class (``classes[target]``)."""
    n = len(patches)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.2 * (n + 1), 2.6))
    for ax, patch, seed in zip(axes, patches, seeds, strict=False):
        show_image(ax, patch, interpolation="nearest")
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.axis("off")
    img = example.float() / 255
    side = patches[0].shape[-1]
    pl = sample_placements(1, img.shape[-2:], side, generator=torch.Generator().manual_seed(0))
    show_image(axes[-1], apply_patch(img, patches[0], pl)[0], interpolation="nearest")
    axes[-1].set_title("pasted", fontsize=9)
    axes[-1].axis("off")
    goal = f"target: {classes[target]}" if target is not None else "untargeted"
    label = {"advp": "AdvP", "lavan": "LaVAN"}.get(attack, attack)
    fig.suptitle(f"universal adversarial patches ({label}), {goal}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
