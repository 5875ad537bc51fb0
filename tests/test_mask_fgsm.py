"""Mask-FGSM (Yu 2022, Algorithm 1) on a model whose Grad-CAM map and FGSM sign are known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.attacks.base import build_attack
from pipeline.attacks.gradcam import default_gradcam_layer
from pipeline.attacks.mask_fgsm import MaskFGSMAttack, l0_fraction, mask_fgsm
from pipeline.models import Normalized


class BrightnessNet(nn.Module):
    """``A = mean_c(x) - 0.5`` (a 1x1 conv, the Grad-CAM layer); logit of class 1 ``= g * mean(A)``, class 0 its negative.

    So class 1 iff the image is brighter than 0.5 on average; for class 1 the Grad-CAM
    map is ReLU(A) (the bright pixels), for class 0 ReLU(-A) (the dark ones), and the
    FGSM sign is -1 (class 1) or +1 (class 0) everywhere."""

    def __init__(self, gain=50.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.conv.bias.fill_(-0.5)
        self.gain = gain

    def forward(self, x):
        s = self.gain * self.conv(x).mean(dim=(1, 2, 3))
        return torch.stack([-s, s], dim=1)


def brightness_model():
    return Normalized(BrightnessNet(), (0.0,) * 3, (1.0,) * 3).eval()


def halves(left, right, n_rows=8):
    """(3, 8, 8) image: columns 0-3 at ``left``, 4-7 at ``right``."""
    img = torch.full((3, n_rows, 8), float(right))
    img[:, :, :4] = left
    return img


def test_one_step_flips_an_image_and_changes_only_the_hot_half():
    model = brightness_model()
    assert isinstance(default_gradcam_layer(model), nn.Conv2d)
    # class 1 (mean 0.6): Grad-CAM hot on the bright left half; a step of -0.3 there gives mean 0.45
    # class 0 (mean 0.4): hot on the dark left half; +0.3 there gives mean 0.55
    x = torch.stack([halves(0.9, 0.3), halves(0.1, 0.7)])
    y = torch.tensor([1, 0])
    assert (model(x).argmax(1) == y).all()
    res = mask_fgsm(model, x, y, eps=0.3, p_th=0.5, tau=1.0, max_iters=5)
    assert res.success.tolist() == [True, True] and res.iterations.tolist() == [1, 1]  # stopped on misclassification
    expected = torch.stack([halves(0.9 - 0.3, 0.3), halves(0.1 + 0.3, 0.7)])
    assert torch.allclose(res.x_adv, expected, atol=1e-6)
    assert (res.x_adv[:, :, :, 4:] == x[:, :, :, 4:]).all()  # S = 0 <= P_th there: exactly unchanged
    assert torch.allclose(res.l0, torch.full((2,), 0.5))
    assert (model(res.x_adv).argmax(1) != y).all()


def test_already_misclassified_images_are_returned_unchanged():
    model = brightness_model()
    x, y = torch.stack([halves(0.9, 0.3)]), torch.tensor([0])  # predicted 1
    res = mask_fgsm(model, x, y, eps=0.3, p_th=0.5, tau=1.0, max_iters=5)
    assert torch.equal(res.x_adv, x) and res.iterations.tolist() == [0] and res.success.tolist() == [True]


def test_the_paper_update_restarts_from_the_clean_image_and_accumulate_does_not():
    model = brightness_model()
    # A flips after one step of -0.3 on its left half, B (mean 0.7) needs two
    x, y = torch.stack([halves(0.9, 0.3), halves(0.9, 0.5)]), torch.tensor([1, 1])
    paper = mask_fgsm(model, x, y, eps=0.3, p_th=0.5, tau=1.0, max_iters=3)
    # X* = X + F * eta never moves B further than one step: it fails after max_iters
    assert paper.success.tolist() == [True, False] and paper.iterations.tolist() == [1, 3]
    assert torch.allclose(paper.x_adv[1], halves(0.6, 0.5), atol=1e-6)
    acc = mask_fgsm(model, x, y, eps=0.3, p_th=0.5, tau=1.0, max_iters=3, accumulate=True)
    assert acc.success.tolist() == [True, True] and acc.iterations.tolist() == [1, 2]
    # A was frozen once fooled: one step, not two, although B kept going
    assert torch.allclose(acc.x_adv, torch.stack([halves(0.6, 0.3), halves(0.3, 0.5)]), atol=1e-6)


def test_a_step_beyond_the_l0_budget_is_cut_to_the_budget_and_stops():
    model = brightness_model()
    x, y = torch.stack([halves(0.9, 0.3)]), torch.tensor([1])
    res = mask_fgsm(model, x, y, eps=0.3, p_th=0.5, tau=0.25, max_iters=5)  # the step would change 50 %
    assert res.l0.item() == pytest.approx(0.25) and l0_fraction(res.x_adv, x).item() == pytest.approx(0.25)
    assert res.iterations.tolist() == [1] and res.success.tolist() == [False]
    changed = res.x_adv != x
    assert not changed[:, :, :, 4:].any()  # only values the mask allowed
    assert torch.allclose(res.x_adv[changed], torch.tensor(0.6))


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("tau,p_th,eps", [(0.02, 0.0, 0.05), (0.1, 0.3, 0.05), (0.3, 0.0, 0.05), (0.3, 0.6, 0.3)])
def test_l0_and_value_budgets_hold_on_a_conv_net(accumulate, tau, p_th, eps):
    """Budgets cut the first step (small tau, low P_th) or are never reached (high P_th: several iterations)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    model = Normalized(net, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.rand(8, 3, 12, 12)
    y = model(x).argmax(1)  # all correctly classified at the start
    iters = 6
    res = mask_fgsm(model, x, y, eps=eps, p_th=p_th, tau=tau, max_iters=iters, accumulate=accumulate)
    assert (l0_fraction(res.x_adv, x) <= tau + 1e-6).all() and torch.equal(res.l0, l0_fraction(res.x_adv, x))
    assert ((res.x_adv - x).abs().amax() <= (iters if accumulate else 1) * eps + 1e-6)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert (res.iterations <= iters).all() and (res.l0 > 0).any()
    assert torch.equal(res.success, model(res.x_adv).argmax(1) != y)


def test_registry_builds_mask_fgsm_and_rejects_bad_params():
    model = brightness_model()
    attack = build_attack("mask_fgsm", {"eps": "3/10", "p_th": 0.5, "tau": 1, "max_iters": 2})
    assert isinstance(attack, MaskFGSMAttack)
    x, y = torch.stack([halves(0.9, 0.3)]), torch.tensor([1])
    assert torch.allclose(attack(model, x, y), halves(0.6, 0.3)[None], atol=1e-6)
    for params, message in [
        ({"tau": 5}, "over 100 %"),
        ({"tau": 0}, "tau must be > 0"),
        ({"p_th": 1.0}, r"p_th must be in \[0, 1\)"),
        ({"p_th": -0.1}, "p_th"),
        ({"max_iters": 0}, "max_iters"),
        ({"eps": 8}, "8/255"),
        ({"threshold": 0.5}, "threshold"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_attack("mask_fgsm", params)
    with pytest.raises(ValueError, match="tau"):
        mask_fgsm(model, x, y, eps=0.1, p_th=0.5, tau=1.5)


# --------------------------------------------------------------------------- mutation-testing additions

@pytest.mark.parametrize("kwargs,message", [
    ({"x": torch.rand(3, 8, 8)}, r"expected images \(N, C, H, W\) and labels \(N,\), got \(3, 8, 8\) and \(1,\)"),
    ({"y": torch.tensor([1, 0])}, r"got \(1, 3, 8, 8\) and \(2,\)"),
    ({"x": torch.full((1, 3, 8, 8), -0.1)}, r"mask_fgsm expects images in \[0, 1\]"),
    ({"x": torch.full((1, 3, 8, 8), 1.5)}, r"mask_fgsm expects images in \[0, 1\]"),
    ({"eps": 0.0}, r"^eps must be in \(0, 1\]"),
    ({"p_th": 1.0}, r"p_th must be in \[0, 1\) \(the Grad-CAM map is in \[0, 1\]\), got 1.0"),
    ({"p_th": 1.5}, r"p_th must be in \[0, 1\)"),
    ({"tau": 0.0}, r"tau is a fraction of the input values in \(0, 1\], got 0.0"),
    ({"max_iters": 0}, "max_iters must be >= 1, got 0"),
])
def test_mask_fgsm_rejects_bad_inputs_with_the_reason(kwargs, message):
    args = {"x": torch.stack([halves(0.9, 0.3)]), "y": torch.tensor([1]), "eps": 0.1, "p_th": 0.5, "tau": 1.0,
            "max_iters": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        mask_fgsm(brightness_model(), **args)


def test_mask_fgsm_accepts_the_edges_of_its_ranges_and_runs_ten_iterations_by_default():
    model = brightness_model()
    # pixels exactly 0 and 1 are valid images; one iteration is a valid cap
    x, y = torch.stack([halves(1.0, 0.3)]), torch.tensor([1])
    x[0, :, 0, 7] = 0.0
    assert mask_fgsm(model, x, y, eps=0.01, p_th=0.0, tau=1.0, max_iters=1).iterations.tolist() == [1]
    # a far image and a tiny eps: never fooled, never over budget: max_iters (default 10) steps
    far = torch.stack([halves(1.0, 0.6)])  # Grad-CAM 1 on the left half, 0.2 on the right: half the values move
    res = mask_fgsm(model, far, y, eps=0.001, p_th=0.5, tau=1.0)
    assert res.iterations.tolist() == [10] and res.success.tolist() == [False]
    # the same with an explicit Grad-CAM layer
    explicit = mask_fgsm(model, far, y, eps=0.001, p_th=0.5, tau=1.0, layer=default_gradcam_layer(model))
    assert torch.equal(explicit.x_adv, res.x_adv)


def test_l0_fraction_is_per_image():
    x = torch.zeros(3, 2, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = 1  # 1 of 8 values
    x_adv[2] = 1  # all 8
    assert l0_fraction(x_adv, x).tolist() == [0.125, 0.0, 1.0]


def test_the_registered_attack_passes_target_and_accumulate():
    model = brightness_model()
    x, y = torch.stack([halves(0.9, 0.3), halves(0.9, 0.5)]), torch.tensor([1, 1])
    params = {"eps": 0.3, "p_th": 0.5, "tau": 1.0, "max_iters": 3}
    acc = build_attack("mask_fgsm", {**params, "accumulate": True})(model, x, y)
    assert torch.allclose(acc, mask_fgsm(model, x, y, 0.3, 0.5, 1.0, 3, accumulate=True).x_adv)
    assert not torch.allclose(acc, mask_fgsm(model, x, y, 0.3, 0.5, 1.0, 3).x_adv)  # the option matters here
    # targeted at the true class: every image is "reached" at once and returned unchanged
    assert torch.equal(build_attack("mask_fgsm", {**params, "target": 1})(model, x, y), x)
