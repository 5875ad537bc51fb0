"""LaVAN's loss (Karmon et al., 2018) as the FNC authors' code writes it (jschenthu/FNS): a logit margin."""

from __future__ import annotations

import torch

from pipeline.attacks.patch_losses import register_patch_loss


@register_patch_loss("lavan", "logit margin: true minus target logit (untargeted: true minus the best other)")
def lavan(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """``mean(z_true - z_target)`` over the batch, or ``mean(z_true - max_{k != true} z_k)`` with
    ``target`` None; ``logits`` float (N, K), ``labels`` int64 (N,). Minimised."""
    true = logits.gather(1, labels[:, None])[:, 0]
    if target is None:
        other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    else:
        other = logits[:, target]
    return (true - other).mean()
