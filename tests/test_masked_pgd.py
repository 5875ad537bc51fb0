"""Pixel robustness map and masked PGD (Hwang et al. 2019) on a model that reads a known pixel region only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.base import build_attack
from pipeline.attacks.masked_pgd import MaskedPGDAttack, accuracy_vs_k, pixel_mask, pixel_robustness_map
from pipeline.attacks.pgd import ThreatModel
from pipeline.models import Normalized

REGION = (slice(0, 4), slice(0, 4))  # the 16 of 64 pixels (25 %) the model reads


class RegionModel(nn.Module):
    """Linear: class 1 iff the mean of the top-left 4x4 region (all channels) exceeds 0.5.

    The loss gradient is exactly zero outside the region, so the pixel robustness map is
    zero there and positive inside; an image of region mean 0.5 +- m flips under an
    L-inf perturbation of more than m on the region and never elsewhere."""

    def forward(self, x):
        s = 100 * (x[:, :, REGION[0], REGION[1]].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([-s, s], dim=1)


def region_data(n=12, margin=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.arange(n) % 2
    x[:, :, REGION[0], REGION[1]] = (0.5 + torch.where(y == 1, margin, -margin)).view(-1, 1, 1, 1)
    return x, y


def region_mask():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[REGION] = True
    return m


def test_robustness_map_is_zero_exactly_where_the_model_does_not_look():
    model, (x, y) = RegionModel(), region_data()
    rmap = pixel_robustness_map(model, x, y, batch_size=5)
    assert rmap.shape == (8, 8) and rmap.dtype == torch.float32
    assert (rmap[~region_mask()] == 0).all() and (rmap[region_mask()] > 0).all()
    assert torch.equal(pixel_mask(rmap, 0.25, "top"), region_mask())
    assert not (pixel_mask(rmap, 0.25, "bottom") & region_mask()).any()


def test_robustness_map_is_the_mean_absolute_per_image_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    model = Normalized(net, (0.5,) * 3, (0.25,) * 3).eval()
    x, y = torch.rand(7, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    grads = []
    for xi, yi in zip(x, y, strict=True):
        xi = xi[None].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), yi[None]), xi)
        grads.append(g.abs())
    expected = torch.cat(grads).mean(dim=(0, 1))
    for bs in (1, 3, 256):  # independent of the batch size
        assert torch.allclose(pixel_robustness_map(model, x, y, batch_size=bs), expected, atol=1e-7)


def test_pixel_mask_selects_the_largest_or_smallest_fraction():
    rmap = torch.tensor([[5.0, 1.0, 7.0, 3.0], [0.0, 6.0, 2.0, 4.0]])
    top = pixel_mask(rmap, 0.25, "top")
    assert top.dtype == torch.bool and top.shape == (2, 4)
    assert torch.equal(top, rmap >= 6)  # the 2 largest of 8
    assert torch.equal(pixel_mask(rmap, 0.5, "bottom"), rmap <= 3)  # the 4 smallest
    assert pixel_mask(rmap, 0.01, "top").sum() == 1 and pixel_mask(rmap, 1.0, "bottom").all()
    ties = pixel_mask(torch.zeros(2, 2), 0.5, "top")
    assert ties.tolist() == [[True, True], [False, False]]  # ties by position, deterministic
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pixel_mask(rmap, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        pixel_mask(rmap, 1.5)
    with pytest.raises(ValueError, match="top"):
        pixel_mask(rmap, 0.5, "middle")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        pixel_mask(rmap[None], 0.5)


def test_top_k_masked_pgd_hurts_at_least_as_much_as_bottom_k():
    model, (x, y) = RegionModel(), region_data()
    assert (model(x).argmax(1) == y).all()
    rmap = pixel_robustness_map(model, *region_data(seed=1))  # "training" images
    threat = ThreatModel(norm="linf", eps=0.03, step_size=0.01, steps=5)  # eps > margin 0.02
    ks = [0.25, 0.5, 1.0]
    top = accuracy_vs_k(model, x, y, rmap, ks, threat, "top", batch_size=5)
    bottom = accuracy_vs_k(model, x, y, rmap, ks, threat, "bottom", batch_size=5)
    assert [r["n_pixels"] for r in top] == [16, 32, 64] and [r["k"] for r in bottom] == ks
    # top-k contains the whole region: every image flips; bottom-k misses it until k = 1
    assert [r["accuracy"] for r in top] == [0.0, 0.0, 0.0]
    assert [r["accuracy"] for r in bottom] == [1.0, 1.0, 0.0]
    assert all(t["accuracy"] <= b["accuracy"] for t, b in zip(top, bottom, strict=True))


def test_masked_pgd_attack_uses_the_given_map_or_the_batch_map():
    model, (x, y) = RegionModel(), region_data()
    attack = build_attack("masked_pgd", {"k": 0.25, "which": "top", "eps": 0.03, "step_size": "1/100", "steps": 5})
    assert isinstance(attack, MaskedPGDAttack) and attack.robustness_map is None
    out = attack(model, x, y)  # map computed from the batch: the region
    delta = out - x
    assert (delta[..., ~region_mask()] == 0).all() and (model(out).argmax(1) != y).all()
    other = torch.zeros(8, 8)
    other[4:, 4:] = 1.0  # a given map that points to the bottom-right quarter instead
    attack.robustness_map = other
    out = attack(model, x, y)
    assert ((out - x)[..., other == 0] == 0).all() and ((out - x)[..., other == 1] != 0).any()
    assert (model(out).argmax(1) == y).all()  # the region was not touched
    attack.robustness_map = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="robustness_map"):
        attack(model, x, y)
    assert attack.needs_fit
    attack.fit(model, *region_data(seed=2))  # from "training" images: the region again
    assert torch.equal(pixel_mask(attack.robustness_map, 0.25, "top"), region_mask())
    assert ((attack(model, x, y) - x)[..., ~region_mask()] == 0).all()


@pytest.mark.parametrize("params,message", [
    ({"k": 0}, "greater than 0"),
    ({"k": 1.5}, "less than or equal to 1"),
    ({"which": "middle"}, "'top' or 'bottom'"),
    ({"eps": 8}, "8/255"),
    ({"K": 0.5}, "Extra inputs"),
])
def test_bad_masked_pgd_params_are_rejected(params, message):
    with pytest.raises(ValueError, match=message):
        build_attack("masked_pgd", params)


def test_fit_once_per_model_gives_what_fitting_in_every_shard_gives():
    """The evaluate stage fits masked PGD's map once per model (fit_attack) and hands it to
    every shard; a shard must attack exactly as if it had fitted the map itself."""
    from pipeline.checkpoint import model_spec
    from pipeline.evaluation import attack_shard, fit_attack
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3)
    spec = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, model.state_dict())
    g = torch.Generator().manual_seed(1)
    fit_data = (torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8),
                torch.randint(0, 10, (16,), generator=g))
    x = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (6,), generator=g)
    ap = build_attack("masked_pgd", {"steps": 3, "k": 0.1}).params.model_dump(mode="json")
    state = fit_attack(spec, "masked_pgd", ap, fit_data)
    expected = pixel_robustness_map(_spec_model(spec), fit_data[0].float() / 255, fit_data[1])
    assert state.shape == (32, 32) and torch.allclose(state, expected, atol=1e-6)
    shared = attack_shard(spec, "masked_pgd", ap, x, y, seed=3, fitted=state)
    own = attack_shard(spec, "masked_pgd", ap, x, y, seed=3, fit_data=fit_data)
    assert torch.equal(shared["pred_adv"], own["pred_adv"])
    for key in own["sizes"]:
        assert torch.allclose(shared["sizes"][key], own["sizes"][key])
    assert (own["sizes"]["l0"] <= 0.1 + 1e-6).all()  # only k = 10 % of the pixels change


def _spec_model(spec):
    from pipeline.checkpoint import build_from_spec

    return build_from_spec(spec)


# --------------------------------------------------------------------------- mutation-testing additions

def test_accuracy_vs_k_rejects_bad_inputs_with_the_reason():
    x, y = region_data(n=4)
    rmap = torch.rand(8, 8)
    threat = ThreatModel(eps=0.05, step_size=0.02, steps=1)
    with pytest.raises(ValueError, match=r"expected images \(N, C, H, W\) with N >= 1 and labels \(N,\), "
                                         r"got \(0, 3, 8, 8\), \(0,\)"):
        accuracy_vs_k(RegionModel(), x[:0], y[:0], rmap, [0.5], threat)
    with pytest.raises(ValueError, match=r"got \(4, 3, 8, 8\), \(3,\)"):
        accuracy_vs_k(RegionModel(), x, y[:3], rmap, [0.5], threat)
    with pytest.raises(ValueError, match=r"rmap \(8, 4\) does not match the images' \(H, W\) \(8, 8\)"):
        accuracy_vs_k(RegionModel(), x, y, rmap[:, :4], [0.5], threat)
    one = accuracy_vs_k(RegionModel(), x[:1], y[:1], rmap, [0.5], threat)  # one image is enough
    assert one[0]["n_images"] == 1


def test_accuracy_vs_k_attacks_with_the_callers_settings(monkeypatch):
    """Each call of PGD gets the caller's target and generator (seeded 0 by default), the
    map's mask, and skips the final loss pass; the rows carry the documented keys."""
    import pipeline.attacks.masked_pgd as module

    calls = []
    real = module.pgd

    def spy(model, x, y, threat, target=None, generator=None, mask=None, record_loss=True):
        calls.append({"target": target, "generator": generator, "mask": mask, "record_loss": record_loss})
        return real(model, x, y, threat, target, generator, mask=mask, record_loss=record_loss)

    monkeypatch.setattr(module, "pgd", spy)
    x, y = region_data(n=6)
    rmap = torch.zeros(8, 8)
    rmap[REGION] = 1.0
    threat = ThreatModel(eps=0.05, step_size=0.02, steps=2)
    gen = torch.Generator().manual_seed(5)
    rows = accuracy_vs_k(RegionModel(), x, y, rmap, [0.25, 0.5], threat, target=1, batch_size=4, generator=gen)
    assert [set(r) for r in rows] == [{"k", "which", "n_pixels", "accuracy", "n_images"}] * 2
    assert [(r["k"], r["which"], r["n_pixels"], r["n_images"]) for r in rows] == [(0.25, "top", 16, 6), (0.5, "top", 32, 6)]
    assert len(calls) == 4 and all(c["target"] == 1 and c["generator"] is gen and c["record_loss"] is False
                                   for c in calls)
    assert calls[0]["mask"].sum() == 16  # k = 0.25: the 16 pixels the map ranks first
    calls.clear()
    default = accuracy_vs_k(RegionModel(), x, y, rmap, [0.25], threat)
    assert calls[0]["target"] is None and calls[0]["generator"] is not None and default[0]["which"] == "top"
    # the default generator is seeded 0: the same starts as an explicit manual_seed(0)
    drawn = calls[0]["generator"].initial_seed()
    assert drawn == 0
