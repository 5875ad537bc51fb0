"""The classic attacks taken from ART (DeepFool, JSMA, C&W L2, One Pixel) behind
the project's attack interface, on a model whose decision boundaries are known.

The model (:func:`channel_model`) is linear in the three channel means: logits
``100 * (mean_k - mean of the three channel means)`` (weights 25 on the
normalised input, std 0.25), so class k wins iff channel k has the highest
mean, and the logit gap between two classes is ``100 *`` the gap of their
channel means. The images (:func:`channel_images`) are grey 0.5 with zero-mean
noise in +-0.05 and their class channel raised by ``MARGIN = 0.01``: every
image is classified correctly with a logit gap of exactly 1, and the smallest
L2 change that flips it is known (0.005 on each of 2 x 64 values, 0.057).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("art")

from pipeline.attacks.base import build_attack, list_attacks  # noqa: E402
from pipeline.attacks.classic import JSMA, CarliniL2, DeepFool, OnePixel  # noqa: E402
from pipeline.models import Normalized  # noqa: E402

MARGIN = 0.01


def channel_model() -> nn.Module:
    """3-class linear model on the channel means (module docstring), eval mode."""
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(25 * (torch.eye(3) - 1 / 3))
        lin.bias.zero_()
    return Normalized(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin), (0.5,) * 3, (0.25,) * 3).eval()


def channel_images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (n, 3, 8, 8) in [0.44, 0.56] and labels 0, 1, 2, 0, ..."""
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(n, 3, 8, 8, generator=g) - 0.5) * 0.1
    noise = noise - noise.mean((2, 3), keepdim=True)
    y = torch.arange(n) % 3
    x = 0.5 + noise + MARGIN * nn.functional.one_hot(y, 3).float().view(n, 3, 1, 1)
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# Settings small enough for a test; each case states why every image must flip.
CASES = {
    # Affine classifier: DeepFool's linearisation is exact, so it reaches the
    # boundary and the 2% overshoot crosses it (steps of ~0.005 per value, far
    # from the [0, 1] clip): every image flips.
    "deepfool": ({}, DeepFool),
    # One JSMA iteration sets two features of the target channel to 1 (theta=1),
    # raising its mean by >= 2 * 0.44 / 64 = 0.0138 > MARGIN: every image flips,
    # well within gamma (27 of 192 features).
    "jsma": ({}, JSMA),
    # C&W with margin kappa = 0.5 (a logit gap of 0.5 past the boundary, so no
    # float ties at the boundary): the optimum (L2 ~ 0.085) lies inside the box
    # and c = 1 weighs the margin term enough that 10 line-searched steps reach
    # it; the attack is deterministic, every image flips.
    "cw_l2": ({"confidence": 0.5, "max_iter": 10, "binary_search_steps": 2, "initial_const": 1.0}, CarliniL2),
    # One pixel moves each channel mean by up to 1/64 = 0.0156 > MARGIN: a pixel
    # whose true channel is ~0 and another ~1 flips the image; about 1 in 8
    # random colours does, and DE draws 400 candidates in its first generation.
    "one_pixel": ({"max_iter": 10}, OnePixel),
}


def test_the_classic_attacks_are_registered():
    assert {"deepfool", "jsma", "cw_l2", "one_pixel"} <= set(list_attacks())


@pytest.mark.parametrize("name", list(CASES))
def test_attack_built_by_name_keeps_format_and_breaks_the_model(name):
    params, cls = CASES[name]
    model, (x, y) = channel_model(), channel_images()
    assert accuracy(model, x, y) == 1.0
    attack = build_attack(name, {**params, "batch_size": 4})  # two batches: 4 + 2
    assert isinstance(attack, cls) and attack.name == name
    x_adv = attack(model, x, y, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and x_adv.device == x.device
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # minimum drop: every image flips (justified per attack in CASES)
    assert accuracy(model, x_adv, y) == 0.0
    # one ART classifier for both batches
    assert len(attack._classifiers) == 1
    # the model is left as found: eval mode, parameters trainable again
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_one_pixel_changes_one_pixel_and_is_reproducible():
    model, (x, y) = channel_model(), channel_images()
    attack = build_attack("one_pixel", {"max_iter": 10})
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = attack(model, x, y, torch.Generator().manual_seed(7))
    assert (np.random.get_state()[1] == state).all()  # numpy's global state restored
    b = attack(model, x, y, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    changed = (a - x).abs().amax(1).flatten(1) > 0
    assert changed.sum(1).tolist() == [1] * len(x)  # the other 63 pixels bit-exact


def test_targeted_jsma_reaches_the_target_and_untargeted_skips_misclassified_images():
    model, (x, y) = channel_model(), channel_images()
    x_adv = build_attack("jsma", {"target": 2})(model, x, y)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == 2).all()
    wrong = y.clone()
    wrong[0] = 1  # the model predicts 0 for image 0: already misclassified
    x_adv = build_attack("deepfool")(model, x, wrong)
    assert torch.equal(x_adv[0], x[0])
    assert not torch.equal(x_adv[1], x[1])


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("deepfool", {"max_iter": -1}, "max_iter"),
        ("deepfool", {"epsilon": -0.1}, "epsilon"),
        ("deepfool", {"target": 1}, "untargeted"),
        ("jsma", {"gamma": 1.5}, "gamma"),
        ("jsma", {"gamma": 0}, "gamma"),
        ("jsma", {"theta": 0}, "theta"),
        ("cw_l2", {"max_iter": 0}, "max_iter"),
        ("cw_l2", {"learning_rate": -1}, "learning_rate"),
        ("cw_l2", {"lr": 0.1}, "lr"),  # unknown key
        ("one_pixel", {"es": 2}, "es"),
        ("one_pixel", {"pixels": 0}, "pixels"),
    ],
)
def test_bad_params_are_rejected_with_the_field_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_attack(name, params)


def test_target_outside_the_model_classes_is_rejected():
    model, (x, y) = channel_model(), channel_images()
    with pytest.raises(ValueError, match="not a class"):
        build_attack("jsma", {"target": 5})(model, x, y)
