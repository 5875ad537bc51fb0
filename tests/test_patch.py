"""The universal adversarial patch: placement, bounds, and that optimisation works."""

from __future__ import annotations

import pytest
import torch

from pipeline.attacks.patch import (
    PatchTrainingConfig,
    Placements,
    apply_patch,
    corner_placements,
    patch_cache_params,
    patch_loss,
    patch_objective,
    patch_side,
    patch_training_config,
    patch_training_images,
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
    # nothing of the patch is cut by the image border: the same placements in images with a
    # 16-pixel margin all round (shifted by it) cover exactly as many pixels
    margin = 16
    shifted = Placements(pl.top + margin, pl.left + margin, pl.angle, pl.scale)
    canvas = apply_patch(torch.zeros(500, 3, 32 + 2 * margin, 32 + 2 * margin), p, shifted)
    assert torch.equal(canvas[:, 0].sum(dim=(1, 2)), covered)
    assert canvas[:, 0, margin : margin + 32, margin : margin + 32].sum() == canvas[:, 0].sum()  # all of it inside
    assert torch.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("h,w,side", [(31, 29, 7), (33, 17, 5), (17, 33, 17), (9, 9, 1), (15, 11, 11), (32, 32, 31)])
def test_every_placement_puts_the_whole_square_inside_the_image(h, w, side):
    """Without rotation or scaling a placement covers exactly side x side pixels, the square
    [top, top + side) x [left, left + side), wholly inside the image; the corners of the valid
    range are reached."""
    n = 2000
    pl = sample_placements(n, (h, w), side, generator=torch.Generator().manual_seed(h * 100 + w + side))
    assert torch.equal(pl.top, pl.top.floor()) and torch.equal(pl.left, pl.left.floor())
    assert pl.top.min() == 0 and pl.top.max() == h - side and pl.left.min() == 0 and pl.left.max() == w - side
    out = apply_patch(torch.zeros(n, 3, h, w), torch.ones(3, side, side), pl)
    assert (out[:, 0].sum(dim=(1, 2)) == side * side).all()  # never cut by the border
    ref = torch.zeros(n, h, w)
    for i, (top, left) in enumerate(zip(pl.top.long().tolist(), pl.left.long().tolist(), strict=True)):
        ref[i, top : top + side, left : left + side] = 1
    assert torch.equal(out[:, 0], ref) and torch.equal(out[:, 1], ref) and torch.equal(out[:, 2], ref)


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


@pytest.mark.parametrize("location", ["fixed", "random"])
def test_training_pastes_at_the_configured_location_rotation_and_scale(monkeypatch, location):
    """Every placement the training loop pastes at: the bottom-right corner for ``fixed``; for
    ``random``, fresh placements whose angles and scales span the configured ranges. The patch
    stays in [0, 1] under a step large enough to push it out."""
    import pipeline.attacks.patch as patch_mod

    seen = []
    real = patch_mod.apply_patch
    monkeypatch.setattr(patch_mod, "apply_patch", lambda x, p, pl: seen.append(pl) or real(x, p, pl))
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    cfg = PatchTrainingConfig(side=8, target=3, epochs=1, batch_size=16, step_size=2.0, decay_epochs=(),
                              location=location, rotation_deg=30.0, scale_range=(0.5, 0.9))
    patch, _ = train_universal_patch(model, x, y, cfg, seed=0)
    assert patch.min() == 0 and patch.max() == 1  # a step of 2 lands every value on a bound of [0, 1]
    assert len(seen) == 4
    angle, scale = torch.cat([pl.angle for pl in seen]), torch.cat([pl.scale for pl in seen])
    if location == "fixed":
        corner = corner_placements(16, (32, 32), 8)
        for pl in seen:
            assert torch.equal(pl.top, corner.top) and torch.equal(pl.left, corner.left)
        assert (angle == 0).all() and (scale == 1).all()
    else:
        assert angle.abs().max() <= torch.pi / 6 + 1e-6 and angle.abs().max() > 0.8 * torch.pi / 6
        assert scale.min() >= 0.5 - 1e-6 and scale.max() <= 0.9 + 1e-6 and scale.max() - scale.min() > 0.25
        assert not torch.equal(seen[0].top, seen[1].top)  # a fresh draw per batch


def test_patch_training_images_drop_the_target_and_draw_a_seeded_subset_in_order():
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    y = torch.arange(40) % 5
    kept_x, kept_y = patch_training_images(x, y, target=3, n=None, seed=0)
    assert torch.equal(kept_y, y[y != 3]) and torch.equal(kept_x, x[y != 3])  # every non-target image, in order
    sub_x, sub_y = patch_training_images(x, y, target=3, n=10, seed=0)
    ids = sub_x[:, 0, 0, 0].long()  # each image's index in x
    assert len(ids) == 10 and (y[ids] != 3).all() and torch.equal(sub_y, y[ids])
    assert torch.equal(ids, ids.sort().values) and len(set(ids.tolist())) == 10  # original order, no repeats
    assert torch.equal(patch_training_images(x, y, 3, 10, seed=0)[0], sub_x)  # seeded
    assert not torch.equal(patch_training_images(x, y, 3, 10, seed=1)[0], sub_x)
    all_x, all_y = patch_training_images(x, y, target=None, n=40, seed=0)  # n >= N keeps all
    assert torch.equal(all_x, x) and torch.equal(all_y, y) and all_x.is_contiguous()
    untargeted = patch_training_images(x, y, target=None, n=39, seed=0)[1]
    assert len(untargeted) == 39 and (untargeted == 3).any()  # no class dropped without a target


def test_patch_training_config_and_cache_key_come_from_the_patch_params():
    from pipeline.config import PatchConfig

    p = PatchConfig(target=7, epochs=4, step_size=0.01, decay_epochs=[1, 3], batch_size=16, rotation=20.0,
                    scale_min=0.8, scale_max=0.9, location="fixed", seeds=[0, 4], attacks=["lavan"])
    cfg = patch_training_config(p, 9, "lavan")
    assert cfg == PatchTrainingConfig(side=9, attack="lavan", location="fixed", target=7, epochs=4, step_size=0.01,
                                      decay_epochs=(1, 3), batch_size=16, rotation_deg=20.0, scale_range=(0.8, 0.9),
                                      amp=False)
    assert patch_training_config(p.model_copy(update={"amp": True}), 9, "advp").amp is True
    key = patch_cache_params(p)
    assert not {"attacks", "seeds", "adaptive_restarts", "amp"} & set(key)  # keyed per attack and seed elsewhere
    assert key["target"] == 7 and key["rotation"] == 20.0 and key["decay_epochs"] == [1, 3]
    assert patch_cache_params(p.model_copy(update={"amp": False}))["amp"] is False  # kept once set
    assert patch_cache_params(p.model_copy(update={"seeds": [9], "attacks": ["advp"]})) == key


def test_patch_side_edges():
    assert patch_side(1 / 1024, 32, 32) == 1  # one pixel is a patch
    with pytest.raises(ValueError, match=r"patch.area_fraction must be in \(0, 1\), got 0"):
        patch_side(0.0, 32, 32)
    with pytest.raises(ValueError, match="patch.area_fraction 0.0005 gives a 0-pixel patch on 32x32 images"):
        patch_side(0.0005, 32, 32)
