"""The traffic-sign CNN ``traffic_cnn`` (BlurNet / RP2 LISA-CNN: 3 conv + 1 dense)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.data import DATASETS
from pipeline.defenses.fnc import insert_fnc
from pipeline.models import Normalized, build_model, fnc_block_types, list_models, model_info
from pipeline.models.traffic_sign import TrafficCNN

GTSRB = DATASETS["gtsrb"]


@pytest.fixture(scope="module")
def model() -> Normalized:
    torch.manual_seed(0)
    return build_model("traffic_cnn", GTSRB.num_classes, GTSRB.mean, GTSRB.std).eval()


def test_registered_with_metadata():
    assert "traffic_cnn" in list_models()
    info = model_info("traffic_cnn")
    assert (info.input_size, info.family) == (32, "traffic_cnn")


def test_forward_shape_on_unit_range_images(model):
    x = torch.rand(5, 3, 32, 32)  # [0, 1]; Normalized applies the GTSRB mean / std
    out = model(x)
    assert out.shape == (5, 43) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, model(x))  # eval: dropout off, deterministic
    x.requires_grad_(True)
    model(x)[:, 14].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks need input gradients


def test_architecture_is_lisa_cnn(model):
    net = model.net
    assert isinstance(net, TrafficCNN)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (64, (8, 8), (2, 2)), (128, (6, 6), (2, 2)), (128, (5, 5), (1, 1))
    ]
    assert net.fc.in_features == 512 and net.fc.out_features == 43
    assert sum(p.numel() for p in net.parameters()) == 739_179


def test_wrong_size_and_bad_arguments():
    net = TrafficCNN(10)
    with pytest.raises(ValueError, match=r"expected \(N, 3, 32, 32\)"):
        net(torch.rand(1, 3, 28, 28))
    for kw in ({"num_classes": 0}, {"num_classes": 3, "input_size": 27}, {"num_classes": 3, "dropout": 1.0}):
        with pytest.raises(ValueError):
            TrafficCNN(**kw)
    assert TrafficCNN(18, input_size=28)(torch.rand(2, 3, 28, 28)).shape == (2, 18)


def test_no_fnc_blocks_and_blurnet_slot(model):
    net = TrafficCNN(43).eval()
    assert not any(isinstance(m, fnc_block_types()) for m in net.modules())
    with pytest.raises(ValueError, match="has no block"):
        insert_fnc(net, alpha=1.0)
    net.l1_filter = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)  # BlurNet's depthwise filter
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 43)


def test_weights_round_trip(tmp_path, model):
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    again = build_model("traffic_cnn", 43, GTSRB.mean, GTSRB.std, weights=path).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
