"""Spectra (BlurNet, seed 001): a constant image has only the DC term; high-frequency
noise raises the high-frequency energy; BlurNet's blur lowers it in the first layer."""

from __future__ import annotations

import pytest
import torch

from pipeline.analysis.spectrum import first_layer_maps, high_frequency_fraction, log_spectrum, spectrum_figure
from pipeline.defenses.base import apply_defense_list
from pipeline.models import build_model


def test_constant_image_is_all_dc():
    x = torch.full((2, 3, 16, 16), 0.4)
    s = log_spectrum(x)
    assert s.shape == (16, 16) and s[8, 8] == 1.0 and float(s.sum()) == pytest.approx(1.0)
    assert high_frequency_fraction(x) == pytest.approx(0.0, abs=1e-9)


def test_sticker_noise_adds_high_frequency_energy():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    clean = (0.3 + 0.4 * xx * yy).expand(4, 3, 32, 32).clone()
    adv = clean.clone()
    adv[:, :, 8:14, 6:26] = torch.rand(4, 3, 6, 20, generator=g)  # a noisy sticker band
    assert high_frequency_fraction(adv) > 5 * high_frequency_fraction(clean)
    torch.manual_seed(0)
    model = build_model("traffic_cnn", 43, [0.5] * 3, [0.25] * 3).eval()
    maps = first_layer_maps(model, adv)
    assert maps.shape == (4, 64, 16, 16)
    fig = spectrum_figure(model, clean, adv)
    assert len(fig.axes) == 12  # 6 panels + 6 colour bars


def test_blurnet_lowers_the_first_layer_high_frequencies():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    x = torch.rand(4, 3, 32, 32)
    before = high_frequency_fraction(first_layer_maps(model, x))
    blurred = apply_defense_list(model, [{"name": "blurnet", "kernel": "gaussian", "size": 5}]).eval()
    # the hook filters the first conv's output; record what the next layer receives
    seen = []
    h = blurred.net.bn1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        blurred(x)
    h.remove()
    assert high_frequency_fraction(seen[0]) < 0.7 * before  # white-noise input: 0.96 -> about 0.56
