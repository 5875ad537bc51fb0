"""RP2 (Eykholt et al., CVPR 2018): masks, victims, the sticker, its optimisation, NPS, metrics.

Small by design (16x16 images, a linear model, ~100 Adam steps): the whole file runs in
seconds on one CPU thread. The shared RP2 files are read in place when present.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from pipeline.attacks.rp2 import (
    DEFAULT_PALETTE,
    RP2Params,
    Transforms,
    apply_rp2,
    evaluate_rp2,
    l2_dissimilarity,
    non_printability_score,
    sample_transforms,
    sticker_colours,
    train_rp2,
    transform_images,
)
from pipeline.data.rp2 import MASK_THRESHOLD, binarize_mask, load_mask, load_victims, rectangles_mask
from pipeline.data.sources import DatasetError

SHARED_RP2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rp2-stop-signs"
S = 16
TRUE, TARGET = 0, 1


def sticker_mask() -> torch.Tensor:
    """Two horizontal bars on a 16x16 image, float (1, S, S) of 0 / 1."""
    m = torch.zeros(1, S, S)
    m[:, 4:7, 3:13] = 1
    m[:, 10:12, 3:13] = 1
    return m


class MaskReader(nn.Module):
    """Linear 3-class model: predicts TARGET iff the mean of the masked pixels exceeds 0.5,
    else TRUE (class 2 never wins). Only the masked pixels can change its prediction."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * S * S, 3)
        m = mask.expand(3, S, S).flatten()
        with torch.no_grad():
            self.lin.weight.zero_()
            self.lin.bias.copy_(torch.tensor([0.0, -10.0, -5.0]))
            self.lin.weight[TARGET] = 20 * m / m.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


