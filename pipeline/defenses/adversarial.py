"""Adversarial training: PGD (Madry et al. 2018) and FGSM with a random start (Wong et al. 2020).

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018, Eq. (2.1): ``min_theta E max_{||delta||_inf <= eps}
L(theta, x + delta, y)``; the inner maximum is approximated by PGD from a uniformly
random start in the eps-ball, and every training step is taken on those examples
(CIFAR-10: eps 8/255, step 2/255, 7 steps; MNIST: eps 0.3, step 0.01, 40 steps).
This is the method that reproduces the paper (``method: pgd``).

The cheaper option (``method: fgsm_rs``) is Wong, Rice and Kolter, "Fast is better than
free: Revisiting adversarial training", ICLR 2020, Algorithm 3: one signed-gradient
step of ``1.25 eps`` from a uniformly random start, projected back to the eps-ball.
It is PGD with one step, so both use :func:`pipeline.attacks.pgd.pgd`.

The examples are made with the model in eval mode and its weights frozen
(:func:`pipeline.attacks.base.frozen_eval`): BatchNorm uses its running statistics
while attacking and only the training forward on the adversarial batch updates them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pipeline.attacks.base import Budget, frozen_eval
from pipeline.attacks.pgd import ThreatModel, pgd
from pipeline.defenses.base import register_training_hook

__all__ = ["AdversarialTraining", "AdversarialTrainingParams", "adversarial_examples"]


class AdversarialTrainingParams(BaseModel):
    """How the training examples are attacked.

    Attributes:
        method: ``pgd`` (Madry et al., reproduces the paper) or ``fgsm_rs`` (Wong et
            al. 2020, one step of ``step_size``, 1.25 eps by default).
        eps: L-inf budget, pixel units of [0, 1] ("8/255" accepted).
        step_size: PGD step in the same units; ``None``: 2/255 x (eps / (8/255)) for
            ``pgd`` (2/255 at eps 8/255), 1.25 eps for ``fgsm_rs``.
        steps: PGD iterations (7 in Madry et al.'s CIFAR-10 run; ignored by ``fgsm_rs``).
        eval_images: held-out test images attacked after every epoch (PGD-``eval_steps``
            with the same eps) for the per-epoch held-out robust accuracy; 0 skips it.
        eval_steps: PGD iterations of that held-out check.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["pgd", "fgsm_rs"] = "pgd"
    eps: Budget = Field(8 / 255, gt=0, le=1)
    step_size: Budget | None = Field(None, gt=0, le=1)
    steps: int = Field(7, ge=1, le=1000)
    eval_images: int = Field(500, ge=0)
    eval_steps: int = Field(10, ge=1, le=1000)

    @model_validator(mode="after")
    def _step(self) -> AdversarialTrainingParams:
        if self.step_size is not None and self.step_size > self.eps * 2.5:
            raise ValueError(f"step_size {self.step_size:.4f} is over 2.5 x eps {self.eps:.4f}; "
                             "did you write it in 0-255 units? use e.g. 2/255")
        return self

    def threat_model(self) -> ThreatModel:
        """The training attack as a :class:`ThreatModel` (L-inf, random start, one restart)."""
        if self.method == "fgsm_rs":
            step = self.step_size if self.step_size is not None else 1.25 * self.eps
            return ThreatModel("linf", self.eps, step, steps=1, random_start=True, restarts=1)
        step = self.step_size if self.step_size is not None else self.eps / 4
        return ThreatModel("linf", self.eps, step, steps=self.steps, random_start=True, restarts=1)

    def eval_threat_model(self) -> ThreatModel:
        """The per-epoch held-out check: PGD-``eval_steps``, step eps / 4, random start."""
        return ThreatModel("linf", self.eps, self.eps / 4, steps=self.eval_steps, random_start=True, restarts=1)


def adversarial_examples(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The training batch under attack (untargeted, maximising cross-entropy).

    Args:
        model: maps float (N, C, H, W) in [0, 1] to logits; its mode and
            ``requires_grad`` flags are restored afterwards.
        x: float (N, C, H, W) in [0, 1], on the model's device; y: int64 (N,).
        threat: see :meth:`AdversarialTrainingParams.threat_model`.
        generator: seeds the random start (CPU generator).

    Returns:
        float (N, C, H, W) in [0, 1] with ``||x_adv - x||_inf <= eps``, detached.
    """
    with frozen_eval(model):
        return pgd(model, x, y, threat, None, generator, record_loss=False).x_adv.detach()


@register_training_hook("adversarial")
class AdversarialTraining:
    """``train.adversarial``: every training step learns from its batch under attack (Madry et
    al. 2018, Eq. 2.1; or FGSM-RS), and after every epoch the robust accuracy of the first
    ``eval_images`` held-out images under PGD-``eval_steps`` is measured
    (``test_robust_accuracy``). A :class:`pipeline.defenses.base.TrainingHook`.

    Args:
        params: the ``train.adversarial`` section (a dict or :class:`AdversarialTrainingParams`).

    Raises:
        pydantic.ValidationError: invalid params.
    """

    def __init__(self, params: dict | AdversarialTrainingParams) -> None:
        self.params = AdversarialTrainingParams.model_validate(params)

    def training_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
        """:func:`adversarial_examples` of the batch under the training threat model."""
        return adversarial_examples(model, x, y, self.params.threat_model(), generator)

    def metric_names(self) -> list[str]:
        return ["test_robust_accuracy"] if self.params.eval_images > 0 else []

    def epoch_metrics(self, model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], batch_size: int,
                      device: torch.device | str, seed: int, epoch: int) -> dict[str, float]:
        """``{"test_robust_accuracy": in [0, 1]}`` on the first ``eval_images`` of ``test`` (uint8
        (N, C, H, W), int64 (N,)), attacks seeded by ``(seed, epoch)``; ``{}`` with ``eval_images`` 0."""
        if self.params.eval_images == 0:
            return {}
        x, y = test[0][: self.params.eval_images], test[1][: self.params.eval_images]
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch + 13)
        correct = 0
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(device, non_blocking=True).float().div_(255)
            yb = y[s : s + batch_size].to(device, non_blocking=True)
            xa = adversarial_examples(model, xb, yb, self.params.eval_threat_model(), gen)
            with torch.no_grad():
                was = model.training
                model.eval()
                correct += int((model(xa).argmax(1) == yb).sum())
                model.train(was)
        return {"test_robust_accuracy": correct / max(1, len(y))}
