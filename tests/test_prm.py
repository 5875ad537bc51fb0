"""PRM (Hwang et al. 2019): sparse first-layer connections concentrate input gradients on
the designated pixels (IoU), lambda 0 is the plain network, randomisation at inference."""

from __future__ import annotations

import pytest
import torch

from pipeline.attacks.masked_pgd import pixel_robustness_map
from pipeline.checkpoint import model_spec
from pipeline.defenses.base import apply_defense_list, parse_defense
from pipeline.defenses.prm import PRMConv, designated_iou, designated_mask
from pipeline.models import build_model
from pipeline.train import Trainer
from tests.test_train import data, train_cfg

MEAN, STD = [0.5] * 3, [0.25] * 3


def prm_model(lam, randomize=False, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet20", 10, MEAN, STD)
    model = apply_defense_list(model, [{"name": "prm", "lam": lam, "randomize": randomize}])
    return model.eval(), next(m for m in model.modules() if isinstance(m, PRMConv))


def test_designated_mask_has_the_fraction():
    m = designated_mask(32, 32, 0.25, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and int(m.sum()) == 256
    with pytest.raises(ValueError, match="fraction"):
        designated_mask(32, 32, 0.0, torch.Generator())


def test_lambda_zero_is_the_plain_network_and_one_sees_only_the_designated_pixels():
    torch.manual_seed(0)
    plain = build_model("resnet20", 10, MEAN, STD).eval()
    model, prm = prm_model(0.0)
    model.load_state_dict({k.replace("conv1.weight", "conv1.conv.weight") if k == "net.conv1.weight" else k: v
                           for k, v in plain.state_dict().items()})
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-5)
    model, prm = prm_model(1.0)
    with torch.no_grad():
        model(x)
        other = x.clone()
        other[..., ~prm.mask] = torch.rand_like(other[..., ~prm.mask])
        assert torch.allclose(model(x), model(other), atol=1e-5)  # only designated pixels are read


def test_gradients_concentrate_on_the_designated_pixels_with_lambda():
    x, y = data(64)
    xf = x.float() / 255
    ious = {}
    for lam in (0.0, 0.9):
        model, prm = prm_model(lam)
        rmap = pixel_robustness_map(model, xf, y)
        ious[lam] = designated_iou(rmap, prm.mask)
    chance = 0.25 * 0.25 / (0.25 + 0.25 - 0.25 * 0.25)  # two random 25 % sets: about 0.14
    assert ious[0.0] < chance + 0.15
    assert ious[0.9] > 0.8
    # still so after training with the PRM on a small set
    spec = model_spec("resnet20", 10, MEAN, STD, None, [{"name": "prm", "lam": 0.9, "randomize": False}])
    trainer = Trainer(spec, (x, y), data(32, seed=1), train_cfg(epochs=2), seed=0)
    for e in range(2):
        trainer.run_epoch(e)
    prm = next(m for m in trainer.model.modules() if isinstance(m, PRMConv))
    assert designated_iou(pixel_robustness_map(trainer.model.eval(), xf, y), prm.mask) > 0.8


def test_randomized_prm_redraws_the_designated_set_at_inference_only():
    model, prm = prm_model(0.5, randomize=True)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        first = prm.mask.clone()
        model(x)
        assert not torch.equal(first, prm.mask)
        model.train()
        model(x)
        fixed = prm.mask.clone()
        model(x)
        assert torch.equal(fixed, prm.mask)


def test_designated_iou_bounds():
    mask = designated_mask(8, 8, 0.25, torch.Generator().manual_seed(0))
    assert designated_iou(mask.float(), mask) == 1.0
    assert designated_iou((~mask).float(), mask) == 0.0
    with pytest.raises(ValueError, match="prm.lam"):
        parse_defense({"name": "prm", "lam": 1.5})


def test_prm_iou_measures_the_training_set_even_when_the_defense_redraws_it():
    """lambda 1 zeroes the gradient outside the designated set: the IoU with the set the
    network was trained with is exactly 1, although inference re-draws the set (the map
    is measured with the training set held fixed, then the layer is restored)."""
    from pipeline.defenses.prm import prm_iou

    model, layer = prm_model(lam=1.0, randomize=True)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    assert prm_iou(model, x, y, batch_size=8) == pytest.approx(1.0)
    assert layer.randomize is True
    with torch.no_grad():
        model(x)  # the first draw of the layer's generator is the training set ...
        model(x)
    drawn = layer.mask.clone()  # ... later ones are re-draws (the defense)
    assert not torch.equal(drawn, layer.training_mask(32, 32))
    # the map averaged over re-drawn sets overlaps the training set only by chance
    rmap = pixel_robustness_map(model, x, y, batch_size=8)
    assert designated_iou(rmap, layer.training_mask(32, 32)) < 0.5
    assert prm_iou(build_model("resnet20", 10, MEAN, STD).eval(), x, y) is None


def test_random_set_iou_is_the_mean_iou_of_unrelated_sets():
    """f / (2 - f) is what a ranking unrelated to the designated set scores: the mean
    IoU of random 25 % masks against a random map over many draws (0.143 for f = 0.25)."""
    from pipeline.analysis.pixel_robustness import random_set_iou

    gen = torch.Generator().manual_seed(0)
    draws = [designated_iou(torch.rand(32, 32, generator=gen), designated_mask(32, 32, 0.25, gen)) for _ in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(random_set_iou(0.25), abs=0.005)
    assert random_set_iou(0.25) == pytest.approx(1 / 7)
    assert random_set_iou(1.0) == 1.0
