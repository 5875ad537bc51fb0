"""Tests of pipeline.models: registry, CIFAR ResNets, torchvision models, weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.models import (
    MODEL_NAMES,
    Normalized,
    build_model,
    cifar_resnet,
    fnc_block_types,
    list_models,
    load_state_dict_file,
    model_info,
    register_model,
    registry,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_NAMES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
ALL_NAMES = CIFAR_NAMES + ("resnet50", "mobilenet_v2", "inception_v3")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count(module: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


def perturbed_resnet20(num_classes: int = 10, seed: int = 1) -> Normalized:
    """A resnet20 whose BN running statistics are no longer the defaults."""
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes, CIFAR_MEAN, CIFAR_STD)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def big_models() -> dict[str, Normalized]:
    torch.manual_seed(0)
    return {
        name: build_model(name, 5, IMAGENET_MEAN, IMAGENET_STD).eval()
        for name in ("resnet50", "mobilenet_v2", "inception_v3")
    }


# --------------------------------------------------------------------------- registry


def test_names_listed_sorted_and_consistent():
    assert set(ALL_NAMES) <= set(list_models())
    assert list_models() == sorted(list_models())
    assert MODEL_NAMES == tuple(list_models())
    assert isinstance(MODEL_NAMES, tuple)


@pytest.mark.parametrize(
    ("name", "size", "family"),
    [("resnet20", 32, "cifar_resnet"), ("resnet110", 32, "cifar_resnet"), ("resnet50", 224, "torchvision"),
     ("mobilenet_v2", 224, "torchvision"), ("inception_v3", 299, "torchvision"),
     ("densenet161", 224, "torchvision")],
)
def test_model_info(name, size, family):
    info = model_info(name)
    assert (info.name, info.input_size, info.family) == (name, size, family)


def test_unknown_name_lists_allowed_names():
    with pytest.raises(ValueError) as exc:
        build_model("resnet21", 10, CIFAR_MEAN, CIFAR_STD)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'resnet21'" in msg
    assert "choose one of: densenet161, inception_v3, mobilenet_v2, resnet110, resnet20" in msg
    for name in ALL_NAMES:
        assert name in msg
    with pytest.raises(ValueError, match="resnet21"):
        model_info("resnet21")


def test_register_custom_model_and_reject_duplicates():
    name = "_test_tiny_net"

    @register_model(name, input_size=8, family="test")
    def tiny(num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, num_classes))

    try:
        assert name in list_models()
        assert model_info(name).input_size == 8
        model = build_model(name, 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        assert model(torch.rand(2, 3, 8, 8)).shape == (2, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name, input_size=8, family="test")(tiny)
    finally:
        registry.MODELS.remove(name)
    assert name not in list_models()


def test_bad_arguments_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", 0, CIFAR_MEAN, CIFAR_STD)
    with pytest.raises(ValueError, match="one value a channel"):
        build_model("resnet20", 10, (0.5, 0.5), CIFAR_STD)
    with pytest.raises(ValueError, match="std must be > 0"):
        build_model("resnet20", 10, CIFAR_MEAN, (0.2, 0.0, 0.2))


# --------------------------------------------------------------------------- CIFAR ResNets


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_output_shape(name):
    model = build_model(name, 7, CIFAR_MEAN, CIFAR_STD).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_cifar_parameter_counts():
    # He et al. 2016, Table 6: 0.27M (resnet20) ... 1.7M (resnet110), option A shortcuts.
    assert n_params(build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD)) == 269_722
    assert n_params(build_model("resnet110", 10, CIFAR_MEAN, CIFAR_STD)) == 1_727_962
    counts = [n_params(build_model(n, 10, CIFAR_MEAN, CIFAR_STD)) for n in CIFAR_NAMES]
    assert counts == sorted(counts)
    for got, paper in zip(counts, (0.27e6, 0.46e6, 0.66e6, 0.85e6, 1.7e6), strict=False):
        assert abs(got - paper) / paper < 0.03
    # The Normalized buffers are not parameters; only the classifier depends on num_classes.
    assert n_params(build_model("resnet20", 100, CIFAR_MEAN, CIFAR_STD)) == 269_722 + 90 * 65


def test_cifar_structure():
    net = build_model("resnet56", 10, CIFAR_MEAN, CIFAR_STD).net
    for attr in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"):
        assert hasattr(net, attr)
    assert [len(getattr(net, f"layer{i}")) for i in (1, 2, 3)] == [9, 9, 9]
    assert net.conv1.out_channels == 16 and net.fc.in_features == 64
    assert [net.layer1[0].conv1.stride, net.layer2[0].conv1.stride, net.layer3[0].conv1.stride] == [
        (1, 1), (2, 2), (2, 2)]
    assert [getattr(net, f"layer{i}")[-1].conv2.out_channels for i in (1, 2, 3)] == [16, 32, 64]


def test_cifar_kaiming_normal_init():
    torch.manual_seed(0)
    net = build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD).net
    w = net.layer1[0].conv1.weight  # fan_in = 16 * 3 * 3
    expected = (2.0 / (16 * 9)) ** 0.5  # ~0.118; PyTorch's default init would give ~0.048
    assert abs(w.std().item() - expected) / expected < 0.08


def test_basic_block_option_a_shortcut():
    block = cifar_resnet.BasicBlock(16, 32, stride=2).eval()
    assert n_params(block) == 2 * 32 + 2 * 32 + 16 * 32 * 9 + 32 * 32 * 9  # no projection weights
    with torch.no_grad():
        block.conv2.weight.zero_()  # residual branch -> bn2(0) = beta = 0
        x = torch.randn(2, 16, 8, 8)
        out = block(x)
    expected = torch.zeros(2, 32, 4, 4)
    expected[:, 8:24] = x[:, :, ::2, ::2]
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out, torch.relu(expected))

    same = cifar_resnet.BasicBlock(16, 16).eval()
    with torch.no_grad():
        same.conv2.weight.zero_()
        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(same(x), torch.relu(x))


# --------------------------------------------------------------------------- torchvision models


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "inception_v3"])
def test_torchvision_output_shape(big_models, name):
    model = big_models[name]
    size = model_info(name).input_size
    batch = 1 if name == "inception_v3" else 2
    with torch.no_grad():
        out = model(torch.rand(batch, 3, size, size))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (batch, 5)
    assert torch.isfinite(out).all()


def test_inception_returns_plain_tensor_in_train_mode(big_models):
    model = big_models["inception_v3"]
    assert getattr(model.net, "AuxLogits", None) is None
    model.train()
    try:
        with torch.no_grad():  # a small input (>= 75 px) keeps this fast; the head is the same
            out = model(torch.rand(2, 3, 80, 80))
    finally:
        model.eval()
    assert type(out) is torch.Tensor
    assert out.shape == (2, 5)


def test_inception_official_state_dict_with_aux_logits_loads(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(3)
    official = inception_v3(weights=None, num_classes=4, aux_logits=True, init_weights=False)
    state = official.state_dict()
    assert any(k.startswith("AuxLogits.") for k in state)
    path = tmp_path / "inception_v3_imagenet.pth"
    torch.save(state, path)
    model = build_model("inception_v3", 4, (0.5,) * 3, (0.5,) * 3, weights=path)
    loaded = model.net.state_dict()
    assert not any(k.startswith("AuxLogits.") for k in loaded)
    assert len(loaded) > 0
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_densenet_official_state_dict_with_old_key_names_loads(tmp_path):
    """torchvision's published DenseNet weights name layers ``norm.1`` / ``conv.2``; they load
    into our densenet161 (renamed as torchvision's own loader does) with every value kept."""
    import re

    from torchvision.models import densenet161

    torch.manual_seed(4)
    state = densenet161(weights=None, num_classes=4).state_dict()
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
           if not k.endswith("num_batches_tracked")}  # the published file predates that buffer
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet161_imagenet.pth"
    torch.save(old, path)
    model = build_model("densenet161", 4, IMAGENET_MEAN, IMAGENET_STD, weights=path)
    loaded = model.net.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.endswith("num_batches_tracked"))
    from pipeline.attacks.gradcam import default_gradcam_layer

    assert default_gradcam_layer(model) is model.net.features


