"""Input-transform defenses: LGS (Naseer et al. 2019) suppresses a noise patch, and on real
32x32 CIFAR-10 images it also rewrites most of a clean image (measured below); DW (Hayes
2018) inpaints what its own detector flags; random resizing and padding (Xie et al. 2018); BPDA."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.checkpoint import build_from_spec, model_spec
from pipeline.defenses.base import apply_defense_list
from pipeline.defenses.input_transforms import (
    DWParams,
    LGSParams,
    bpda,
    dense_gradient_mask,
    digital_watermarking,
    gradient_magnitude,
    local_gradients_smoothing,
    random_resize_pad,
)
from pipeline.models import build_model

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "test.zip"


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


def test_lgs_suppresses_a_noise_patch_on_smooth_images():
    """On images with one straight edge and flat regions (not natural images: see the
    CIFAR-10 test below) LGS changes little besides the patch, which it darkens."""
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
    clean = smooth_images()
    assert torch.equal(digital_watermarking(clean), clean)  # nothing detected: unchanged bit for bit
    patched = with_noise_patch(clean)
    p = DWParams()  # DW's own detector, the one digital_watermarking uses by default
    detected = dense_gradient_mask(patched, p.window, p.stride, p.threshold)[:, 0]
    assert detected[:, 4:12, 20:28].float().mean() > 0.9 and detected[:, 20:, :16].sum() == 0
    # only windows that overlap the patch (rows 4-11, columns 20-27) fire on these smooth images
    near = torch.zeros_like(detected)
    near[:, max(0, 4 - p.window + 1):12 + p.window - 1, max(0, 20 - p.window + 1):28 + p.window - 1] = True
    assert not (detected & ~near).any()
    # the inpainting, with a detector tight around the patch (on the large region the calibrated
    # default flags, Telea has only the region's border to fill from)
    tight = {"window": 6, "stride": 2, "threshold": 0.3}
    out = digital_watermarking(patched, **tight)
    region = (slice(None), slice(None), slice(4, 12), slice(20, 28))
    # the inpainted patch is far closer to the clean image than the noise was
    assert (out - clean)[region].abs().mean() < 0.4 * (patched - clean)[region].abs().mean()
    far = (slice(None), slice(None), slice(20, 32), slice(0, 16))
    assert torch.equal(out[far], patched[far])
    base = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    defended = apply_defense_list(build_model("resnet20", 10, [0.5] * 3, [0.25] * 3), [{"name": "dw", **tight}])
    defended.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.allclose(defended.eval()(patched), base(out), atol=1e-5)


def cifar10_test_images(per_class=4):
    """The first ``per_class`` JPEGs of every class folder of the shared CIFAR-10 test archive
    (``test/<class>/<nnnn>.jpg``), float (10 * per_class, 3, 32, 32) in [0, 1]."""
    if not CIFAR_TEST.is_file():
        pytest.skip(f"{CIFAR_TEST} not found (the shared CIFAR-10 archives)")
    with zipfile.ZipFile(CIFAR_TEST) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for n in names:
            by_class.setdefault(n.split("/")[1], []).append(n)
        assert len(by_class) == 10
        arrays = [np.array(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for c in sorted(by_class)
                  for n in by_class[c][:per_class]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_on_clean_cifar10_images_lgs_and_dw_rewrite_most_pixels():
    """What the two input defenses do to *clean* real 32x32 images, measured on 40 CIFAR-10
    test images (4 per class). LGS min-max normalises the gradient per image, so a clean
    image's own texture counts as "dense high gradient": with the 32x32 defaults (window 8,
    stride 4, threshold 0.15) 82 % of the pixels lie in a flagged window and 81 % change by
    more than 1/255 (mean absolute change 0.18; 34 % to 100 % per image). LGS is not
    near-identity on natural CIFAR-10 images, which is why it costs clean accuracy; these
    numbers pin that down. DW's detector, calibrated on the validation split to find a patch
    (window 12, stride 4, threshold 0.1), flags nearly all of a clean image (97 %); an image
    flagged everywhere is left as it is (Telea has no pixel to fill from), the others are
    inpainted from their few unflagged pixels. Both leave
    every pixel outside their mask bit for bit unchanged."""
    x = cifar10_test_images()
    assert x.shape == (40, 3, 32, 32)

    lgs = local_gradients_smoothing(x)
    lp = LGSParams()
    lgs_mask = dense_gradient_mask(x, lp.window, lp.stride, lp.threshold)
    changed = ((lgs - x).abs() > 1 / 255).any(dim=1)  # (N, H, W): pixels changed visibly
    lgs_frac = float(changed.float().mean())
    assert 0.7 < lgs_frac < 0.9  # measured 0.81: most of a clean image, not "nearly unchanged"
    assert 0.12 < float((lgs - x).abs().mean()) < 0.25  # measured 0.18 (on [0, 1])
    assert float(lgs_mask.float().mean()) == pytest.approx(0.82, abs=0.08)
    assert not (changed & ~lgs_mask[:, 0]).any()  # only inside flagged windows
    assert torch.equal(lgs[~lgs_mask.expand_as(x)], x[~lgs_mask.expand_as(x)])
    per_image = changed.float().mean(dim=(1, 2))
    assert per_image.min() > 0.2 and (per_image > 0.5).float().mean() > 0.75  # not a few outliers

    dw = digital_watermarking(x)
    dp = DWParams()
    dw_mask = dense_gradient_mask(x, dp.window, dp.stride, dp.threshold)
    grown = torch.nn.functional.max_pool2d(dw_mask.float(), 2 * dp.dilate + 1, stride=1, padding=dp.dilate) > 0
    assert float(dw_mask.float().mean()) > 0.9  # measured 0.97: the calibrated detector flags almost everything
    dw_changed = (dw != x).any(dim=1)
    whole = grown[:, 0].all(dim=(1, 2))  # flagged everywhere: Telea has no pixel to fill from
    assert whole.any() and torch.equal(dw[whole], x[whole])
    assert dw_changed[~whole].any(dim=(1, 2)).all()  # the others are rewritten in their flagged region
    assert not (dw_changed & ~grown[:, 0]).any()  # only the detected, dilated region is inpainted
