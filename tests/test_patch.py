"""The universal adversarial patch: placement, bounds, and that optimisation works."""

from __future__ import annotations

import pytest
import torch

from pipeline.attacks.patch import (
    PatchTrainingConfig,
    apply_patch,
    corner_placements,
    patch_loss,
    patch_objective,
    patch_side,
    sample_placements,
    train_universal_patch,
)
from pipeline.models import build_model


@pytest.mark.parametrize("f,h,w,side", [(0.1, 32, 32, 10), (0.05, 32, 32, 7), (0.02, 224, 224, 31), (0.1, 299, 299, 94)])
def test_patch_side_is_floor_sqrt_fhw(f, h, w, side):
    assert patch_side(f, h, w) == side


@pytest.mark.parametrize("f", [0.0, 1.0, -0.1, 1.5])
def test_patch_side_rejects_fractions_outside_unit_interval(f):
    with pytest.raises(ValueError, match="area_fraction"):
        patch_side(f, 32, 32)


def test_pasting_matches_slicing_and_leaves_other_pixels_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 3, 32, 32)
    p = torch.rand(3, 10, 10)
    pl = sample_placements(200, (32, 32), 10, generator=g)
    out = apply_patch(x, p, pl)
    ref = x.clone()
    for i in range(200):
        top, left = int(pl.top[i]), int(pl.left[i])
        ref[i, :, top : top + 10, left : left + 10] = p
    assert torch.equal(out, ref)
    # locations cover the whole valid range and never leave the image
    assert pl.top.min() == 0 and pl.top.max() == 22 and pl.left.min() == 0 and pl.left.max() == 22


def test_rotated_scaled_patch_stays_inside_and_has_the_right_area():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(500, 3, 32, 32)
    p = torch.ones(3, 10, 10)
    pl = sample_placements(500, (32, 32), 10, rotation_deg=45, scale_range=(0.7, 1.0), generator=g)
    out = apply_patch(x, p, pl)
    covered = out[:, 0].sum(dim=(1, 2))
    expected = (10 * pl.scale) ** 2
    assert ((covered - expected).abs() / expected).max() < 0.25  # nearest-neighbour rasterisation
    # nothing of the patch is cut by the image border: the full area is there
    assert (covered > 0).all()
    assert torch.all((out >= 0) & (out <= 1))


def test_gradient_reaches_only_the_patch():
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    p = torch.rand(3, 10, 10, requires_grad=True)
    pl = sample_placements(4, (32, 32), 10, generator=torch.Generator().manual_seed(2))
    model(apply_patch(x, p, pl)).sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    covered = apply_patch(torch.zeros(4, 3, 32, 32), torch.ones(3, 10, 10), pl).bool()
    assert torch.all(x.grad[covered] == 0)  # covered input pixels do not influence the output


def test_optimisation_lowers_the_objective_on_unseen_images():
    torch.manual_seed(3)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.randint(0, 256, (384, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (384,))
    train_x, train_y, test_x, test_y = images[:256], labels[:256], images[256:], labels[256:]
    cfg = PatchTrainingConfig(side=10, target=3, epochs=3, step_size=4 / 255, decay_epochs=(), batch_size=32)
    patch, history = train_universal_patch(model, train_x, train_y, cfg, seed=0)
    assert patch.shape == (3, 10, 10) and patch.min() >= 0 and patch.max() <= 1
    assert history[-1] < history[0]
    pl = sample_placements(128, (32, 32), 10, generator=torch.Generator().manual_seed(9))
    before = patch_objective(model, test_x, test_y, torch.zeros(3, 10, 10), pl, target=3)
    after = patch_objective(model, test_x, test_y, patch, pl, target=3)
    assert after < before - 0.1


def test_same_seed_same_patch():
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    cfg = PatchTrainingConfig(side=6, target=None, epochs=1, batch_size=16)
    a, _ = train_universal_patch(model, x, y, cfg, seed=5)
    b, _ = train_universal_patch(model, x, y, cfg, seed=5)
    c, _ = train_universal_patch(model, x, y, cfg, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_lavan_loss_is_the_logit_margin_of_the_fnc_authors():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 1])
    # targeted: mean(z_true - z_target)
    assert patch_loss(logits, labels, 2, "lavan").item() == pytest.approx(((2.0 - -1.0) + (3.0 - 1.0)) / 2)
    # untargeted: mean(z_true - max over the other classes)
    assert patch_loss(logits, labels, None, "lavan").item() == pytest.approx(((2.0 - 0.5) + (3.0 - 1.0)) / 2)
    # AdvP: cross-entropy to the target
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2]))
    assert patch_loss(logits, labels, 2, "advp").item() == pytest.approx(ce.item())
    with pytest.raises(ValueError, match="unknown patch attack"):
        patch_loss(logits, labels, 2, "lavn")


def test_corner_placement_puts_the_patch_bottom_right():
    out = apply_patch(torch.zeros(3, 3, 32, 32), torch.ones(3, 10, 10), corner_placements(3, (32, 32), 10))
    assert torch.equal(out[:, :, 22:, 22:], torch.ones(3, 3, 10, 10))
    assert out.sum() == 3 * 3 * 100


def test_lavan_at_a_fixed_location_lowers_its_margin_on_unseen_images():
    torch.manual_seed(4)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.randint(0, 256, (320, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (320,))
    cfg = PatchTrainingConfig(side=10, attack="lavan", location="fixed", target=3, epochs=3, step_size=4 / 255,
                              decay_epochs=(), batch_size=32)
    patch, history = train_universal_patch(model, images[:256], labels[:256], cfg, seed=0)
    assert history[-1] < history[0]
    pl = corner_placements(64, (32, 32), 10)
    before = patch_objective(model, images[256:], labels[256:], torch.zeros(3, 10, 10), pl, 3, attack="lavan")
    after = patch_objective(model, images[256:], labels[256:], patch, pl, 3, attack="lavan")
    assert after < before
