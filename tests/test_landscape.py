"""PGD loss landscape (Madry et al. 2018) and the noise-block-versus-Grad-CAM-distance curve (Yu 2022)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.analysis.landscape import gradcam_distance_curve, landscape_figure, pgd_loss_landscape
from pipeline.attacks.pgd import ThreatModel
from pipeline.models import build_model


def test_pgd_landscape_shapes_and_the_loss_rises():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    threat = ThreatModel("linf", 8 / 255, 2 / 255, steps=5, random_start=True, restarts=4)
    r = pgd_loss_landscape(model, x, y, threat)
    assert r["history"].shape == (4, 6) and r["final"].shape == (4, 6)
    assert (r["history"][:, -1] > r["history"][:, 0]).all()  # every restart ascends
    assert not torch.equal(r["final"][0], r["final"][1])  # different random starts
    fig = landscape_figure({"standard": r, "again": r})
    assert len(fig.axes) == 4


class RegionReader(nn.Module):
    """Class 1 iff the mean of the central 8x8 region (rows/cols 12-19) is high; the last
    conv sees only that region, so its Grad-CAM centre lies there."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(1, 1, 32, 32)
        w[..., 12:20, 12:20] = 1.0
        self.register_buffer("w", w)
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.conv.weight, 1.0)

    def forward(self, x):
        a = self.conv(x * self.w)  # (N, 1, 32, 32), nonzero only in the region
        s = 10 * (a.sum(dim=(1, 2, 3)) / (3 * 64) - 0.5)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_noise_block_hurts_less_the_farther_from_the_gradcam_centre():
    model = RegionReader().eval()
    x = torch.full((3, 3, 32, 32), 0.5)
    x[..., 12:20, 12:20] = 1.0
    r = gradcam_distance_curve(model, x, distances=[0, 4, 8, 16], block=6, angles=4)
    conf, clean = r["confidence"], float(r["clean_confidence"])
    assert conf[0] < conf[1] <= conf[2] + 1e-6 and conf[0] < clean - 0.05
    assert float(conf[-1]) == pytest.approx(clean, abs=1e-4)  # 16 px away: the block misses the region
    with pytest.raises(ValueError, match="must fit"):
        gradcam_distance_curve(model, x, distances=[0], block=40)
