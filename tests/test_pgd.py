"""FGSM and PGD (Madry et al. 2018) against their definitions; masked PGD (Hwang et al. 2019); their registry entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.attacks.base import build_attack, list_attacks
from pipeline.attacks.pgd import (
    FGSMAttack,
    L2Step,
    PGDAttack,
    ThreatModel,
    attack_loss,
    check_mask,
    check_pixel_budget,
    fgsm,
    pgd,
)
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


# --------------------------------------------------------------------------- the random start (Madry et al., Section 2)

class FirstInput(nn.Module):
    """Wraps a model and keeps the input of its first forward pass: PGD's first iterate,
    the random start (or the clean image without one)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.first = model, None

    def forward(self, x):
        if self.first is None:
            self.first = x.detach().clone()
        return self.model(x)


def first_iterate(norm, eps, seed=0, random_start=True, n=64, side=16):
    """(x, start): clean images in [0.25, 0.75] (so that no start is clipped at 0 or 1) and
    the first point PGD evaluates the model at, under a generator seeded with ``seed``."""
    x = 0.25 + 0.5 * torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(123))
    y = torch.arange(n) % 4
    model = FirstInput(tiny_conv())
    pgd(model, x, y, ThreatModel(norm=norm, eps=eps, step_size=eps / 4, steps=1, random_start=random_start),
        generator=torch.Generator().manual_seed(seed), record_loss=False)
    return x, model.first


@pytest.mark.parametrize("record_loss", [True, False])
def test_linf_random_start_is_uniform_over_the_ball(record_loss):
    """Every value of the start is x0 + U(-eps, eps): strictly inside the ball, not x0, mean
    offset 0 and spread eps / sqrt(3) (the standard deviation of U(-eps, eps)), a flat histogram."""
    eps = 0.1
    x = 0.25 + 0.5 * torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    model = FirstInput(tiny_conv())
    pgd(model, x, torch.arange(64) % 4, ThreatModel(norm="linf", eps=eps, step_size=0.01, steps=1),
        generator=torch.Generator().manual_seed(0), record_loss=record_loss)
    d = (model.first - x).flatten()  # 49,152 values
    assert d.abs().max() <= eps + 1e-6  # inside the ball ...
    assert (d != 0).float().mean() > 0.999  # ... and off its centre: not the clean image
    assert abs(float(d.mean())) < 0.02 * eps  # mean 0 (its standard error is 0.003 eps)
    assert float(d.std()) == pytest.approx(eps / 3**0.5, rel=0.02)  # not U(0, eps), not N(0, .), not eps * sign
    assert float(d.abs().max()) > 0.99 * eps  # the whole ball is reached
    quarters = torch.histc(d, bins=4, min=-eps, max=eps) / len(d)
    assert torch.allclose(quarters, torch.full((4,), 0.25), atol=0.01)  # uniform, not peaked at 0 or at +-eps


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_random_start_depends_on_the_generator_seed_only(norm, eps):
    x, a = first_iterate(norm, eps, seed=0)
    _, b = first_iterate(norm, eps, seed=0)
    _, c = first_iterate(norm, eps, seed=1)
    assert torch.equal(a, b)  # reproducible
    assert not torch.equal(a, x) and not torch.equal(c, x)
    assert ((a - c).abs() > 1e-6).float().mean() > 0.99  # another seed: another start, value by value


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_without_random_start_pgd_starts_at_the_clean_image(norm, eps):
    x, start = first_iterate(norm, eps, random_start=False)
    assert torch.equal(start, x)


def test_l2_random_start_lies_inside_the_ball_at_uniform_radii_in_random_directions():
    """L2: a random direction (normalised Gaussian) scaled to a radius uniform in [0, eps]:
    inside the ball, never the centre, radii spread over (0, eps) with mean eps / 2, no
    preferred direction."""
    eps = 1.0
    x, start = first_iterate("l2", eps, n=400, side=8)
    delta = (start - x).flatten(1)
    r = delta.norm(dim=1)
    assert (r <= eps + 1e-5).all() and (r > 0).all()
    assert float(r.mean()) == pytest.approx(eps / 2, abs=0.05)  # U(0, eps): mean eps / 2, standard error 0.014 eps
    assert float(r.min()) < 0.1 * eps and float(r.max()) > 0.9 * eps
    assert float(r.std()) == pytest.approx(eps / 12**0.5, rel=0.15)
    # isotropic: per-value offsets average to 0, and a direction is dense (not a corner or an axis)
    assert abs(float(delta.mean())) < 0.002 * eps  # its standard error: 0.0002 eps
    unit = delta / r[:, None]
    assert float(unit.abs().amax(1).mean()) < 0.35  # a Gaussian direction in 192 dims: max |u_i| ~ 0.2


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_random_start_at_black_and_white_images_is_clipped_to_the_image_range(norm, eps):
    """From images at 0 and at 1, the start's offsets pointing out of [0, 1] are clipped away
    at either end, and the ones pointing in are kept."""
    x = torch.cat([torch.zeros(8, 3, 8, 8), torch.ones(8, 3, 8, 8)])
    model = FirstInput(tiny_conv())
    pgd(model, x, torch.arange(16) % 4, ThreatModel(norm=norm, eps=eps, step_size=eps / 4, steps=1),
        generator=torch.Generator().manual_seed(0), record_loss=False)
    start = model.first
    assert start.min() >= 0 and start.max() <= 1
    assert (start[:8] > 0).float().mean() > 0.3 and (start[8:] < 1).float().mean() > 0.3  # moved inwards


