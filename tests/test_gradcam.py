"""Grad-CAM (Selvaraju et al. 2017; Yu 2022, Eqs. 2-3) against a direct implementation of its definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.gradcam import default_gradcam_layer, gradcam
from pipeline.models import Normalized, build_model


def tiny_net(seed=0, classes=5):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes),
    )
    return Normalized(net, (0.5,) * 3, (0.25,) * 3).eval()


def gradcam_by_definition(model, layer, x, classes):
    """L = ReLU(sum_k a_k A^k), a_k = mean_ij dy^c/dA^k_ij; bilinear upsampling; divided by the max."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = store["A"]
    (g,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), a)
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, cam / peak, torch.zeros_like(cam)).detach()


def test_gradcam_equals_the_definition_batched_with_one_class_per_image():
    model = tiny_net()
    layer = model.net[2]
    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 1, 2, 3, 4, 0])
    cam = gradcam(model, x, classes, layer)
    assert cam.shape == (6, 12, 12) and cam.dtype == torch.float32
    assert torch.allclose(cam, gradcam_by_definition(model, layer, x, classes), atol=1e-5)
    assert cam.min() >= 0 and cam.max() <= 1
    peaks = cam.flatten(1).amax(1)
    assert torch.all((peaks == 0) | torch.isclose(peaks, torch.ones_like(peaks)))
    # batched: the same as one image at a time
    single = torch.cat([gradcam(model, x[i : i + 1], classes[i : i + 1], layer) for i in range(6)])
    assert torch.allclose(cam, single, atol=1e-5)
    assert not torch.isnan(cam).any()


def test_gradcam_at_the_default_layer_of_resnet20_and_an_int_class():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(2, 3, 32, 32)
    assert default_gradcam_layer(model) is model.net.layer3
    cam = gradcam(model, x, 3)
    expected = gradcam_by_definition(model, model.net.layer3, x, torch.tensor([3, 3]))
    assert torch.allclose(cam, expected, atol=1e-5)


def test_gradcam_leaves_the_model_as_it_was():
    model = tiny_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradcam(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_default_layer_picks_the_last_feature_block():
    mobilenet = build_model("mobilenet_v2", 4, (0.5,) * 3, (0.25,) * 3)
    assert default_gradcam_layer(mobilenet) is mobilenet.net.features
    model = tiny_net()
    assert default_gradcam_layer(model) is model.net[2]  # generic fallback: the last Conv2d
    with pytest.raises(ValueError, match="Conv2d"):
        default_gradcam_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)))


def test_gradcam_rejects_mismatched_classes():
    with pytest.raises(ValueError, match="one class per image"):
        gradcam(tiny_net(), torch.rand(3, 3, 8, 8), torch.tensor([0, 1]))
