"""Feature norms and IFNR (Yu et al. 2021, Section 3) against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.analysis.feature_norms import block_outputs, channel_norms, ifnr, ifnr_table, norm_map_figure
from pipeline.defenses.fnc import feature_norm_clip, insert_fnc
from pipeline.models import build_model


class Block(nn.Module):
    """A 'block' that passes its input through (so its output is the image)."""

    def forward(self, x):
        return x


def test_ifnr_hand_computed():
    clean = torch.zeros(1, 2, 2, 2)
    clean[0, 0] = 3.0  # ||f~_ij|| = 3 everywhere
    patched = clean.clone()
    patched[0, :, 0, 0] = torch.tensor([3.0 + 6.0, 8.0])  # f* at (0, 0) = (6, 8): norm 10
    assert float(ifnr(clean, patched)[0]) == pytest.approx(10 / 3)
    assert float(ifnr(clean, clean)[0]) == 0.0
    assert channel_norms(patched)[0, 0, 0] == pytest.approx((81 + 64) ** 0.5)


def test_block_outputs_and_table_on_a_known_model():
    model = nn.Sequential(Block(), nn.Flatten())
    x = torch.full((3, 3, 4, 4), 0.5)
    p = x.clone()
    p[:, :, 0, 0] = 1.0
    outs = block_outputs(model, x, block_types=[Block])
    assert list(outs) == ["0"] and torch.equal(outs["0"], x)
    table = ifnr_table(model, x, p, block_types=[Block])
    # ||f*|| at (0, 0) = sqrt(3 * 0.25) ; mean clean norm = sqrt(3 * 0.25)
    assert table["ifnr_mean"].item() == pytest.approx(1.0) and table["n_images"].item() == 3
    with pytest.raises(ValueError, match="no block"):
        block_outputs(nn.Sequential(nn.Flatten()), x)


def test_resnet_table_has_every_block_and_fnc_is_seen():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3).eval()
    x = torch.rand(4, 3, 32, 32)
    p = x.clone()
    p[:, :, 10:20, 10:20] = torch.rand(4, 3, 10, 10)
    base = ifnr_table(model, x, p)
    assert len(base) == 9 and list(base["depth"]) == list(range(1, 10)) and (base["ifnr_mean"] > 0).all()
    unclipped = block_outputs(model, p)
    insert_fnc(model, alpha=0.5)
    clipped = block_outputs(model, p)
    first = list(clipped)[0]  # its input is the same with and without FNC
    assert torch.allclose(clipped[first], feature_norm_clip(unclipped[first], 0.5), atol=1e-6)
    assert not torch.allclose(clipped[first], unclipped[first])
    fig = norm_map_figure(model, x[:1], p[:1], max_blocks=3)
    assert len(fig.axes) >= 8
