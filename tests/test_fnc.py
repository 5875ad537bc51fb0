"""Feature norm clipping against its equation (Yu et al., ICCV 2021, Eq. 4)."""

from __future__ import annotations

import pytest
import torch

from pipeline.defenses.fnc import (
    FeatureNormClipping,
    feature_norm_clip,
    fnc_modules,
    insert_fnc,
    set_fnc_alpha,
    set_fnc_bpda,
)
from pipeline.models import build_model

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def channel_norms(f):
    return f.norm(dim=1)


def test_long_vectors_clipped_to_threshold_short_ones_untouched():
    torch.manual_seed(0)
    f = torch.randn(4, 16, 6, 6)
    f[:, :, 2, 3] *= 20  # a "patch" position with a huge norm
    alpha = 1.0
    g = feature_norm_clip(f, alpha, eps=0.0)
    norms = channel_norms(f)
    threshold = alpha * norms.mean(dim=(1, 2), keepdim=True)
    over = norms > threshold
    assert over[:, 2, 3].all()
    # clipped vectors: norm == threshold, direction kept
    assert torch.allclose(channel_norms(g)[over], threshold.expand_as(norms)[over], rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(g, f, dim=1)
    assert torch.allclose(cos[over], torch.ones_like(cos[over]), atol=1e-5)
    # the others unchanged, bit for bit
    assert torch.equal(g.permute(0, 2, 3, 1)[~over], f.permute(0, 2, 3, 1)[~over])


def test_equation_literally():
    torch.manual_seed(1)
    f = torch.relu(torch.randn(3, 8, 5, 5)) * torch.rand(3, 1, 1, 1) * 10
    alpha = 1.2
    n = f.norm(dim=1, keepdim=True)
    mean = n.mean(dim=(2, 3), keepdim=True)
    expected = f / n * torch.minimum(n, alpha * mean)
    expected = torch.nan_to_num(expected)  # 0/0 at all-zero vectors -> 0
    assert torch.allclose(feature_norm_clip(f, alpha, eps=1e-12), expected, atol=1e-6)


def test_zero_vectors_stay_zero_without_nan():
    f = torch.zeros(2, 4, 3, 3)
    f[0, :, 0, 0] = 1.0
    g = feature_norm_clip(f, 1.0)
    assert torch.isfinite(g).all()
    assert torch.equal(g[1], torch.zeros_like(g[1]))
    assert torch.equal(g[0, :, 1:, 1:], torch.zeros(4, 2, 2))


def test_per_sample_not_per_batch():
    torch.manual_seed(2)
    a = torch.randn(1, 8, 4, 4)
    b = torch.randn(1, 8, 4, 4) * 100  # a wildly different neighbour
    alone = feature_norm_clip(a, 1.0)
    together = feature_norm_clip(torch.cat([a, b]), 1.0)[:1]
    assert torch.equal(alone, together)


def test_model_prediction_independent_of_batch():
    torch.manual_seed(3)
    model = build_model("resnet20", 10, MEAN, STD).eval()
    insert_fnc(model, alpha=1.0)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert torch.allclose(full, single, atol=1e-5)


def test_insert_after_every_block_keeps_state_dict_and_changes_output():
    torch.manual_seed(4)
    model = build_model("resnet20", 10, MEAN, STD).eval()
    keys = set(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    names = insert_fnc(model, alpha=1.0)
    assert len(names) == 9 and len(fnc_modules(model)) == 9
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        clipped = model(x)
        set_fnc_alpha(model, 1e6)  # a threshold no norm reaches: the network is unchanged
        unclipped = model(x)
    assert not torch.allclose(before, clipped)
    assert torch.allclose(before, unclipped, atol=1e-6)


def test_clipping_caps_the_feature_norm_a_bright_square_causes():
    """A high-contrast square makes large feature norms; FNC caps them at alpha x mean."""
    torch.manual_seed(5)
    model = build_model("resnet20", 10, MEAN, STD).eval()
    insert_fnc(model, alpha=1.0)
    seen = []
    block = model.net.layer3[-1]
    block.fnc.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x = torch.full((1, 3, 32, 32), 0.5)
    x[:, :, 4:14, 4:14] = torch.rand(1, 3, 10, 10).round()
    with torch.no_grad():
        model(x)
    before, after = seen[0]
    nb, na = before.norm(dim=1), after.norm(dim=1)
    assert nb.max() > nb.mean() * 1.0
    assert na.max() <= nb.mean() * 1.0 + 1e-4


@pytest.mark.parametrize("name,size,expected", [("mobilenet_v2", 64, 17), ("resnet50", 64, 16), ("inception_v3", 299, 11)])
def test_generic_insertion_in_torchvision_models(name, size, expected):
    model = build_model(name, 5, MEAN, STD).eval()
    assert len(insert_fnc(model, alpha=1.0)) == expected
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 5)


def test_bad_alpha_and_double_insertion_rejected():
    with pytest.raises(ValueError, match="alpha"):
        FeatureNormClipping(0.0)
    model = build_model("resnet20", 10, MEAN, STD)
    insert_fnc(model, 1.0)
    with pytest.raises(ValueError, match="already"):
        insert_fnc(model, 1.0)
    with pytest.raises(ValueError, match="no block"):
        insert_fnc(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), 1.0)


def test_bpda_keeps_the_forward_and_passes_the_gradient_as_the_identity():
    """Athalye et al. 2018, Section 4.1: the clipped map forward, the identity backward. Without
    BPDA the gradient along a clipped vector's own direction is only alpha / (H W) (its norm is
    pinned at the threshold, which moves with the mean norm alone), which is what starves a
    white-box patch attack on FNC."""
    torch.manual_seed(0)
    f = torch.rand(2, 4, 16, 16)
    f[0, :, 1, 1] *= 50  # one vector far above the mean: clipped
    a = f.clone().requires_grad_(True)
    b = f.clone().requires_grad_(True)
    out_exact, out_bpda = feature_norm_clip(a, 1.0), feature_norm_clip(b, 1.0, bpda=True)
    assert torch.allclose(out_exact, out_bpda, atol=1e-6)  # equal up to float rounding
    v = f[0, :, 1, 1] / f[0, :, 1, 1].norm()  # the clipped vector's direction
    w = torch.zeros_like(f)
    w[0, :, 1, 1] = v
    (out_exact * w).sum().backward()
    (out_bpda * w).sum().backward()
    assert torch.equal(b.grad, w)  # identity
    along = float(a.grad[0, :, 1, 1] @ v)  # the exact gradient along the clipped direction
    assert along == pytest.approx(1.0 / 256, rel=0.05)  # alpha / (H W): through the mean norm only


def test_set_fnc_bpda_switches_every_module_and_leaves_predictions():
    torch.manual_seed(1)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    insert_fnc(model, 1.0)
    x = torch.rand(3, 3, 32, 32)
    before = model(x)
    assert set_fnc_bpda(model, True) == len(fnc_modules(model)) == 9
    assert all(m.bpda for m in fnc_modules(model))
    assert torch.allclose(model(x), before, atol=1e-6)
    set_fnc_bpda(model, False)
    assert not any(m.bpda for m in fnc_modules(model))
