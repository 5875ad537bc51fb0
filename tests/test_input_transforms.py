"""Input-transform defenses: LGS (Naseer et al. 2019) leaves a clean image nearly unchanged
and suppresses a noise patch; random resizing and padding (Xie et al. 2018); BPDA."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import build_from_spec, model_spec
from pipeline.defenses.base import apply_defense_list
from pipeline.defenses.input_transforms import (
    bpda,
    gradient_magnitude,
    local_gradients_smoothing,
    random_resize_pad,
)
from pipeline.models import build_model


def smooth_images(n=4, side=32, seed=0):
    """Natural-image stand-ins: flat regions with gentle shading, separated by one sharp
    horizon edge (sky over ground) at a random height."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    imgs = []
    for _ in range(n):
        sky, ground = torch.rand(3, generator=g) * 0.4 + 0.5, torch.rand(3, generator=g) * 0.4
        horizon = 0.4 + 0.3 * float(torch.rand(1, generator=g))
        img = torch.where(yy < horizon, sky.view(3, 1, 1), ground.view(3, 1, 1)) + 0.05 * xx
        imgs.append(img)
    return torch.stack(imgs).clamp(0, 1)


def with_noise_patch(x, top=4, left=20, side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = x.clone()
    out[:, :, top : top + side, left : left + side] = torch.rand(len(x), 3, side, side, generator=g)
    return out


def test_gradient_magnitude_is_normalised_per_image():
    g = gradient_magnitude(with_noise_patch(smooth_images()))
    assert g.shape == (4, 1, 32, 32) and g.min() >= 0 and g.max() <= 1 + 1e-6
    assert torch.allclose(g.amax(dim=(2, 3)), torch.ones(4, 1))
    assert gradient_magnitude(torch.full((1, 3, 8, 8), 0.5)).abs().max() == 0  # flat image: no gradient


def test_lgs_leaves_clean_images_nearly_unchanged_and_suppresses_the_patch():
    clean = smooth_images()
    out = local_gradients_smoothing(clean)
    assert (out - clean).abs().mean() < 0.01
    patched = with_noise_patch(clean)
    out = local_gradients_smoothing(patched)
    region = (slice(None), slice(None), slice(4, 12), slice(20, 28))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[2:14, 18:30] = False  # away from the patch and the windows that overlap it
    change_in = (out - patched)[region].abs().mean()
    change_out = (out - patched)[..., outside].abs().mean()
    assert change_in > 0.1 and change_out < 0.01 and change_in > 20 * change_out
    assert out.min() >= 0 and out.max() <= 1


def test_lgs_defense_uses_bpda_gradients():
    x = with_noise_patch(smooth_images(2)).requires_grad_(True)
    y = bpda(x, local_gradients_smoothing)
    assert torch.allclose(y, local_gradients_smoothing(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity in the backward pass
    base = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    spec = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, base.state_dict())
    defended = build_from_spec({**spec, "defenses": [{"name": "lgs"}]})
    with torch.no_grad():
        assert torch.allclose(defended(x), base(local_gradients_smoothing(x)), atol=1e-5)


def test_random_resize_pad_shapes_randomness_and_content():
    x = torch.full((2, 3, 32, 32), 0.6)
    outs = [random_resize_pad(x, 4, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(o.shape == (2, 3, 36, 36) for o in outs)
    assert len({o.nonzero()[:, 2:].min(0).values.tolist().__repr__() for o in outs}) > 1  # offsets vary
    for o in outs:
        inside = o[o > 0]
        assert torch.allclose(inside, torch.full_like(inside, 0.6))  # the image, resized, plus zero padding
        assert 32 * 32 <= int((o[0, 0] > 0).sum()) <= 35 * 35
    a = random_resize_pad(x, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, random_resize_pad(x, 4, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="square"):
        random_resize_pad(torch.zeros(1, 3, 32, 30), 4)


def test_one_input_transform_per_model():
    with pytest.raises(ValueError, match="one input defense per model"):
        apply_defense_list(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3),
                           [{"name": "lgs"}, {"name": "input_blur"}])


def test_digital_watermarking_inpaints_the_patch_and_leaves_clean_images_alone():
    from pipeline.defenses.input_transforms import dense_gradient_mask, digital_watermarking

    clean = smooth_images()
    assert torch.equal(digital_watermarking(clean), clean)  # nothing detected: unchanged bit for bit
    patched = with_noise_patch(clean)
    detected = dense_gradient_mask(patched, 8, 4, 0.15)[:, 0]
    assert detected[:, 4:12, 20:28].float().mean() > 0.9 and detected[:, 20:, :16].sum() == 0
    out = digital_watermarking(patched)
    region = (slice(None), slice(None), slice(4, 12), slice(20, 28))
    # the inpainted patch is far closer to the clean image than the noise was
    assert (out - clean)[region].abs().mean() < 0.4 * (patched - clean)[region].abs().mean()
    far = (slice(None), slice(None), slice(20, 32), slice(0, 16))
    assert torch.equal(out[far], patched[far])
    base = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    defended = apply_defense_list(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3), [{"name": "dw"}])
    defended.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.allclose(defended.eval()(patched), base(digital_watermarking(patched)), atol=1e-5)
