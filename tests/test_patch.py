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


# --------------------------------------------------------------------------- mutation-testing additions (complete run)

def test_untargeted_advp_loss_is_minus_the_cross_entropy_of_the_true_labels_and_advp_is_the_default():
    """Untargeted AdvP lowers the likelihood of the true class: its loss is minus the mean
    cross-entropy of the true labels (log-softmax computed here), and ``advp`` is the default."""
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]])
    labels = torch.tensor([0, 2, 1])
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    expected = float(logp[torch.arange(3), labels].mean())  # = -CE
    assert patch_loss(logits, labels, None, "advp").item() == pytest.approx(expected)
    assert patch_loss(logits, labels, None).item() == pytest.approx(expected)
    assert patch_loss(logits, labels, 2).item() == pytest.approx(float(-logp[:, 2].mean()))


def test_bad_patches_and_placement_counts_are_rejected():
    """A non-square patch (3-D or per image) and a placement count other than the batch's raise ValueError."""
    x = torch.zeros(2, 3, 16, 16)
    pl = corner_placements(2, (16, 16), 5)
    for shape in [(3, 4, 5), (3, 5, 4), (2, 3, 4, 5), (2, 3, 5, 4)]:
        with pytest.raises(ValueError, match="square"):
            apply_patch(x, torch.zeros(shape), pl)
    with pytest.raises(ValueError, match="placements"):
        apply_patch(x, torch.zeros(3, 5, 5), corner_placements(3, (16, 16), 5))


def test_per_image_patches_go_each_into_its_own_image():
    """A (N, 3, s, s) patch pastes patch i into image i, at its placement, like slicing."""
    g = torch.Generator().manual_seed(11)
    x, p = torch.rand(6, 3, 20, 20, generator=g), torch.rand(6, 3, 7, 7, generator=g)
    pl = sample_placements(6, (20, 20), 7, generator=g)
    ref = x.clone()
    for i in range(6):
        top, left = int(pl.top[i]), int(pl.left[i])
        ref[i, :, top : top + 7, left : left + 7] = p[i]
    assert torch.equal(apply_patch(x, p, pl), ref)


def test_a_rotated_scaled_patch_writes_only_patch_values_into_the_image():
    """Under rotation and scaling every pixel is either the image's own or one of the patch's
    values: the patch's border writes no padding (zeros) around it."""
    g = torch.Generator().manual_seed(12)
    n = 200
    x = torch.ones(n, 3, 32, 32)
    p = 0.2 + 0.6 * torch.rand(3, 10, 10, generator=g)
    pl = sample_placements(n, (32, 32), 10, rotation_deg=45, scale_range=(0.6, 1.0), generator=g)
    out = apply_patch(x, p, pl)
    for c in range(3):
        vals = out[:, c]
        assert torch.isin(vals, torch.cat([p[c].flatten(), torch.ones(1)])).all()
    assert (out < 1).any()  # the patch is there


def test_a_patch_as_large_as_the_image_fits():
    """side == min(H, W) is a valid patch: the corner placement is (0, 0) and covers the whole image."""
    pl = corner_placements(2, (8, 8), 8)
    assert torch.equal(pl.top, torch.zeros(2)) and torch.equal(pl.left, torch.zeros(2))
    assert torch.equal(apply_patch(torch.zeros(2, 3, 8, 8), torch.ones(3, 8, 8), pl), torch.ones(2, 3, 8, 8))


