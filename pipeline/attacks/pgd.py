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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


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
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.eps <= 0 or self.step_size <= 0:
            raise ValueError(f"eps and step_size must be > 0 (pixel units of [0, 1]), got {self.eps}, {self.step_size}")
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")


class LinfStep:
    """Signed-gradient steps in an L-inf ball of radius ``eps`` around ``x0``."""

    def __init__(self, x0: torch.Tensor, eps: float, step_size: float) -> None:
        self.x0, self.eps, self.step_size = x0, eps, step_size

    def random_start(self, generator: torch.Generator | None) -> torch.Tensor:
        """A uniform point of the ball, clipped to [0, 1]."""
        noise = torch.rand(self.x0.shape, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
        return (self.x0 + (2 * noise - 1) * self.eps).clamp(0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``x + alpha * sign(grad)``."""
        return x + self.step_size * grad.sign()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest point of the ball, then of [0, 1]."""
        return (self.x0 + (x - self.x0).clamp(-self.eps, self.eps)).clamp(0, 1)


class L2Step:
    """Normalised-gradient steps in an L2 ball of radius ``eps`` (per image) around ``x0``."""

    def __init__(self, x0: torch.Tensor, eps: float, step_size: float) -> None:
        self.x0, self.eps, self.step_size = x0, eps, step_size

    @staticmethod
    def _norm(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.ndim - 1)))

    def random_start(self, generator: torch.Generator | None) -> torch.Tensor:
        """A random direction scaled to a uniform radius in [0, eps], clipped to [0, 1]."""
        d = torch.randn(self.x0.shape, generator=generator, dtype=self.x0.dtype).to(self.x0.device)
        r = torch.rand(len(d), generator=generator, dtype=d.dtype).to(d.device).view(-1, *([1] * (d.ndim - 1)))
        return (self.x0 + d / self._norm(d).clamp_min(1e-12) * r * self.eps).clamp(0, 1)

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``x + alpha * grad / ||grad||_2``."""
        return x + self.step_size * grad / self._norm(grad).clamp_min(1e-12)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale the perturbation into the ball, then clip to [0, 1]."""
        delta = x - self.x0
        delta = delta * (self.eps / self._norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        return (self.x0 + delta).clamp(0, 1)


STEPS = {"linf": LinfStep, "l2": L2Step}


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """Per-image objective to maximise, float (N,): cross-entropy of the true
    label (untargeted) or minus the cross-entropy of ``target`` (targeted)."""
    if target is None:
        return F.cross_entropy(logits, labels, reduction="none")
    return -F.cross_entropy(logits, torch.full_like(labels, target), reduction="none")


@dataclass
class PGDResult:
    """What :func:`pgd` returns.

    Attributes:
        x_adv: float (N, C, H, W) in [0, 1], the worst case over restarts per image.
        loss: float (N,), the objective at ``x_adv``.
        loss_history: float (restarts, steps + 1), mean objective over the batch
            at the start and after every iteration of each restart.
        restart_losses: float (restarts, N), the final objective of every restart.
    """

    x_adv: torch.Tensor
    loss: torch.Tensor
    loss_history: torch.Tensor
    restart_losses: torch.Tensor


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    target: int | None = None,
    generator: torch.Generator | None = None,
) -> PGDResult:
    """Projected gradient ascent on :func:`attack_loss` within ``threat``'s ball.

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits; put in eval mode by the
            caller; only the input gets gradients.
        x: clean images, float (N, C, H, W) in [0, 1].
        y: labels, int64 (N,).
        threat: the budget and search settings.
        target: class to reach (targeted), or None (untargeted).
        generator: CPU generator of the random starts, for reproducibility.

    Returns:
        :class:`PGDResult` (tensors on ``x``'s device).

    Raises:
        ValueError: ``x`` is outside [0, 1].
    """
    if x.min() < 0 or x.max() > 1:
        raise ValueError("pgd expects images in [0, 1]; undo any normalisation (models normalise inside)")
    x0 = x.detach()
    stepper = STEPS[threat.norm](x0, threat.eps, threat.step_size)
    best_x, best_loss = x0.clone(), torch.full((len(x0),), -torch.inf, device=x0.device)
    history, finals = [], []
    for _ in range(threat.restarts):
        xa = stepper.random_start(generator) if threat.random_start else x0.clone()
        curve = []
        for it in range(threat.steps + 1):
            xa.requires_grad_(True)
            loss = attack_loss(model(xa), y, target)
            curve.append(loss.detach().mean())
            if it == threat.steps:
                break
            (grad,) = torch.autograd.grad(loss.sum(), xa)
            with torch.no_grad():
                xa = stepper.project(stepper.step(xa.detach(), grad))
        final = loss.detach()
        finals.append(final)
        history.append(torch.stack(curve))
        better = final > best_loss
        best_x[better] = xa.detach()[better]
        best_loss = torch.where(better, final, best_loss)
    return PGDResult(best_x, best_loss, torch.stack(history), torch.stack(finals))


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, target: int | None = None) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x L), 0, 1)`` (one PGD
    step of size eps from the clean image; targeted: towards ``target``).

    Args:
        x: float (N, C, H, W) in [0, 1]; y: int64 (N,); eps: L-inf budget in [0, 1] units.

    Returns:
        float (N, C, H, W) in [0, 1].
    """
    threat = ThreatModel(norm="linf", eps=eps, step_size=eps, steps=1, random_start=False, restarts=1)
    return pgd(model, x, y, threat, target).x_adv
