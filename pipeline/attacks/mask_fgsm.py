"""Mask-FGSM: FGSM noise restricted to the Grad-CAM hot spots, iterated under an L0 budget.

Source: Yu Liping, "Mask-FGSM adversarial samples attack based on Grad-CAM"
(基于 Grad-CAM 的 Mask-FGSM 对抗样本攻击), Computer Applications and Software, 2022,
DOI 10.3969/j.issn.1000-386x.2022.07.030; Section 2.2 Eq. 4, Section 2.3 Eqs. 5-6,
Section 2.4 Eq. 7 and Algorithm 1.

* FGSM noise (Eq. 4): ``eta = eps * sign(grad_x J(theta, x, y))``.
* Mask (Eq. 6): ``F(S, P_th) = S`` where ``S_ij > P_th``, else 0, with ``S`` the
  Grad-CAM map (:func:`pipeline.attacks.gradcam.gradcam`, in [0, 1]) at the
  current iterate for the **true label** ``Y`` (Algorithm 1, line 3:
  ``S = Grad_CAM(F(X*), X*, Y)``). The (H, W) map weights all channels of a pixel.
* Algorithm 1: ``X* <- X``; while ``X*`` is still classified ``Y`` and
  ``||X* - X||_0 < tau``: recompute ``S`` and ``eta`` at ``X*`` and set
  ``X*_ij = X_ij + F(S, P_th)_ij * eta_ij`` (line 6). As printed the loop condition
  reads ``F(X*) != Y``, under which the loop would never start on a correctly
  classified image; the text ("stop once misclassified") fixes it to ``==``.

Line 6 adds the noise to the **clean** image ``X``, not to ``X*``: the perturbation is
re-derived, not accumulated, at every iteration (a fixed-point search for a mask and
sign pattern that fools the model), so ``|X* - X| <= eps`` value-wise. That is the
default here; ``accumulate=True`` gives the iterative reading ``X* <- X* + F * eta``
(perturbation up to ``max_iters * eps`` per value), offered because the paper is
ambiguous about which one produced its figures.

Choices the paper leaves open (documented, not from it):

* The result is clipped to [0, 1] after every step.
* The L0 budget is enforced on the returned image: a step that would change more
  than ``floor(tau * D)`` of the ``D = C * H * W`` values keeps only the
  ``floor(tau * D)`` largest changes (by ``|X* - X|``, i.e. by Grad-CAM weight in the
  default mode) and the image stops there. (Algorithm 1 checks the budget before a
  step and may overshoot it by the last step.)
* Targeted variant (not in the paper): ``eta`` descends the cross-entropy of
  ``target`` and an image stops when it is classified ``target``; ``S`` is still the
  map of the true class.
* At most ``max_iters`` iterations (the paper gives no limit).

Units: ``eps`` in pixel units of [0, 1]; ``p_th`` on the [0, 1] Grad-CAM scale;
``tau`` and the reported ``l0`` are **fractions** (0-1) of the input values changed,
counted over all C x H x W values. The paper reports L0 in percent of input features
(Eq. 7 counts the non-zero entries) and SSIM (Eq. 8): on DenseNet-161 / ImageNet (10k
images), Mask-FGSM changes 3.821 % of the input values with SSIM 0.997, against FGSM
100 % / 0.978, JSMA 4.52 % / 0.991, DeepFool 74.37 % / 0.990 (Table 1). It does not
give ``eps``, ``P_th`` or ``tau``; the defaults below are this project's guesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import Field, field_validator
from torch import nn

from .base import Attack, AttackParams, Budget, register_attack
from .gradcam import default_gradcam_layer, gradcam
from .pgd import attack_loss, check_pixel_budget, frozen_eval

__all__ = ["MaskFGSMAttack", "MaskFGSMParams", "MaskFGSMResult", "l0_fraction", "mask_fgsm"]


def l0_fraction(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of input values changed per image, the paper's L0 size (Eq. 7) divided by C*H*W.

    Args:
        x_adv, x: float (N, C, H, W).

    Returns:
        float32 (N,) in [0, 1] (multiply by 100 for the paper's percent).
    """
    return (x_adv != x).flatten(1).float().mean(1)