# --------------------------------------------------------------------------- Normalized


def test_normalized_really_normalises():
    model = perturbed_resnet20()
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    assert {"mean", "std"} <= set(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(x)
        manual = model.net((x - mean) / std)
        raw = model.net(x)
    torch.testing.assert_close(out, manual)
    assert not torch.allclose(out, raw, atol=1e-3)  # normalisation changes the result
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.rand(3, 32, 32))


def test_normalized_buffers_follow_dtype():
    model = perturbed_resnet20().double()
    assert model.mean.dtype == torch.float64
    assert model(torch.rand(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("layout", ["bare", "normalized", "dataparallel_checkpoint", "model_key"])
def test_weights_round_trip(tmp_path, layout):
    src = perturbed_resnet20(seed=1)
    if layout == "bare":
        obj = src.net.state_dict()
    elif layout == "normalized":
        obj = src.state_dict()
        assert all(k.startswith("net.") or k in ("mean", "std") for k in obj)
    elif layout == "dataparallel_checkpoint":
        obj = {"state_dict": {f"module.{k}": v for k, v in src.net.state_dict().items()}, "epoch": 3}
    else:
        obj = {"model": src.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}
    path = tmp_path / "w.pt"
    torch.save(obj, path)

    torch.manual_seed(99)  # a different random init that loading must overwrite
    dst = build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD, weights=path).eval()
    fresh = build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
        assert not torch.allclose(fresh(x), src(x))


def test_weights_as_str_path(tmp_path):
    src = perturbed_resnet20(seed=2)
    path = tmp_path / "w.pt"
    torch.save(src.net.state_dict(), path)
    dst = build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD, weights=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def test_akamaster_checkpoint_with_linear_key_loads(tmp_path):
    src = perturbed_resnet20(seed=4)
    state = {
        "module." + ("linear." + k[3:] if k.startswith("fc.") else k): v for k, v in src.net.state_dict().items()
    }
    path = tmp_path / "resnet20-akamaster.th"
    torch.save({"state_dict": state, "best_prec1": 91.7}, path)
    dst = build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD, weights=path).eval()
    assert torch.equal(dst.net.fc.weight, src.net.fc.weight)


