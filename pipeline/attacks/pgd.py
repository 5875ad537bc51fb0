"""FGSM and PGD under L-inf and L2 budgets (Madry et al., "Towards Deep Learning
Models Resistant to Adversarial Attacks", ICLR 2018, Section 2, Eq. 2; FGSM:
Goodfellow et al., ICLR 2015).

PGD iterates ``x_{t+1} = Proj_{x + S}(x_t + alpha * step(grad_x L))`` from a
uniformly random start in the ball ``S`` (optional), where ``step`` is the sign
of the gradient for L-inf and the L2-normalised gradient for L2; pixels stay in
[0, 1]. The threat model is data (:class:`ThreatModel`); the norm-specific part
is a small step class with ``random_start``, ``step`` and ``project``, in the
style of MadryLab's ``robustness.attack_steps``. With several restarts, each
image keeps its worst case (highest loss). The mean loss of every iteration is
recorded for the loss-plateau analysis of Madry et al. (Section 3, Figure 1).

Units: ``eps`` and ``step_size`` are in pixel units of [0, 1] (8/255 = 0.0314);
an L2 ``eps`` is the Euclidean norm over all C x H x W values of one image.

Masked PGD (Hwang et al., "Where to be Adversarial Perturbations Added?
Investigating and Manipulating Pixel Robustness using Input Gradients", ICLR 2019
DebugML workshop): with a binary ``mask`` the perturbation ``x_adv - x`` is zero
outside the mask; the random start, every step and the projection are restricted
to it, and an L2 norm is taken over the masked values only (see
:mod:`pipeline.attacks.masked_pgd`).

Registered attacks (:mod:`pipeline.attacks.base`): ``fgsm`` (:class:`FGSMAttack`)
and ``pgd`` (:class:`PGDAttack`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from .base import Attack, AttackParams, Budget, frozen_eval, is_randomized, register_attack

__all__ = [
    "FGSMAttack", "FGSMParams", "L2Step", "LinfStep", "PGDAttack", "PGDParams", "PGDResult", "ThreatModel",
    "attack_loss", "check_mask", "check_norm_budget", "check_pixel_budget", "fgsm", "frozen_eval", "pgd",
]


@dataclass(frozen=True)
class ThreatModel:
    """An L-p bounded perturbation budget and how PGD searches it.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the ball, pixel units of [0, 1] (> 0).
        step_size: ``alpha``, the step per iteration, same units (> 0).
        steps: iterations (>= 1).
        random_start: start uniformly in the ball (L-inf) or on a random point
            inside it (L2) instead of at the clean image.
        restarts: independent runs; each image keeps the worst one (>= 1).
        eot_samples: on a model whose forward pass is random
            (:func:`~pipeline.attacks.base.is_randomized`), every step follows the mean
            gradient of this many forward/backward passes (expectation over
            transformation, Athalye et al., ICML 2018, Section 4.3) (>= 1); on a
            deterministic model one pass, since every pass gives the same gradient.
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    restarts: int = 1
    eot_samples: int = 1

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps <= 0 or self.step_size <= 0:
            raise ValueError(f"eps and step_size must be > 0 (pixel units of [0, 1]), got {self.eps}, {self.step_size}")
        if self.steps < 1 or self.restarts < 1 or self.eot_samples < 1:
            raise ValueError(f"steps, restarts and eot_samples must be >= 1, got {self.steps}, {self.restarts}, "
                             f"{self.eot_samples}")


