"""The evaluate matrix: (model, defense, attack) cells on the test set.

Every cell is computed from class predictions on the same test images at the
same fixed random patch placements (drawn once from ``evaluate.placement_seed``),
so defenses and attacks differ in nothing else. Attacks:

* ``none``: clean images;
* ``advp``: each universal patch of ``generate_patches`` (one per seed), made on
  the undefended model and transferred to every defense (as the FNC authors
  evaluate);
* ``occlusion``: the control of a same-size patch of uniform noise at the same
  placements (DESIGN.md: accuracy under a patch mixes occlusion and attack).

Spread: each metric is computed per patch seed, then reported as the mean and
the standard deviation over seeds (``<metric>_std``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.attacks.patch import Placements, apply_patch, sample_placements
from pipeline.checkpoint import build_from_spec
from pipeline.metrics import attack_success_rate, clean_accuracy, fooling_rate, robust_accuracy
from pipeline.train import default_device


def fixed_placements(n_images: int, placements: int, image_size: tuple[int, int], side: int, seed: int) -> Placements:
    """``placements`` x ``n_images`` placements, entry ``p * n_images + i`` for image i."""
    gen = torch.Generator().manual_seed(seed)
    return sample_placements(n_images * placements, image_size, side, generator=gen)


def noise_patches(n: int, side: int, seed: int) -> torch.Tensor:
    """float32 (n, 3, side, side) uniform noise in [0, 1]: the occlusion control."""
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def predict_shard(
    spec: dict[str, Any],
    x: torch.Tensor,
    placements: Placements,
    patches: dict[str, torch.Tensor],
    batch_size: int = 500,
    num_threads: int = 1,
) -> dict[str, torch.Tensor]:
    """Predictions of one model on one shard, clean and under every patch.

    Args:
        spec: checkpoint dict of the (defended) model.
        x: uint8 (n, 3, H, W) test images of the shard.
        placements: ``P * n`` placements, entry ``p * n + i`` for image i.
        patches: attack name -> float (S, 3, s, s) patches in [0, 1].
        batch_size: images per forward pass.
        num_threads: torch threads of this task.

    Returns:
        ``{"none": int64 (n,), <attack>: int64 (S, P, n)}`` on the CPU.
    """
    torch.set_num_threads(max(1, num_threads))
    device = default_device()
    model = build_from_spec(spec).to(device)
    n = len(x)
    n_placements = len(placements) // max(n, 1)
    out = {"none": torch.empty(n, dtype=torch.int64)}
    for name, p in patches.items():
        out[name] = torch.empty(len(p), n_placements, n, dtype=torch.int64)
    for s in range(0, n, batch_size):
        xb = x[s : s + batch_size].to(device).float().div_(255)
        out["none"][s : s + len(xb)] = model(xb).argmax(1).cpu()
        for name, p in patches.items():
            for k in range(len(p)):
                for j in range(n_placements):
                    pl = placements[slice(j * n + s, j * n + s + len(xb))]
                    logits = model(apply_patch(xb, p[k].to(device), pl))
                    out[name][k, j, s : s + len(xb)] = logits.argmax(1).cpu()
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(vals) > 1 else 0.0


def cell_metrics(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor | None, labels: torch.Tensor, target: int | None
) -> dict[str, float | int]:
    """Metrics of one (model, defense, attack) cell.

    Args:
        pred_clean: int64 (N,) clean predictions.
        pred_adv: int64 (S, P, N) predictions under S patches at P placements,
            or None for the clean cell.
        labels: int64 (N,).
        target: the patch's target class, or None (untargeted).

    Returns:
        Clean cell: ``clean_accuracy`` and ``n_images``. Attack cell: also
        ``robust_accuracy``, ``attack_success_rate``, ``fooling_rate`` (means
        over the S seeds; each pools the P placements), their ``_std`` over
        seeds, ``n_images`` (images counted by robust accuracy and the
        success rate), ``n_seeds`` and ``placements``.
    """
    clean = clean_accuracy(pred_clean, labels)
    if pred_adv is None:
        return {"clean_accuracy": clean.value, "n_images": clean.n_images}
    n_seeds, n_placements, _ = pred_adv.shape
    per_seed: dict[str, list[float]] = {"robust_accuracy": [], "attack_success_rate": [], "fooling_rate": []}
    n_counted = 0
    for k in range(n_seeds):
        adv = pred_adv[k].reshape(-1)
        c = pred_clean.repeat(n_placements)
        y = labels.repeat(n_placements)
        ra = robust_accuracy(adv, y, target)
        per_seed["robust_accuracy"].append(ra.value)
        per_seed["attack_success_rate"].append(attack_success_rate(c, adv, y, target).value)
        per_seed["fooling_rate"].append(fooling_rate(c, adv).value)
        n_counted = ra.n_images // n_placements
    out: dict[str, float | int] = {"clean_accuracy": clean.value}
    for name, values in per_seed.items():
        out[name], out[f"{name}_std"] = _mean_std(values)
    out.update({"n_images": n_counted, "n_seeds": n_seeds, "placements": n_placements})
    return out
