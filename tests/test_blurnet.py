"""BlurNet (Raju and Lipasti 2019) and the defense registry: kernels, penalties against
hand-computed values, insertion that keeps checkpoints loadable, input blur, errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import build_from_spec, model_spec
from pipeline.defenses.base import (
    apply_defense_list,
    check_defenses,
    list_defenses,
    needs_training,
    parse_defense,
    training_penalty,
)
from pipeline.defenses.blurnet import (
    BlurNetLayer,
    BlurNetParams,
    blur_kernel,
    blurnet_layers,
    insert_blurnet,
    linf_penalty,
    tv_penalty,
)
from pipeline.defenses.fnc import fnc_modules
from pipeline.models import build_model

MEAN, STD = [0.5] * 3, [0.25] * 3


@pytest.mark.parametrize("kind", ["box", "gaussian"])
@pytest.mark.parametrize("size", [3, 5, 7])
def test_fixed_kernels_are_normalised_symmetric_low_pass(kind, size):
    k = blur_kernel(kind, size)
    assert k.shape == (size, size) and (k >= 0).all()
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(k, k.T) and torch.allclose(k, k.flip(0))
    layer = BlurNetLayer(1, k).eval()
    constant = torch.full((1, 1, 16, 16), 0.7)
    checker = (torch.arange(16).view(-1, 1) + torch.arange(16)).remainder(2).float().view(1, 1, 16, 16) * 2 - 1
    inner = (slice(None), slice(None), slice(size, -size), slice(size, -size))  # away from the zero padding
    assert torch.allclose(layer(constant)[inner], constant[inner], atol=1e-6)  # DC passes unchanged
    attenuation = layer(checker)[inner].abs().max() / checker[inner].abs().max()
    assert attenuation < 0.25  # the highest frequency is cut by more than 4x


def test_gaussian_sigma_follows_opencv_rule_and_errors():
    s = 0.3 * ((5 - 1) / 2 - 1) + 0.8
    r = torch.arange(5.0) - 2
    g = torch.exp(-(r**2) / (2 * s * s))
    assert torch.allclose(blur_kernel("gaussian", 5), torch.outer(g, g) / torch.outer(g, g).sum(), atol=1e-6)
    assert blur_kernel("gaussian", 5, sigma=3.0)[2, 2] < blur_kernel("gaussian", 5, sigma=0.5)[2, 2]
    with pytest.raises(ValueError, match="odd"):
        blur_kernel("box", 4)
    with pytest.raises(ValueError, match="'box' or 'gaussian'"):
        blur_kernel("median", 3)


def test_linf_penalty_hand_computed():
    w = torch.zeros(2, 1, 3, 3)
    w[0, 0, 1, 1], w[0, 0, 0, 0] = 0.5, -0.25
    w[1, 0, 2, 0] = -2.0
    # alpha / K * (max|W_0| + max|W_1|) = 0.1 / 2 * (0.5 + 2.0)
    assert float(linf_penalty(w, 0.1)) == pytest.approx(0.125)


def test_tv_penalty_hand_computed():
    f = torch.tensor([[0.0, 1.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    # vertical |3-0| + |5-1| = 7, horizontal |1-0| + |5-3| = 3; N = K = 1
    assert float(tv_penalty(f, 1e-4)) == pytest.approx(1e-3)
    two = torch.cat([f, 2 * f], dim=1).repeat(2, 1, 1, 1)  # N = 2, K = 2: (10 + 20) * 2 / (2 * 2)
    assert float(tv_penalty(two, 1.0)) == pytest.approx(15.0)


@pytest.mark.parametrize("arch", ["resnet20", "traffic_cnn"])
def test_fixed_blur_keeps_the_baseline_checkpoint_loadable_and_changes_the_output(arch):
    torch.manual_seed(0)
    base = build_model(arch, 10, MEAN, STD).eval()
    spec = model_spec(arch, 10, MEAN, STD, base.state_dict())
    defended = build_from_spec({**spec, "defenses": [{"name": "blurnet", "kernel": "gaussian", "size": 5}]})
    assert defended.state_dict().keys() == base.state_dict().keys()  # fixed kernels are not saved
    assert len(blurnet_layers(defended)) == 1
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(defended(x), base(x), atol=1e-4)
        # the layer filters the first conv's output: with a 1x1 identity kernel nothing changes
        layer = blurnet_layers(defended)[0]
        layer.weight = torch.ones(layer.channels, 1, 1, 1)
        layer.size = 1
        assert torch.allclose(defended(x), base(x), atol=1e-5)
    if arch == "traffic_cnn":
        assert isinstance(defended.net.l1_filter, BlurNetLayer)  # the documented hook, after conv1's ReLU


def test_learned_kernels_are_trained_saved_and_penalised():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, MEAN, STD)
    layer = insert_blurnet(model, BlurNetParams(kernel="learned", size=3, linf_weight=0.1, tv_weight=1e-4))
    assert any(k.endswith("blurnet.weight") for k in model.state_dict())
    model.train()
    loss = model(torch.rand(2, 3, 32, 32)).sum() + training_penalty(model)  # what the trainer adds
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    expected = linf_penalty(layer.weight, 0.1) + tv_penalty(layer.last_output, 1e-4)
    assert float(training_penalty(model).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    model.eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert layer.last_output is None  # the TV penalty only exists for training forwards
    spec = model_spec("resnet20", 10, MEAN, STD, model.state_dict(),
                      [{"name": "blurnet", "kernel": "learned", "size": 3, "linf_weight": 0.1, "tv_weight": 1e-4}])
    again = build_from_spec(spec)
    assert torch.equal(blurnet_layers(again)[0].weight, layer.weight.detach())


def test_input_blur_filters_the_image_before_the_network():
    torch.manual_seed(0)
    base = build_model("resnet20", 10, MEAN, STD).eval()
    spec = model_spec("resnet20", 10, MEAN, STD, base.state_dict())
    defended = build_from_spec({**spec, "defenses": [{"name": "input_blur", "kernel": "box", "size": 3}]})
    assert defended.state_dict().keys() == base.state_dict().keys()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    blurred = torch.nn.functional.conv2d(x, blur_kernel("box", 3).expand(3, 1, 3, 3), padding=1, groups=3)
    assert torch.allclose(defended(x), base(blurred), atol=1e-5)
    defended(x).sum().backward()  # differentiable: white-box attacks get gradients through it
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_defenses_compose_and_fnc_is_in_the_registry():
    assert {"fnc", "blurnet", "input_blur"} <= set(list_defenses())
    model = apply_defense_list(build_model("resnet20", 10, MEAN, STD),
                               [{"name": "blurnet", "kernel": "box", "size": 3}, {"name": "fnc", "alpha": 1.0}])
    assert len(blurnet_layers(model)) == 1 and len(fnc_modules(model)) == 9
    assert not needs_training([{"name": "fnc"}, {"name": "blurnet", "kernel": "box"}])
    assert needs_training([{"name": "blurnet", "kernel": "learned"}])
    assert needs_training([{"name": "blurnet", "kernel": "none", "tv_weight": 1e-4}])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "jpeg"}, "unknown defense 'jpeg'"),
        ({"name": "blurnet", "size": 4}, "must be odd"),
        ({"name": "blurnet", "kernel": "box", "linf_weight": 0.1}, "set kernel: learned"),
        ({"name": "blurnet", "kernel": "none"}, "without tv_weight"),
        ({"name": "fnc", "alpha": 0}, "greater than 0"),
        ({"name": "fnc", "alpa": 1.0}, "fnc.alpa"),
    ],
)
def test_bad_defense_entries_fail_with_one_line(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_defense(entry)


def test_incompatible_defenses_fail_before_any_work():
    with pytest.raises(ValueError, match="has no block"):  # FNC needs residual blocks
        check_defenses(lambda: build_model("traffic_cnn", 43, MEAN, STD), [{"name": "fnc"}], (3, 32, 32))
    with pytest.raises(ValueError, match="larger than the 8x8 feature map"):
        check_defenses(lambda: build_model("resnet20", 10, MEAN, STD),
                       [{"name": "blurnet", "kernel": "box", "size": 9}], (3, 8, 8))
    with pytest.raises(ValueError, match="already inserted"):
        apply_defense_list(build_model("resnet20", 10, MEAN, STD),
                           [{"name": "blurnet", "kernel": "box"}, {"name": "blurnet", "kernel": "box"}])