def test_wrong_num_classes_names_file(tmp_path):
    path = tmp_path / "ten_classes.pt"
    torch.save(perturbed_resnet20(num_classes=10).net.state_dict(), path)
    with pytest.raises(ValueError) as exc:
        build_model("resnet20", 100, CIFAR_MEAN, CIFAR_STD, weights=path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "num_classes=100" in msg and "'resnet20'" in msg
    assert "fc.weight" in msg
    assert "\n" not in msg


def test_wrong_architecture_names_file(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(perturbed_resnet20().state_dict(), path)
    with pytest.raises(ValueError, match=r"r20\.pt.*'resnet32'.*missing key"):
        build_model("resnet32", 10, CIFAR_MEAN, CIFAR_STD, weights=path)


def test_normalized_state_dict_with_other_mean_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(perturbed_resnet20().state_dict(), path)
    with pytest.raises(ValueError, match=r"w\.pt.*mean"):
        build_model("resnet20", 10, IMAGENET_MEAN, CIFAR_STD, weights=path)


_MARKER_NAME = "pickle_code_ran"


def _side_effect(marker: str) -> dict:
    Path(marker).write_text("executed")
    return {}


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_side_effect, (self.marker,))


def test_weights_only_refuses_pickled_code(tmp_path):
    marker = tmp_path / _MARKER_NAME
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker)}, path)

    with pytest.raises(ValueError) as exc:
        load_state_dict_file(path)
    assert not marker.exists()
    assert str(path) in str(exc.value) and "weights_only=True" in str(exc.value)
    with pytest.raises(ValueError, match="evil.pt"):
        build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD, weights=path)
    assert not marker.exists()

    # Sanity check: without weights_only the same file would have run the code.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_model("resnet20", 10, CIFAR_MEAN, CIFAR_STD, weights=path)


@pytest.mark.parametrize(
    "payload", [[torch.zeros(1)], {"epoch": 3}, {}, {"conv1.weight": torch.zeros(1), "lr": 0.1}]
)
def test_non_state_dict_refused(tmp_path, payload):
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="odd.pt"):
        load_state_dict_file(path)


def test_garbage_file_refused(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_state_dict_file(path)


def test_load_state_dict_file_strips_module_prefix(tmp_path):
    path = tmp_path / "dp.pt"
    torch.save({"module.a.weight": torch.ones(2), "module.b": torch.zeros(1, dtype=torch.int64)}, path)
    state = load_state_dict_file(path)
    assert set(state) == {"a.weight", "b"}
    assert state["b"].dtype == torch.int64
    assert all(v.device.type == "cpu" for v in state.values())


def test_torch_load_called_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save({"x": torch.ones(1)}, path)
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_state_dict_file(path)
    assert seen.get("weights_only") is True
    assert str(seen.get("map_location")) == "cpu"


# --------------------------------------------------------------------------- FNC block types


def test_fnc_block_types_contents():
    from torchvision.models import inception, mobilenetv2, resnet

    types = fnc_block_types()
    assert cifar_resnet.BasicBlock in types
    for cls in (resnet.BasicBlock, resnet.Bottleneck, mobilenetv2.InvertedResidual, inception.InceptionA,
                inception.InceptionB, inception.InceptionC, inception.InceptionD, inception.InceptionE):
        assert cls in types
    assert len(types) == 9
    assert all(issubclass(t, nn.Module) for t in types)


def test_fnc_blocks_present_in_cifar_resnets():
    types = fnc_block_types()
    for name, blocks in (("resnet20", 9), ("resnet110", 54)):
        net = build_model(name, 10, CIFAR_MEAN, CIFAR_STD).net
        assert count(net, cifar_resnet.BasicBlock) == blocks
        assert count(net, types) == blocks


def test_fnc_blocks_present_in_torchvision_models(big_models):
    from torchvision.models import inception, mobilenetv2, resnet

    types = fnc_block_types()
    assert count(big_models["resnet50"], resnet.Bottleneck) == 16
    assert count(big_models["resnet50"], types) == 16
    assert count(big_models["mobilenet_v2"], mobilenetv2.InvertedResidual) == 17
    assert count(big_models["mobilenet_v2"], types) == 17
    inc = big_models["inception_v3"]
    per_type = [count(inc, c) for c in (inception.InceptionA, inception.InceptionB, inception.InceptionC,
                                         inception.InceptionD, inception.InceptionE)]
    assert per_type == [3, 1, 4, 1, 2]
    assert count(inc, types) == 11
