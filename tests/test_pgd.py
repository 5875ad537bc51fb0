"""FGSM and PGD (Madry et al. 2018) against their definitions; masked PGD (Hwang et al. 2019); their registry entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.attacks.base import build_attack, list_attacks
from pipeline.attacks.pgd import FGSMAttack, PGDAttack, ThreatModel, attack_loss, fgsm, pgd
from pipeline.models import Normalized, build_model


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


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_skipping_the_final_loss_pass_changes_nothing_but_the_loss_fields(norm):
    """record_loss=False (what evaluation and adversarial training use) saves the
    last forward pass only: same random start, same steps, same x_adv."""
    torch.manual_seed(6)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    threat = ThreatModel(norm=norm, eps=8 / 255 if norm == "linf" else 0.5, step_size=2 / 255, steps=3)
    full = pgd(model, x, y, threat, generator=torch.Generator().manual_seed(7))
    lean = pgd(model, x, y, threat, generator=torch.Generator().manual_seed(7), record_loss=False)
    assert torch.equal(full.x_adv, lean.x_adv)
    assert not torch.equal(full.x_adv, x)
    assert lean.loss is None and lean.loss_history is None and lean.restart_losses is None
    # with restarts the worst case needs the final losses, so they are measured anyway
    two = pgd(model, x, y, ThreatModel(steps=2, restarts=2), generator=torch.Generator().manual_seed(7),
              record_loss=False)
    assert two.loss is not None and two.restart_losses.shape == (2, 8)


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


# --------------------------------------------------------------------------- masked PGD and the registry

def tiny_conv(seed=0, classes=4):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, classes))
    return Normalized(net, (0.5,) * 3, (0.25,) * 3).eval()


def centre_mask(h=8, w=8):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[2:5, 3:7] = True
    return m


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("shape", ["hw", "11hw", "n1hw"])
def test_masked_pgd_changes_nothing_outside_the_mask_and_stays_in_the_ball(norm, eps, shape):
    model = tiny_conv()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)
    base = centre_mask()
    mask = {"hw": base, "11hw": base.float()[None, None],
            "n1hw": torch.stack([base, base.roll(2, 1), base, ~base, base])[:, None]}[shape]
    res = pgd(model, x, y, ThreatModel(norm=norm, eps=eps, step_size=eps / 3, steps=4, restarts=2),
              generator=torch.Generator().manual_seed(1), mask=mask)
    full = torch.broadcast_to(mask.bool(), x.shape)
    delta = res.x_adv - x
    assert (delta[~full] == 0).all()  # exactly zero outside the mask
    assert (delta[full] != 0).float().mean() > 0.5  # and the attack does move inside it
    size = delta.flatten(1).abs().amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_masked_l2_step_is_normalised_over_the_masked_values():
    model = tiny_conv()
    x, y = torch.full((3, 3, 8, 8), 0.5), torch.tensor([0, 1, 2])
    threat = ThreatModel(norm="l2", eps=0.2, step_size=0.2, steps=1, random_start=False)
    delta = pgd(model, x, y, threat, mask=centre_mask()).x_adv - x
    # a full step of length eps inside the mask (not the masked part of a full-image step)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((3,), 0.2), atol=1e-5)


def test_an_all_ones_mask_is_plain_pgd():
    model = tiny_conv()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for norm in ("linf", "l2"):
        threat = ThreatModel(norm=norm, eps=0.1, step_size=0.03, steps=3)
        plain = pgd(model, x, y, threat, generator=torch.Generator().manual_seed(5)).x_adv
        masked = pgd(model, x, y, threat, generator=torch.Generator().manual_seed(5), mask=torch.ones(8, 8)).x_adv
        assert torch.allclose(plain, masked, atol=1e-6)


def test_bad_masks_are_rejected():
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="broadcast"):
        pgd(tiny_conv(), x, y, ThreatModel(), mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="binary"):
        pgd(tiny_conv(), x, y, ThreatModel(), mask=torch.full((8, 8), 0.5))


def test_registry_builds_fgsm_and_pgd_from_params_dicts():
    assert {"fgsm", "pgd", "mask_fgsm", "masked_pgd"} <= set(list_attacks())
    model, (x, y) = MeanBrightness(), brightness_data(n=6)
    attack = build_attack("fgsm", {"eps": "8/255"})
    assert isinstance(attack, FGSMAttack) and attack.params.eps == pytest.approx(8 / 255)
    assert torch.allclose(attack(model, x, y), fgsm(model, x, y, 8 / 255))
    attack = build_attack("pgd", {"norm": "l2", "eps": 1.5, "step_size": "1/4", "steps": 3, "restarts": 2})
    assert isinstance(attack, PGDAttack)
    assert attack.params.threat_model() == ThreatModel(norm="l2", eps=1.5, step_size=0.25, steps=3, restarts=2)
    out = attack(model, x, y, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and ((out - x).flatten(1).norm(dim=1) <= 1.5 + 1e-5).all()
    assert (model(out).argmax(1) != y).all()  # L2 margin 0.02 * sqrt(192) = 0.28 < 1.5
    assert build_attack("pgd").params.eps == pytest.approx(8 / 255)  # defaults


@pytest.mark.parametrize("name,params,message", [
    ("fgsm", {"eps": 8}, "8/255"),
    ("fgsm", {"eps": 0}, r"\(0, 1\]"),
    ("fgsm", {"epsilon": 0.1}, "epsilon"),
    ("pgd", {"eps": 8}, "8/255"),
    ("pgd", {"norm": "l2", "eps": -1}, "> 0"),
    ("pgd", {"step_size": 2}, "step_size"),
    ("pgd", {"norm": "l1"}, "norm"),
    ("pgd", {"steps": 0}, "steps"),
    ("pgd", {"restarts": 0}, "restarts"),
    ("pgd", {"eps": "8/0"}, "cannot read"),
])
def test_bad_attack_params_give_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_attack(name, params)


def test_l2_budgets_above_one_are_allowed():
    assert build_attack("pgd", {"norm": "l2", "eps": 2.0, "step_size": 1.5}).params.eps == 2.0