class _MaskedStep:
    """What both step classes share: the centre ``x0``, the budget and the optional mask.

    Args:
        x0: clean images, float (N, C, H, W) in [0, 1].
        eps: radius of the ball (pixel units of [0, 1]).
        step_size: ``alpha`` (same units).
        mask: ``None`` (every value may change) or a {0, 1} float tensor broadcastable
            to ``x0`` (see :func:`check_mask`); the perturbation is zero where it is 0.
    """

    def __init__(self, x0: torch.Tensor, eps: float, step_size: float, mask: torch.Tensor | None = None) -> None:
        self.x0, self.eps, self.step_size, self.mask = x0, eps, step_size, mask

    def _masked(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` zeroed outside the mask (unchanged without one)."""
        return t if self.mask is None else t * self.mask


class LinfStep(_MaskedStep):
    """Signed-gradient steps in an L-inf ball of radius ``eps`` around ``x0`` (inside the mask, if any)."""

    def random_start(self, generator: torch.Generator | None) -> torch.Tensor:
        """A uniform point of the (masked) ball, clipped to [0, 1]."""
        noise = torch.rand(self.x0.shape, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
        return (self.x0 + self._masked((2 * noise - 1) * self.eps)).clamp(0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``x + alpha * sign(grad)`` (times the mask)."""
        return x + self._masked(self.step_size * grad.sign())

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest point of the (masked) ball, then of [0, 1]."""
        return (self.x0 + self._masked((x - self.x0).clamp(-self.eps, self.eps))).clamp(0, 1)


class L2Step(_MaskedStep):
    """Normalised-gradient steps in an L2 ball of radius ``eps`` (per image) around ``x0``.

    With a mask, the gradient is masked before it is normalised, so a step has L2
    norm ``alpha`` over the masked values (the step is not wasted on values that the
    mask then zeroes), and the projection rescales the masked perturbation.
    """

    @staticmethod
    def _norm(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))

    def random_start(self, generator: torch.Generator | None) -> torch.Tensor:
        """A random (masked) direction scaled to a uniform radius in [0, eps], clipped to [0, 1]."""
        d = self._masked(torch.randn(self.x0.shape, generator=generator, dtype=self.x0.dtype).to(self.x0.device))
        r = torch.rand(len(d), generator=generator, dtype=d.dtype).to(d.device).view(-1, *([1] * (d.ndim - 1)))
        return (self.x0 + d / self._norm(d).clamp_min(1e-12) * r * self.eps).clamp(0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``x + alpha * g / ||g||_2`` with ``g`` the (masked) gradient."""
        grad = self._masked(grad)
        return x + self.step_size * grad / self._norm(grad).clamp_min(1e-12)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale the (masked) perturbation into the ball, then clip to [0, 1]."""
        delta = self._masked(x - self.x0)
        delta = delta * (self.eps / self._norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (self.x0 + delta).clamp(0, 1)


STEPS = {"linf": LinfStep, "l2": L2Step}


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """Per-image objective to maximise, float (N,): cross-entropy of the true
    label (untargeted) or minus the cross-entropy of ``target`` (targeted)."""
    if target is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, torch.full_like(labels, target), reduction="none")


def check_mask(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Validate a perturbation mask and cast it to ``x``'s dtype and device.

    Args:
        mask: ``None``, or a bool or float tensor with values in {0, 1},
            broadcastable to ``x``: (H, W), (1, 1, H, W), (N, 1, H, W), (N, C, H, W) ...
        x: the images, float (N, C, H, W).

    Returns:
        ``None``, or the mask as a float tensor of ``x``'s dtype on ``x``'s device
        (its shape unchanged).

    Raises:
        ValueError: the mask does not broadcast to ``x``'s shape, or holds values
            other than 0 and 1.
    """
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=x.device)
    try:
        shape = torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the images {tuple(x.shape)}; "
                         f"use (H, W), (1, 1, H, W) or (N, 1, H, W)")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must be binary (bool, or floats that are all 0 or 1)")
    return mask.to(x.dtype)


@dataclass
class PGDResult:
    """What :func:`pgd` returns.

    Attributes:
        x_adv: float (N, C, H, W) in [0, 1], the worst case over restarts per image.
        loss: float (N,), the objective at ``x_adv``.
        loss_history: float (restarts, steps + 1), mean objective over the batch
            at the start and after every iteration of each restart.
        restart_losses: float (restarts, N), the final objective of every restart.

    ``loss``, ``loss_history`` and ``restart_losses`` are ``None`` when :func:`pgd`
    ran with ``record_loss=False`` and one restart (the final forward pass that
    would measure them is skipped).
    """

    x_adv: torch.Tensor
    loss: torch.Tensor | None
    loss_history: torch.Tensor | None
    restart_losses: torch.Tensor | None


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    target: int | None = None,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    record_loss: bool = True,
) -> PGDResult:
    """Projected gradient ascent on :func:`attack_loss` within ``threat``'s ball.

    With ``mask`` (masked PGD, Hwang et al. 2019), ``x_adv - x`` is exactly zero
    outside the mask: the random start, every step and the projection are
    multiplied by it, and for L2 the step is normalised and the ball measured over
    the masked values only.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits; put in eval mode by the
            caller; only the input gets gradients.
        x: clean images, float (N, C, H, W) in [0, 1].
        y: labels, int64 (N,).
        threat: the budget and search settings.
        target: class to reach (targeted), or None (untargeted).
        generator: CPU generator of the random starts, for reproducibility.
        mask: optional binary mask, bool or float {0, 1}, broadcastable to ``x``
            ((H, W), (1, 1, H, W), (N, 1, H, W) ...): where it is 0 the image is
            left unchanged.
        record_loss: measure the objective after the last step (one more forward
            pass, without gradients) and the per-iteration loss history. With one
            restart and ``record_loss=False`` that pass is skipped, so an attack
            costs exactly ``steps`` forward/backward passes, and the result's loss
            fields are ``None``. Several restarts always measure it (each image
            keeps its worst restart).

    Returns:
        :class:`PGDResult` (tensors on ``x``'s device).

    Raises:
        ValueError: ``x`` is outside [0, 1]; ``mask`` is not binary or does not
            broadcast to ``x``.
    """
    if x.min() < 0 or x.max() > 1:
        raise ValueError("pgd expects images in [0, 1]; undo any normalisation (models normalise inside)")
    x0 = x.detach()
    stepper = STEPS[threat.norm](x0, threat.eps, threat.step_size, check_mask(mask, x0))
    eot = threat.eot_samples if is_randomized(model) else 1
    best_x, best_loss = x0.clone(), torch.full((len(x0),), -torch.inf, device=x0.device)
    if threat.restarts == 1 and not record_loss:  # exactly ``steps`` forward/backward passes
        xa = stepper.random_start(generator) if threat.random_start else x0
        for _ in range(threat.steps):
            xa = _ascent_step(model, xa, y, target, stepper, eot)[0]
        return PGDResult(xa, None, None, None)
    history, finals = [], []
    for _ in range(threat.restarts):
        xa = stepper.random_start(generator) if threat.random_start else x0.clone()
        curve = []
        for _ in range(threat.steps):
            xa, loss = _ascent_step(model, xa, y, target, stepper, eot)
            curve.append(loss.mean())
        with torch.no_grad():
            final = attack_loss(model(xa), y, target)
        curve.append(final.mean())
        finals.append(final)
        history.append(torch.stack(curve))
        better = final > best_loss
        best_x[better] = xa[better]
        best_loss = torch.where(better, final, best_loss)
    return PGDResult(best_x, best_loss, torch.stack(history), torch.stack(finals))


def _ascent_step(
    model: nn.Module, xa: torch.Tensor, y: torch.Tensor, target: int | None, stepper: LinfStep | L2Step,
    eot_samples: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One PGD iteration from ``xa``: the projected step (detached) along the mean gradient of
    ``eot_samples`` passes, and the mean per-image objective at ``xa`` (detached, float (N,))."""
    xa = xa.detach().requires_grad_(True)
    grad, loss = torch.zeros_like(xa), torch.zeros(len(xa), device=xa.device)
    for _ in range(eot_samples):
        sample = attack_loss(model(xa), y, target)
        grad += torch.autograd.grad(sample.sum(), xa)[0]
        loss += sample.detach()
    with torch.no_grad():
        return stepper.project(stepper.step(xa.detach(), grad / eot_samples)), loss / eot_samples


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, target: int | None = None) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x L), 0, 1)`` (one PGD
    step of size eps from the clean image; targeted: towards ``target``).

    Args:
        x: float (N, C, H, W) in [0, 1]; y: int64 (N,); eps: L-inf budget in [0, 1] units.

    Returns:
        float (N, C, H, W) in [0, 1].
    """
    threat = ThreatModel(norm="linf", eps=eps, step_size=eps, steps=1, random_start=False, restarts=1)
    return pgd(model, x, y, threat, target, record_loss=False).x_adv


# --------------------------------------------------------------------------- registered attacks


def check_pixel_budget(value: float, name: str) -> float:
    """``value`` if it is an L-inf budget in (0, 1] (pixel units of [0, 1]).

    Raises:
        ValueError: outside (0, 1]; above 1 the message suggests "8/255" (a budget
            written in 0-255 units by mistake).
    """
    if not 0 < value <= 1:
        hint = " (pixel units of [0, 1]: write 8/255, not 8)" if value > 1 else ""
        raise ValueError(f"{name} must be in (0, 1]{hint}, got {value}")
    return value


def check_norm_budget(value: float, norm: str | None, name: str) -> float:
    """``value`` if it is a valid budget of ``norm``: in (0, 1] for ``"linf"`` (and for an
    unknown norm, the stricter rule), any positive value for ``"l2"`` (a radius over all
    C x H x W values may exceed 1).

    Raises:
        ValueError: a budget out of range, naming ``name``.
    """
    if norm == "l2":
        if value <= 0:
            raise ValueError(f"{name} must be > 0 (pixel units of [0, 1]), got {value}")
        return value
    return check_pixel_budget(value, f"{name} (linf)")


class FGSMParams(AttackParams):
    """Params of ``fgsm`` (Goodfellow et al., ICLR 2015).

    Attributes:
        eps: L-inf budget in pixel units of [0, 1], in (0, 1]; "8/255" accepted.
        target: inherited; a class index for a targeted attack, ``None`` untargeted.
    """

    eps: Budget = Field(8 / 255, description="L-inf budget, pixel units of [0, 1]")

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, v: float) -> float:
        return check_pixel_budget(v, "eps")


@register_attack("fgsm")
class FGSMAttack(Attack):
    """FGSM, one signed-gradient step of size ``eps`` (:func:`fgsm`)."""

    Params = FGSMParams
    params: FGSMParams

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``clip(x + eps * sign(grad_x L), 0, 1)``; shapes as :meth:`Attack.perturb`."""
        return fgsm(model, x, y, self.params.eps, self.params.target)


class PGDParams(AttackParams):
    """Params of ``pgd`` (Madry et al., ICLR 2018, Section 2, Eq. 2), the fields of :class:`ThreatModel`.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the ball, pixel units of [0, 1] (> 0; at most 1 for L-inf;
            an L2 radius is over all C x H x W values and may exceed 1); "8/255" accepted.
        step_size: ``alpha`` per iteration, same units (> 0; at most 1 for L-inf).
        steps: iterations (>= 1).
        random_start: start at a random point of the ball.
        restarts: independent runs, worst case kept per image (>= 1).
        eot_samples: gradient passes averaged per step on a randomised model (EOT, >= 1).
        target: inherited; a class index for a targeted attack, ``None`` untargeted.
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: Budget = Field(8 / 255, description="radius of the ball, pixel units of [0, 1]")
    step_size: Budget = Field(2 / 255, description="step per iteration, pixel units of [0, 1]")
    steps: int = Field(10, ge=1, description="iterations")
    random_start: bool = True
    restarts: int = Field(1, ge=1, description="independent runs, worst case kept")
    eot_samples: int = Field(1, ge=1, le=1000, description="gradient passes averaged per step on a randomised "
                                                             "model (EOT); deterministic models take one")

    @field_validator("eps", "step_size")
    @classmethod
    def _budget_in_range(cls, value: float, info: ValidationInfo) -> float:
        # a field validator (not a model validator) so that errors name the field;
        # ``norm`` is declared first, so it is in ``info.data`` when it was valid
        return check_norm_budget(value, info.data.get("norm"), info.field_name)

    def threat_model(self) -> ThreatModel:
        """These params as a :class:`ThreatModel`."""
        return ThreatModel(norm=self.norm, eps=self.eps, step_size=self.step_size, steps=self.steps,
                           random_start=self.random_start, restarts=self.restarts, eot_samples=self.eot_samples)


@register_attack("pgd")
class PGDAttack(Attack):
    """PGD under an L-inf or L2 budget with random starts and restarts (:func:`pgd`)."""

    Params = PGDParams
    params: PGDParams

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The worst case over restarts, float (N, C, H, W) in [0, 1]; shapes as :meth:`Attack.perturb`."""
        return pgd(model, x, y, self.params.threat_model(), self.params.target, generator, record_loss=False).x_adv