def test_sampled_angles_and_scales_span_their_ranges_reproducibly():
    """Angles are uniform in [-r, r] and scales in [lo, hi] (both ends reached, both signs of
    angle); the same generator seed gives the same placements, field by field."""
    r, (lo, hi) = 30.0, (0.5, 0.9)
    a = sample_placements(4000, (32, 32), 8, rotation_deg=r, scale_range=(lo, hi),
                          generator=torch.Generator().manual_seed(13))
    rad = torch.pi * r / 180
    assert a.angle.abs().max() <= rad + 1e-6 and a.angle.min() < -0.95 * rad and a.angle.max() > 0.95 * rad
    assert abs(float(a.angle.mean())) < 0.05 * rad
    assert a.scale.min() >= lo - 1e-6 and a.scale.max() <= hi + 1e-6
    assert a.scale.min() < lo + 0.02 and a.scale.max() > hi - 0.02
    b = sample_placements(4000, (32, 32), 8, rotation_deg=r, scale_range=(lo, hi),
                          generator=torch.Generator().manual_seed(13))
    for f in ("top", "left", "angle", "scale"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("h,w,side", [(32, 32, 10), (20, 27, 7)])
def test_rotated_and_scaled_placements_stay_inside_and_reach_every_position(h, w, side):
    """The bounding box of a rotated patch, side * scale * (|cos a| + |sin a|) (computed here),
    lies inside the image; a patch scaled by 1/2 without rotation takes every top-left position
    where its ceil(side / 2) box fits."""
    n = 3000
    rot = sample_placements(n, (h, w), side, rotation_deg=45, generator=torch.Generator().manual_seed(14))
    extent = side * (rot.angle.cos().abs() + rot.angle.sin().abs())
    assert (rot.top >= 0).all() and (rot.left >= 0).all()
    assert (rot.top + extent <= h + 1e-4).all() and (rot.left + extent <= w + 1e-4).all()
    half = sample_placements(n, (h, w), side, scale_range=(0.5, 0.5), generator=torch.Generator().manual_seed(15))
    box = -(-side // 2)
    assert set(half.top.long().tolist()) == set(range(h - box + 1))
    assert set(half.left.long().tolist()) == set(range(w - box + 1))


class Channel0Sum(torch.nn.Module):
    """Logits (sum of channel 0, 0) and records its inputs: the LaVAN margin of class 0 against
    class 1 is the sum of channel 0, so its gradient is +1 on channel 0 of the patch and 0 on
    channels 1 and 2."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        s = x[:, 0].sum(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_training_steps_against_the_gradient_sign_and_halves_the_step_at_each_decay_epoch():
    """From a float64 warm start holding 0, 0.5 and 1: channel 0 (gradient +1) falls by the step
    of each epoch, halved from each decay epoch on (0.1 + 0.05 + 0.05); channels 1 and 2 (zero
    gradient) keep their values; the result is float32. The history is the objective of the
    patch each epoch starts from (patch_objective at the corner), on images scaled to [0, 1]."""
    side, n = 4, 6
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(16))
    labels = torch.zeros(n, dtype=torch.int64)
    init = torch.empty(3, side, side, dtype=torch.float64)
    init[0], init[1], init[2] = 0.5, 1.0, 0.0
    cfg = PatchTrainingConfig(side=side, attack="lavan", location="fixed", target=1, epochs=3, step_size=0.1,
                              decay_epochs=(1,), batch_size=80)
    model = Channel0Sum()
    patch, history = train_universal_patch(model, images, labels, cfg, seed=0, init=init)
    assert patch.dtype == torch.float32
    assert torch.allclose(patch[0], torch.full((side, side), 0.3), atol=1e-6)
    assert torch.equal(patch[1], torch.ones(side, side)) and torch.equal(patch[2], torch.zeros(side, side))
    # the model saw the uint8 images divided by 255 outside the patch
    scaled = images[:, :, :8, :8].float() / 255
    assert all(any(torch.equal(s, e) for e in scaled) for s in model.inputs[0][:, :, :8, :8])
    pl = corner_placements(n, (12, 12), side)
    starts = [init.float(), init.float() - torch.tensor([0.1, 0, 0]).view(3, 1, 1),
              init.float() - torch.tensor([0.15, 0, 0]).view(3, 1, 1)]
    expected = [patch_objective(Channel0Sum(), images, labels, p, pl, 1, attack="lavan") for p in starts]
    assert history == pytest.approx(expected, rel=1e-5)


def test_training_rejects_a_bad_warm_start_and_an_unknown_location():
    """init of another shape, or with a value below 0 or above 1, and a location other than
    random / fixed raise ValueError before any step."""
    model = Channel0Sum()
    x, y = torch.zeros(2, 3, 12, 12, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    cfg = PatchTrainingConfig(side=4, attack="lavan", target=1, epochs=1)
    bad = [torch.full((3, 5, 5), 0.5), torch.full((3, 4, 4), 0.5) - 0.6 * torch.eye(4), torch.full((3, 4, 4), 1.5)]
    for init in bad:
        with pytest.raises(ValueError, match="init"):
            train_universal_patch(model, x, y, cfg, seed=0, init=init)
    with pytest.raises(ValueError, match="location"):
        train_universal_patch(model, x, y, PatchTrainingConfig(side=4, location="corner"), seed=0)
    assert model.inputs == []


@pytest.mark.parametrize("amp", [True, False])
def test_amp_runs_the_training_forward_passes_in_bf16_autocast(monkeypatch, amp):
    """With amp on a device with native bf16 (declared here), the model runs under bf16
    autocast, and not without amp; the patch stays float32."""
    import pipeline.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    states = []

    class Recorder(Channel0Sum):
        def forward(self, x):
            states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return super().forward(x)

    x, y = torch.zeros(4, 3, 12, 12, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    cfg = PatchTrainingConfig(side=4, attack="lavan", target=1, epochs=1, batch_size=2, amp=amp)
    patch, _ = train_universal_patch(Recorder(), x, y, cfg, seed=0)
    assert len(states) == 2 and patch.dtype == torch.float32
    if amp:
        assert all(on and dt == torch.bfloat16 for on, dt in states)
    else:
        assert not any(on for on, _ in states)


def test_a_scaled_patch_pixel_takes_the_patch_cell_under_its_centre():
    """A 10-pixel patch at scale 0.6 fills a 6 x 6 box; image pixel k of the box (centre k + 0.5)
    lies in the cell of patch pixel floor((k + 0.5) / 0.6): rows and columns 0, 2, 4, 5, 7, 9.
    The pixels outside the box keep the image's values."""
    side, top, left = 10, 3.0, 2.0
    p = (torch.arange(side * side, dtype=torch.float32).view(side, side) / 100).expand(3, side, side)
    x = torch.ones(1, 3, 12, 12)
    pl = Placements(torch.tensor([top]), torch.tensor([left]), torch.zeros(1), torch.tensor([0.6]))
    out = apply_patch(x, p, pl)
    cells = [int((k + 0.5) / 0.6) for k in range(6)]
    assert cells == [0, 2, 4, 5, 7, 9]
    ref = x.clone()
    ref[0, :, 3:9, 2:8] = p[:, cells][:, :, cells]
    assert torch.equal(out, ref)