# --------------------------------------------------------------------------- mutation-testing additions

def test_fgsm_step_is_the_given_eps_and_the_registered_attacks_pass_their_target():
    model = tiny_conv(classes=4)
    g = torch.Generator().manual_seed(3)
    x, y = 0.2 + 0.6 * torch.rand(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    d = (fgsm(model, x, y, 0.02) - x).abs()
    assert torch.allclose(d[d > 0], torch.full_like(d[d > 0], 0.02), atol=1e-6) and (d > 0).float().mean() > 0.9
    # targeted FGSM / PGD through the registry equal the functions with that target, not the untargeted ones
    targeted = build_attack("fgsm", {"eps": 0.05, "target": 2})(model, x, y)
    assert torch.equal(targeted, fgsm(model, x, y, 0.05, target=2))
    assert not torch.equal(targeted, fgsm(model, x, y, 0.05))
    params = {"eps": 0.05, "step_size": 0.02, "steps": 2, "target": 2}
    out = build_attack("pgd", params)(model, x, y, torch.Generator().manual_seed(4))
    threat = build_attack("pgd", params).params.threat_model()
    assert torch.equal(out, pgd(model, x, y, threat, 2, torch.Generator().manual_seed(4)).x_adv)  # its generator
    assert not torch.equal(out, pgd(model, x, y, threat, None, torch.Generator().manual_seed(4)).x_adv)


# --------------------------------------------------------------------------- mutation-testing additions (complete run)


@pytest.mark.parametrize("target", [None, 2])
def test_loss_history_starts_at_the_clean_objective_and_the_result_loss_is_the_objective_at_x_adv(target):
    """By default pgd records the losses: without a random start the history starts at the
    objective of the clean images and ends at the mean final loss, and the result's loss is the
    per-image objective (targeted: minus the cross-entropy of the target, log-softmax computed
    here) at x_adv."""
    model = tiny_conv(classes=4)
    g = torch.Generator().manual_seed(21)
    x, y = 0.2 + 0.6 * torch.rand(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    res = pgd(model, x, y, ThreatModel(eps=0.05, step_size=0.02, steps=3, random_start=False), target)
    with torch.no_grad():
        logp_clean, logp_adv = model(x).log_softmax(1), model(res.x_adv).log_softmax(1)
    idx = torch.arange(6)
    clean = -logp_clean[idx, y] if target is None else logp_clean[:, target]
    adv = -logp_adv[idx, y] if target is None else logp_adv[:, target]
    assert res.loss_history.shape == (1, 4)
    assert float(res.loss_history[0, 0]) == pytest.approx(float(clean.mean()), rel=1e-5)
    assert torch.allclose(res.loss, adv, atol=1e-5)
    assert float(res.loss_history[0, -1]) == pytest.approx(float(adv.mean()), rel=1e-5)
    assert torch.allclose(attack_loss(model(x), y, target), clean, atol=1e-5)  # per image, shape (N,)


class CyclingGain(nn.Module):
    """A "randomised" model (``randomized = True``) whose k-th forward pass uses the gain
    ``gains[k % len(gains)]``: logits (0, gain * sum(x)). With label 0 the gradient of the
    cross-entropy is sigmoid(gain * s) * gain on every value, so its sign is the gain's."""

    randomized = True

    def __init__(self, gains):
        super().__init__()
        self.gains, self.calls = gains, 0

    def forward(self, x):
        gain = self.gains[self.calls % len(self.gains)]
        self.calls += 1
        s = gain * x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], dim=1)


@pytest.mark.parametrize("record_loss", [True, False])
def test_eot_steps_along_the_mean_gradient_of_eot_samples_passes(record_loss):
    """With eot_samples=3 on a randomised model of gains (-1, 3, -1), one L-inf step follows the
    sign of the mean gradient (+: the gain-3 pass dominates), not that of the first or last pass
    (-); the recorded first loss is the mean of the three passes' losses."""
    gains = (-1.0, 3.0, -1.0)
    x, y = torch.full((2, 3, 2, 2), 0.5), torch.zeros(2, dtype=torch.int64)
    model = CyclingGain(gains)
    threat = ThreatModel(eps=0.1, step_size=0.05, steps=1, random_start=False, eot_samples=3)
    res = pgd(model, x, y, threat, record_loss=record_loss)
    assert torch.allclose(res.x_adv, torch.full_like(x, 0.55), atol=1e-6)
    assert model.calls == (4 if record_loss else 3)
    if record_loss:
        s = x.flatten(1).sum(1)
        expected = torch.stack([torch.nn.functional.softplus(gn * s) for gn in gains]).mean()  # CE of label 0
        assert float(res.loss_history[0, 0]) == pytest.approx(float(expected), rel=1e-5)


