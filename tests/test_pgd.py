"""FGSM and PGD (Madry et al. 2018) against their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.attacks.pgd import ThreatModel, attack_loss, fgsm, pgd
from pipeline.models import build_model


class MeanBrightness(nn.Module):
    """Class 1 iff the mean pixel exceeds 0.5: a model whose robust radius is known.

    An image of mean 0.5 + m has L-inf distance m to the decision boundary
    (moving every pixel by m), and L2 distance m * sqrt(D)."""

    def forward(self, x):
        s = (x.flatten(1).mean(1) - 0.5) * 100
        return torch.stack([torch.zeros_like(s), s], dim=1)


def brightness_data(n=40, margin=0.02):
    y = torch.arange(n) % 2
    x = 0.5 + torch.where(y == 1, margin, -margin).view(-1, 1, 1, 1)
    return x.expand(n, 3, 8, 8).clone(), y


@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.03 * (3 * 64) ** 0.5)])
def test_budget_beyond_the_margin_breaks_the_model_and_below_it_does_not(norm, eps):
    model, (x, y) = MeanBrightness(), brightness_data()
    assert (model(x).argmax(1) == y).all()
    strong = pgd(model, x, y, ThreatModel(norm=norm, eps=eps, step_size=eps / 4, steps=10))
    assert (model(strong.x_adv).argmax(1) != y).all()  # margin 0.02 < 0.03: every image flips
    weak = pgd(model, x, y, ThreatModel(norm=norm, eps=eps / 3, step_size=eps / 12, steps=10))
    assert (model(weak.x_adv).argmax(1) == y).all()  # 0.01 < margin: none can flip


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_result_stays_in_the_ball_and_in_unit_range(norm):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    eps = 8 / 255 if norm == "linf" else 0.5
    res = pgd(model, x, y, ThreatModel(norm=norm, eps=eps, step_size=eps / 2, steps=5, restarts=2),
              generator=torch.Generator().manual_seed(1))
    delta = (res.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.loss_history.shape == (2, 6) and res.restart_losses.shape == (2, 8)
    # the loss rises from the clean (or random-start) value
    assert (res.loss_history[:, -1] > res.loss_history[:, 0]).all()


def test_restarts_keep_the_worst_case_per_image():
    torch.manual_seed(2)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    res = pgd(model, x, y, ThreatModel(eps=4 / 255, step_size=1 / 255, steps=2, restarts=4),
              generator=torch.Generator().manual_seed(3))
    assert torch.allclose(res.loss, res.restart_losses.max(0).values)
    with torch.no_grad():
        assert torch.allclose(attack_loss(model(res.x_adv), y, None), res.loss, atol=1e-4)


def test_fgsm_is_the_signed_gradient_step():
    torch.manual_seed(4)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x, y = torch.rand(4, 3, 32, 32).clamp(0.1, 0.9), torch.randint(0, 10, (4,))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)
    expected = (x + 8 / 255 * g.sign()).clamp(0, 1)
    assert torch.allclose(fgsm(model, x, y, 8 / 255), expected, atol=1e-6)
    towards = fgsm(model, x, y, 8 / 255, target=3)
    with torch.no_grad():
        assert (model(towards).log_softmax(1)[:, 3] > model(x).log_softmax(1)[:, 3]).all()


def test_bad_threat_models_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="norm"):
        ThreatModel(norm="l1")
    with pytest.raises(ValueError, match="eps"):
        ThreatModel(eps=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(MeanBrightness(), torch.full((1, 3, 4, 4), 2.0), torch.zeros(1, dtype=torch.int64), ThreatModel())