def victims(n: int = 12) -> torch.Tensor:
    """uint8 (n, 3, S, S) dark images (values < 0.4): MaskReader calls them TRUE."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, S, S, generator=g) * 0.4 * 255).to(torch.uint8)


def cfg(**kw) -> RP2Params:
    base = dict(target=TARGET, steps=100, lr=0.05, rotation=0.0, scale=(1, 1), brightness=(1, 1), translate=0.0,
                eot_samples=1)
    return RP2Params(**{**base, **kw})


def one(v: float) -> torch.Tensor:
    return torch.tensor([float(v)])


def write_png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------- masks


def test_binarize_rule_is_channel_max_at_128():
    values = torch.tensor([[0, 1, 2, 127], [128, 200, 255, 64]], dtype=torch.uint8)
    assert MASK_THRESHOLD == 128
    assert binarize_mask(values).tolist() == [[[0, 0, 0, 0], [1, 1, 1, 0]]]
    rgb = torch.zeros(3, 1, 3, dtype=torch.uint8)
    rgb[2, 0, 0] = 200  # only blue is bright: still in the mask
    rgb[:, 0, 1] = 127  # grey just below half: out
    rgb[0, 0, 2] = 128
    out = binarize_mask(rgb)
    assert out.dtype == torch.float32 and out.shape == (1, 1, 3) and out.tolist() == [[[1, 0, 1]]]
    with pytest.raises(ValueError, match="integer"):
        binarize_mask(torch.rand(4, 4))


def test_load_mask_resizes_by_area_then_thresholds(tmp_path):
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[8:24, 16:48] = 255  # 2x2 blocks -> rows 4-11, columns 8-23 at 32x32
    arr[40, 0:64:2] = 255  # a 1-pixel line covers 1/4 of each 2x2 block: dropped
    arr[50:52, 0:64] = 1  # stray low values: dropped
    m = load_mask(write_png(tmp_path / "m.png", arr), 32)
    assert m.shape == (1, 32, 32) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    expected = torch.zeros(1, 32, 32)
    expected[:, 4:12, 8:24] = 1
    assert torch.equal(m, expected)


def test_load_mask_errors(tmp_path):
    with pytest.raises(DatasetError, match="mask file not found"):
        load_mask(tmp_path / "nope.png", 32)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="not a decodable image"):
        load_mask(tmp_path / "bad.png", 32)
    wide = np.full((32, 64, 3), 255, np.uint8)
    with pytest.raises(DatasetError, match="aspect ratio differs"):
        load_mask(write_png(tmp_path / "wide.png", wide), 32)
    faint = np.zeros((32, 32, 3), np.uint8)
    faint[4:8, 4:8] = 2
    faint[10, 10] = 127
    with pytest.raises(DatasetError, match="empty after binarising at 128"):
        load_mask(write_png(tmp_path / "faint.png", faint), 32)
    tiny = np.zeros((64, 64, 3), np.uint8)
    tiny[10, 10] = 255  # a lone pixel vanishes when halved
    with pytest.raises(DatasetError, match="empty"):
        load_mask(write_png(tmp_path / "tiny.png", tiny), 32)


def test_rectangles_mask_two_bars():
    m = rectangles_mask(32)
    assert m.shape == (1, 32, 32) and m.dtype == torch.float32 and int(m.sum()) == 64
    rows, cols = m[0].nonzero().T
    assert sorted(set(rows.tolist())) == [7, 8, 23, 24] and sorted(set(cols.tolist())) == list(range(8, 24))
    with pytest.raises(ValueError, match="bar"):
        rectangles_mask(32, bars=((0.5, 0.4),))
    with pytest.raises(ValueError, match="covers no pixel"):
        rectangles_mask(8, bars=((0.5, 0.52),))


@pytest.mark.skipif(not SHARED_RP2.is_dir(), reason=f"{SHARED_RP2} not found (the shared RP2 files)")
def test_shared_rp2_victims_and_masks():
    x, names = load_victims(SHARED_RP2, 32)
    assert x.dtype == torch.uint8 and x.shape == (40, 3, 32, 32)
    assert names[:3] == ["1", "2", "3"] and "14" not in names and names[-1] == "41"
    m = load_mask(SHARED_RP2 / "masks" / "rectangles-32.png", 32)
    assert int(m.sum()) == 30  # 2.93 % of 32x32; the stray 1s and 2s are dropped
    assert 0.80 < float(load_mask(SHARED_RP2 / "masks" / "octagon-32.png", 32).mean()) < 0.85
    assert float(load_mask(SHARED_RP2 / "masks" / "rectangles-256.png", 32).sum()) > 0


def test_victims_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_victims(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        load_victims(tmp_path / "empty")
    (tmp_path / "v").mkdir()
    write_png(tmp_path / "v" / "1.png", np.zeros((16, 16, 3)))
    with pytest.raises(DatasetError, match="expected 32x32"):
        load_victims(tmp_path / "v", 32)


# --------------------------------------------------------------------------- sticker and transforms


@pytest.mark.parametrize("fill", [None, 0.5])
def test_apply_changes_only_masked_pixels_and_stays_in_range(fill):
    x = torch.rand(4, 3, S, S)
    delta = torch.randn(3, S, S) * 3  # large, to exercise the clip
    mask = sticker_mask()
    adv = apply_rp2(x, delta, mask, fill)
    outside = (mask == 0).expand_as(adv)
    assert torch.equal(adv[outside], x[outside])
    assert adv.min() >= 0 and adv.max() <= 1
    if fill is not None:  # the sticker is the same on every image
        assert torch.equal(adv[:, :, mask[0] == 1][0], adv[:, :, mask[0] == 1][1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        apply_rp2(x, delta, mask * 0.5)


def test_transforms_geometry():
    x = torch.rand(1, 1, 8, 8)
    same = transform_images(x, Transforms(one(0), one(1), one(0), one(0), one(1)))
    assert torch.equal(same, x)
    rot = transform_images(x, Transforms(one(math.pi / 2), one(1), one(0), one(0), one(1)))
    assert torch.allclose(rot, torch.rot90(x, -1, (2, 3)), atol=1e-5)
    right = transform_images(x, Transforms(one(0), one(1), one(0.25), one(0), one(1)))
    assert torch.allclose(right[..., 2:], x[..., :-2], atol=1e-6)
    bright = transform_images(x, Transforms(one(0), one(1), one(0), one(0), one(3.0)))
    assert torch.allclose(bright, (3 * x).clamp(0, 1)) and bright.max() <= 1


# --------------------------------------------------------------------------- optimisation


def test_rp2_reaches_target_with_a_masked_perturbation():
    mask = sticker_mask()
    model = MaskReader(mask)
    x = victims()
    y = torch.full((len(x),), TRUE)
    c = cfg(rotation=8.0, scale=(0.95, 1.05), brightness=(0.9, 1.1), translate=0.03, eot_samples=2, **{"lambda": 0.01})
    delta, history = train_rp2(model, x, y, mask, c, seed=0)
    assert delta.shape == (3, S, S) and delta.dtype == torch.float32
    assert torch.equal(delta * (1 - mask), torch.zeros_like(delta))  # exactly zero outside the mask
    assert delta.min() >= -1 and delta.max() <= 1
    assert set(history) == {"loss", "ce", "norm", "nps", "target_rate"} and len(history["loss"]) == 100
    assert history["ce"][-1] < history["ce"][0]
    adv = apply_rp2(x.float() / 255, delta, mask)
    assert adv.min() >= 0 and adv.max() <= 1
    outside = (mask == 0).expand_as(adv)
    assert torch.equal(adv[outside], (x.float() / 255)[outside])
    with torch.no_grad():
        assert (model(x.float() / 255).argmax(1) == TRUE).all()
        assert (model(adv).argmax(1) == TARGET).float().mean() >= 0.8
    metrics = evaluate_rp2(model, x, y, delta, mask, c, transforms=2)
    assert metrics["clean_accuracy"] == 1.0 and metrics["fooling_rate"] >= 0.8 and metrics["target_success"] >= 0.8
    # the metrics recomputed from the adversarial victims: each rate from the predictions,
    # the dissimilarity as the mean over victims of ||x - x_adv|| / ||x_adv||
    with torch.no_grad():
        pred_clean, pred_adv = model(x.float() / 255).argmax(1), model(adv).argmax(1)
    assert metrics["target_success"] == pytest.approx(int((pred_adv == TARGET).sum()) / len(x), abs=1e-6)
    assert metrics["fooling_rate"] == pytest.approx(int((pred_adv != pred_clean).sum()) / len(x), abs=1e-6)
    diff = (x.float() / 255 - adv).flatten(1).norm(dim=1) / adv.flatten(1).norm(dim=1)
    assert metrics["l2_dissimilarity"] == pytest.approx(float(diff.mean()), rel=1e-5)
    assert metrics["n_images"] == len(x)
    # under transforms: 2 random transforms of every adversarial victim, drawn with the seed (0)
    with torch.no_grad():
        tf = sample_transforms(2 * len(x), c, torch.Generator().manual_seed(0))
        pred_tf = model(transform_images(adv.repeat(2, 1, 1, 1), tf)).argmax(1)
    assert metrics["target_success_transformed"] == pytest.approx(int((pred_tf == TARGET).sum()) / len(pred_tf), abs=1e-6)
    # the identity transform leaves the adversarial victims as they are: the same rate
    still = cfg(rotation=0.0, scale=(1, 1), brightness=(1, 1), translate=0.0)
    assert evaluate_rp2(model, x, y, delta, mask, still, transforms=3)["target_success_transformed"] == \
        metrics["target_success"]
    assert all(p.requires_grad for p in model.parameters()) and model.training  # restored


def test_lambda_shrinks_the_masked_norm():
    mask = sticker_mask()
    model = MaskReader(mask)
    x = victims(6)
    y = torch.full((6,), TRUE)
    norms = [train_rp2(model, x, y, mask, cfg(steps=80, **{"lambda": lam}), seed=0)[1]["norm"][-1] for lam in (0, 0.1, 3)]
    assert norms[0] > norms[1] > norms[2]


def test_sticker_fill_keeps_sticker_colours_in_range():
    mask = sticker_mask()
    model = MaskReader(mask)
    x = victims(4)
    delta, _ = train_rp2(model, x, torch.full((4,), TRUE), mask, cfg(steps=30, sticker_fill=0.5), seed=0)
    assert delta.min() >= -0.5 and delta.max() <= 0.5
    colours = sticker_colours(delta, mask, 0.5)
    assert colours.shape == (int(mask.sum()), 3) and colours.min() >= 0 and colours.max() <= 1


def test_rp2_refuses_bad_inputs():
    mask = sticker_mask()
    model = MaskReader(mask)
    x = victims(3)
    with pytest.raises(ValueError, match="target class"):
        train_rp2(model, x, torch.full((3,), TARGET), mask, cfg(steps=1), seed=0)
    with pytest.raises(ValueError, match="not a class"):
        train_rp2(model, x, torch.full((3,), TRUE), mask, cfg(steps=1, target=7), seed=0)
    with pytest.raises(ValueError, match="uint8"):
        train_rp2(model, x.float(), torch.full((3,), TRUE), mask, cfg(steps=1), seed=0)
    with pytest.raises(ValueError, match="mask"):
        train_rp2(model, x, torch.full((3,), TRUE), torch.ones(1, 8, 8), cfg(steps=1), seed=0)


# --------------------------------------------------------------------------- NPS, params, metrics


def test_nps_is_zero_on_the_palette_and_positive_off_it():
    palette = torch.tensor(DEFAULT_PALETTE)
    on = palette.clone().requires_grad_(True)
    score = non_printability_score(on, palette)
    assert float(score.detach()) == 0.0
    score.backward()
    assert torch.isfinite(on.grad).all()  # no NaN from a zero distance
    off = torch.tensor([[0.3, 0.7, 0.9]])
    assert float(non_printability_score(off, palette)) > 0
    near = torch.tensor([[0.02, 0.0, 0.0]])
    assert float(non_printability_score(near, palette)) < float(non_printability_score(off, palette))


def test_nps_term_enters_the_objective():
    mask = sticker_mask()
    model = MaskReader(mask)
    x = victims(4)
    _, hist = train_rp2(model, x, torch.full((4,), TRUE), mask, cfg(steps=5, nps_weight=1.0), seed=0)
    assert all(v >= 0 for v in hist["nps"]) and max(hist["nps"]) > 0


def test_params_validation():
    assert RP2Params(**{"lambda": 0.5}).lam == 0.5 == RP2Params(lam=0.5).lam
    assert RP2Params().model_dump(by_alias=True)["lambda"] == 0.001
    for bad in ({"p": 3}, {"scale": (1.2, 0.9)}, {"brightness": (-0.1, 1)}, {"translate": 0.5},
                {"eot_samples": 0}, {"steps": 0}, {"palette": [(0, 0, 2)]}, {"lr": 0}, {"unknown": 1},
                {"sticker_fill": 1.5}, {"target": -1}):
        with pytest.raises(ValidationError):
            RP2Params(**bad)


def test_l2_dissimilarity_definition():
    x_adv = torch.ones(2, 1, 2, 2)  # ||x_adv|| = 2 for each image
    x = x_adv.clone()
    x[0, 0, 0, 0] = 0  # ||x - x_adv|| = 1 -> 0.5; the second image is unchanged -> 0
    assert l2_dissimilarity(x, x_adv) == pytest.approx(0.25)
    assert l2_dissimilarity((x * 255).to(torch.uint8), (x_adv * 255).to(torch.uint8)) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        l2_dissimilarity(x, x_adv[:1])
    with pytest.raises(ValueError, match="all zero"):
        l2_dissimilarity(x, torch.zeros_like(x))