def test_a_deterministic_model_takes_one_gradient_pass_per_step_whatever_eot_samples():
    """EOT averaging is for randomised models only: a deterministic one takes exactly ``steps``
    forward passes (record_loss=False) even with eot_samples=4."""
    model = CyclingGain((1.0,))
    model.randomized = False
    x, y = torch.full((2, 3, 2, 2), 0.5), torch.zeros(2, dtype=torch.int64)
    pgd(model, x, y, ThreatModel(eps=0.1, step_size=0.05, steps=3, random_start=False, eot_samples=4),
        record_loss=False)
    assert model.calls == 3


def test_l2_projection_keeps_points_inside_the_ball_and_rescales_points_outside_onto_it():
    """Proj onto the L2 ball: a perturbation of norm < eps is unchanged, one of norm > eps is
    scaled to norm eps along its direction (images at 0.5, so no clipping)."""
    x0 = torch.full((2, 3, 4, 4), 0.5)
    d = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(22))
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit directions
    step = L2Step(x0, eps=1.0, step_size=0.1)
    inside = x0 + 0.3 * d
    assert torch.allclose(step.project(inside), inside, atol=1e-6)
    outside = x0 + 1.5 * d
    assert torch.allclose(step.project(outside), x0 + d, atol=1e-6)


def test_l2_random_start_stays_inside_a_ball_of_radius_below_one():
    """With eps = 0.5 the L2 start lies inside the ball and reaches near its surface."""
    eps = 0.5
    x, start = first_iterate("l2", eps, n=200, side=8)
    r = (start - x).flatten(1).norm(dim=1)
    assert (r <= eps + 1e-5).all() and float(r.max()) > 0.9 * eps


def test_threat_models_reject_zero_step_size_steps_restarts_and_eot_samples():
    """step_size 0, and steps, restarts or eot_samples 0, each alone, raise ValueError."""
    with pytest.raises(ValueError, match="step_size"):
        ThreatModel(step_size=0)
    for field in ("steps", "restarts", "eot_samples"):
        with pytest.raises(ValueError, match=">= 1"):
            ThreatModel(**{field: 0})


def test_pixel_budgets_accept_one_and_hint_at_8_over_255_only_above_one():
    """An L-inf budget of exactly 1 is valid; above 1 (even 1.5) the error suggests 8/255; at or
    below 0 it does not."""
    assert check_pixel_budget(1.0, "eps") == 1.0
    with pytest.raises(ValueError, match="8/255"):
        check_pixel_budget(1.5, "eps")
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match=r"^eps must be in \(0, 1\], got") as info:
            check_pixel_budget(bad, "eps")
        assert "8/255" not in str(info.value)


def test_a_mask_is_returned_as_a_float_tensor_of_the_images_dtype():
    """check_mask casts a bool mask to the images' float dtype (float32 or float64)."""
    m = centre_mask()
    for dtype in (torch.float32, torch.float64):
        out = check_mask(m, torch.zeros(1, 3, 8, 8, dtype=dtype))
        assert out.dtype == dtype and torch.equal(out, m.to(dtype))


def test_masked_l2_random_start_has_uniform_radius_even_on_one_masked_value():
    """With a mask of one value the random direction is +-1 on it and the radius is uniform in
    [0, eps]: mean eps / 2 and spread eps / sqrt(12), whatever the Gaussian draw's size."""
    eps, n = 0.4, 400
    x = torch.full((n, 3, 8, 8), 0.5)
    mask = torch.zeros(1, 3, 8, 8)
    mask[0, 1, 3, 4] = 1
    model = FirstInput(tiny_conv())
    pgd(model, x, torch.arange(n) % 4, ThreatModel(norm="l2", eps=eps, step_size=0.1, steps=1),
        generator=torch.Generator().manual_seed(23), mask=mask, record_loss=False)
    delta = (model.first - x).flatten(1)
    r = delta.norm(dim=1)
    assert torch.equal(delta.abs().amax(1), r)  # one value moves
    assert (r <= eps + 1e-6).all()
    assert float(r.mean()) == pytest.approx(eps / 2, abs=0.05 * eps)  # standard error 0.014 eps
    assert float(r.std()) == pytest.approx(eps / 12**0.5, rel=0.1)
