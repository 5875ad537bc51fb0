"""AdvP's loss: the adversarial patch of Brown et al. (2017), as in FNC (Yu et al., ICCV 2021), Eq. 2."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attacks.patch_losses import register_patch_loss


@register_patch_loss("advp", "cross-entropy to the target (untargeted: minus the cross-entropy of the true class)")
def advp(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (float (N, K)) to class ``target``, mean over the batch; with
    ``target`` None, minus the cross-entropy of the true ``labels`` (int64 (N,)). Minimised."""
    if target is None:
        return -F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, torch.full_like(labels, target))
