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


class EdgeBlock(torch.nn.Module):
    """A cascaded block whose feature map is known in closed form: channel 0 the grey level,
    channels 1 and 2 four times its central horizontal and vertical differences (replicate
    padding). A uniform image gives the same vector (0.5, 0, 0) at every position; a
    high-contrast square gives long vectors inside the square only."""

    def forward(self, x):
        grey = x.mean(1, keepdim=True)
        p = torch.nn.functional.pad(grey, (1, 1, 1, 1), mode="replicate")
        dx, dy = p[..., 1:-1, 2:] - p[..., 1:-1, :-2], p[..., 2:, 1:-1] - p[..., :-2, 1:-1]
        return torch.cat([grey, 4 * dx, 4 * dy], dim=1)


def edge_model():
    torch.manual_seed(5)
    model = torch.nn.Sequential(EdgeBlock(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 10))
    assert insert_fnc(model, alpha=1.0, block_types=[EdgeBlock]) == ["0"]
    return model.eval()


def clip_by_hand(f, alpha):
    """Eq. 4 position by position, written out: the norm sqrt(sum_c f_c^2) of every vector,
    the threshold alpha x their mean over the map, each longer vector rescaled to it."""
    out = f.clone()
    for n in range(f.shape[0]):
        norms = [[float(sum(float(v) ** 2 for v in f[n, :, i, j]) ** 0.5) for j in range(f.shape[3])]
                 for i in range(f.shape[2])]
        threshold = alpha * sum(map(sum, norms)) / (f.shape[2] * f.shape[3])
        for i in range(f.shape[2]):
            for j in range(f.shape[3]):
                if norms[i][j] > threshold:
                    out[n, :, i, j] = f[n, :, i, j] * (threshold / norms[i][j])
    return out


def hooked(model, block, x):
    """The feature map before and after the clipping that ``insert_fnc`` put after ``block``."""
    seen = []
    handle = block.fnc.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_clipping_caps_the_feature_norm_a_bright_square_causes():
    """A high-contrast square makes the feature vectors under it several times longer than
    elsewhere; FNC (alpha 1) rescales exactly those to alpha x the mean norm and leaves the
    rest alone. A uniform image gives a flat norm map, which FNC leaves unchanged."""
    model = edge_model()
    x = torch.full((2, 3, 32, 32), 0.5)
    x[0, :, 4:14, 4:14] = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(0)).round()
    before, after = hooked(model, model[0], x)
    nb = (before**2).sum(dim=1).sqrt()  # the channel norm per position, from the definition
    square = torch.zeros(32, 32, dtype=torch.bool)
    square[4:14, 4:14] = True
    ring = torch.zeros(32, 32, dtype=torch.bool)
    ring[3:15, 3:15] = True  # the square and the one-pixel ring its edges reach
    assert nb[0][square].mean() > 3 * nb[0][~ring].mean()  # the square's vectors are far longer
    assert torch.allclose(nb[0][~ring], torch.full_like(nb[0][~ring], 0.5))  # elsewhere (0.5, 0, 0)
    assert torch.allclose(nb[1], torch.full_like(nb[1], 0.5))  # the uniform image: a flat map
    # the clipped map is Eq. 4 computed by hand
    torch.testing.assert_close(after, clip_by_hand(before, 1.0), rtol=1e-4, atol=1e-5)
    na = (after**2).sum(dim=1).sqrt()
    threshold = nb[0].mean()
    over = nb[0] > threshold
    assert over[square].float().mean() > 0.5 and not over[~ring].any()
    torch.testing.assert_close(na[0][over], torch.full_like(na[0][over], float(threshold)), rtol=1e-4, atol=1e-5)
    assert torch.equal(after[0][:, ~over], before[0][:, ~over])  # shorter vectors: untouched
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-6)  # flat: nothing is over the mean


def test_clipping_in_a_resnet_block_is_the_equation_on_its_output():
    """In a ResNet-20 the hook replaces layer3's last block's output by Eq. 4 of it (by hand)."""
    torch.manual_seed(5)
    model = build_model("resnet20", 10, MEAN, STD).eval()
    insert_fnc(model, alpha=1.2)
    x = torch.full((1, 3, 32, 32), 0.5)
    x[:, :, 4:14, 4:14] = torch.rand(1, 3, 10, 10).round()
    before, after = hooked(model, model.net.layer3[-1], x)
    expected = clip_by_hand(before, 1.2)
    assert not torch.allclose(expected, before)  # something is clipped
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


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


def test_set_fnc_alpha_changes_every_module_and_rejects_bad_calls():
    model = build_model("resnet20", 10, MEAN, STD)
    with pytest.raises(ValueError, match="no feature norm clipping inserted; call insert_fnc first"):
        set_fnc_alpha(model, 1.0)
    insert_fnc(model, 1.0)
    set_fnc_alpha(model, 0.5)  # below 1 is a valid (stronger) clipping
    assert {m.alpha for m in fnc_modules(model)} == {0.5}
    with pytest.raises(ValueError, match=r"fnc.alpha must be > 0, got 0"):
        set_fnc_alpha(model, 0)


def test_bpda_hook_switches_fncs_backward_and_nothing_else():
    """The generic BPDA switch the ``_bpda`` patch cells use (pipeline.defenses.base.set_bpda):
    FNC's clipping turns to an identity backward with the same forward; a model without a
    BPDA-switchable defense is left alone, and the registry says which defenses have one."""
    from pipeline.defenses.base import has_bpda, set_bpda

    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    insert_fnc(model, alpha=0.5)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert set_bpda(model, True) == len(fnc_modules(model)) == 9
    out_bpda = model(x)
    (grad_bpda,) = torch.autograd.grad(out_bpda.sum(), x)
    assert torch.allclose(out, out_bpda, atol=1e-6) and not torch.allclose(grad, grad_bpda)  # forward up to rounding
    assert all(m.bpda for m in fnc_modules(model))
    assert set_bpda(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3), True) == 0
    assert has_bpda([{"name": "fnc", "alpha": 1.0}]) and has_bpda(["blurnet", "fnc"])
    assert not has_bpda([{"name": "blurnet"}, {"name": "lgs"}]) and not has_bpda([])