def _cap_changes(x0: torch.Tensor, cand: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``budget`` changed values per image (the largest ``|cand - x0|``).

    Returns the capped images (N, C, H, W) and a bool (N,) telling which were capped.
    """
    delta = (cand - x0).flatten(1)
    over = (delta != 0).sum(1) > budget
    if not bool(over.any()):
        return cand, over
    keep = torch.zeros_like(delta, dtype=torch.bool).scatter_(1, delta.abs().topk(budget, dim=1).indices, True)
    keep = (keep | ~over[:, None]).view_as(x0)
    return torch.where(keep, cand, x0), over


@dataclass
class MaskFGSMResult:
    """What :func:`mask_fgsm` returns (tensors on the input's device).

    Attributes:
        x_adv: float (N, C, H, W) in [0, 1].
        success: bool (N,), ``x_adv`` is misclassified (untargeted) or classified
            ``target`` (targeted).
        iterations: int64 (N,), the steps taken by each image (0: it was already
            misclassified, or the budget allows no change).
        l0: float32 (N,), fraction of input values changed, in [0, tau].
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor
    l0: torch.Tensor


def mask_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    p_th: float,
    tau: float,
    max_iters: int = 10,
    target: int | None = None,
    accumulate: bool = False,
    layer: nn.Module | None = None,
) -> MaskFGSMResult:
    """Mask-FGSM (Yu 2022, Algorithm 1; see the module docstring), batched.

    Every iteration makes one forward/backward pass for the prediction and the
    FGSM gradient and one for Grad-CAM, on the whole batch; images that are done
    (fooled, budget reached) are frozen by a mask and keep their iterate.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits; put in eval mode with
            frozen weights for the call.
        x: clean images, float32 (N, C, H, W) in [0, 1].
        y: true labels, int64 (N,).
        eps: FGSM step (Eq. 4), pixel units of [0, 1], > 0.
        p_th: Grad-CAM threshold ``P_th`` of Eq. 6, in [0, 1).
        tau: L0 budget, the largest fraction (0, 1] of the C*H*W input values that
            may change (at most ``floor(tau * C * H * W)`` values).
        max_iters: at most this many iterations (>= 1).
        target: class to reach (targeted variant), or None (untargeted, the paper).
        accumulate: ``X* <- X* + F * eta`` instead of the paper's ``X* <- X + F * eta``.
        layer: the Grad-CAM layer; default
            :func:`pipeline.attacks.gradcam.default_gradcam_layer`.

    Returns:
        :class:`MaskFGSMResult`.

    Raises:
        ValueError: ``x`` outside [0, 1] or shapes that do not match; ``eps``,
            ``p_th``, ``tau`` or ``max_iters`` out of range.
    """
    if x.ndim != 4 or y.shape != (len(x),):
        raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError("mask_fgsm expects images in [0, 1]; undo any normalisation (models normalise inside)")
    check_pixel_budget(eps, "eps")
    if not 0 <= p_th < 1:
        raise ValueError(f"p_th must be in [0, 1) (the Grad-CAM map is in [0, 1]), got {p_th}")
    if not 0 < tau <= 1:
        raise ValueError(f"tau is a fraction of the input values in (0, 1], got {tau}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    layer = default_gradcam_layer(model) if layer is None else layer
    x0 = x.detach()
    xa = x0.clone()
    budget = math.floor(tau * x0[0].numel() + 1e-9)  # values that may change per image
    active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
    iterations = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    with frozen_eval(model):
        for it in range(max_iters + 1):
            xg = xa.clone().requires_grad_(True)
            logits = model(xg)
            pred = logits.argmax(1)
            reached = pred != y if target is None else pred == target
            changed = (xa != x0).flatten(1).sum(1)
            active &= ~reached & (changed < budget)  # Algorithm 1, line 2
            if it == max_iters or not bool(active.any()):
                break
            (grad,) = torch.autograd.grad(attack_loss(logits, y, target).sum(), xg)
            eta = eps * grad.sign()  # Eq. 4
            s = gradcam(model, xa, y, layer)  # line 3, (N, H, W)
            f = torch.where(s > p_th, s, torch.zeros_like(s)).unsqueeze(1)  # Eq. 6 / line 5
            cand = ((xa if accumulate else x0) + f * eta).clamp(0, 1)  # line 6
            cand, _ = _cap_changes(x0, cand, budget)
            xa = torch.where(active.view(-1, 1, 1, 1), cand, xa)
            iterations += active.long()
    return MaskFGSMResult(xa.detach(), reached.detach(), iterations, l0_fraction(xa, x0))


class MaskFGSMParams(AttackParams):
    """Params of ``mask_fgsm`` (Yu 2022, Algorithm 1 inputs ``tau``, ``P_th``; Eq. 4 ``eps``).

    Attributes:
        eps: FGSM step in pixel units of [0, 1], in (0, 1]; "8/255" accepted.
        p_th: Grad-CAM threshold ``P_th``, in [0, 1).
        tau: L0 budget as a FRACTION (0, 1] of the input values (0.05 = 5 %).
        max_iters: iteration cap (>= 1).
        accumulate: ``X* <- X* + F * eta`` instead of the paper's ``X + F * eta``.
        target: inherited; a class index for the targeted variant, ``None`` untargeted.
    """

    eps: Budget = Field(8 / 255, description="FGSM step, pixel units of [0, 1]")
    p_th: float = Field(0.5, description="Grad-CAM threshold in [0, 1)")
    tau: float = Field(0.1, description="L0 budget, fraction of input values in (0, 1]")
    max_iters: int = Field(10, ge=1, description="iteration cap")
    accumulate: bool = Field(False, description="accumulate steps (X* + F*eta) instead of X + F*eta")

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, v: float) -> float:
        return check_pixel_budget(v, "eps")

    @field_validator("p_th")
    @classmethod
    def _p_th_in_range(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"p_th must be in [0, 1) (a threshold on the [0, 1] Grad-CAM map), got {v}")
        return v

    @field_validator("tau")
    @classmethod
    def _tau_in_range(cls, v: float) -> float:
        if v > 1:
            raise ValueError(
                f"tau is the L0 budget as a fraction of the input values, in (0, 1]; tau={v:g} would be "
                f"{100 * v:g} %, and a budget over 100 % is meaningless (write 0.05 for 5 %)"
            )
        if v <= 0:
            raise ValueError(f"tau must be > 0 (a fraction of the input values in (0, 1]), got {v:g}")
        return v


@register_attack("mask_fgsm")
class MaskFGSMAttack(Attack):
    """Mask-FGSM guided by Grad-CAM (Yu 2022, Algorithm 1; :func:`mask_fgsm`)."""

    Params = MaskFGSMParams
    params: MaskFGSMParams

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """float (N, C, H, W) in [0, 1], at most ``floor(tau * C * H * W)`` values changed per image."""
        p = self.params
        return mask_fgsm(model, x, y, p.eps, p.p_th, p.tau, p.max_iters, p.target, p.accumulate).x_adv
