"""The two attack kinds in one registry: universal attacks (patches, RP2) through fit / apply."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipeline.attacks.base import UniversalAttack, build_attack, build_universal_attack, list_attacks
from pipeline.attacks.patch import PatchAttack, PatchTrainingConfig, corner_placements, sample_placements
from pipeline.attacks.rp2 import RP2Attack, RP2Params
from pipeline.models import build_model
from pipeline.tasks import patch_task, rp2_task
from tests.test_rp2 import TARGET, TRUE, MaskReader, sticker_mask, victims


def test_one_registry_two_kinds():
    per_image, universal = list_attacks(), list_attacks("universal")
    assert {"pgd", "fgsm"} <= set(per_image) and universal == ["patch", "rp2"]
    assert not set(per_image) & set(universal)
    with pytest.raises(ValueError, match="'rp2' is a universal attack"):
        build_attack("rp2")
    with pytest.raises(ValueError, match="'pgd' is a per-image attack"):
        build_universal_attack("pgd", {})
    attack = build_universal_attack("patch", {"side": 4, "attack": "lavan"})
    assert isinstance(attack, PatchAttack) and isinstance(attack, UniversalAttack) and attack.params.attack == "lavan"


def test_patch_params_are_checked_against_the_registered_losses():
    with pytest.raises(ValidationError, match="unknown patch attack 'lavn'; choose one of: advp, lavan"):
        PatchTrainingConfig(side=4, attack="lavn")
    with pytest.raises(ValidationError, match="location"):
        PatchTrainingConfig(side=4, location="centre")
    with pytest.raises(ValidationError, match="extra"):
        PatchTrainingConfig(side=4, sides=5)
    with pytest.raises(TypeError, match="PatchAttack takes PatchTrainingConfig"):
        PatchAttack(RP2Params())


def test_patch_attack_fit_lowers_its_loss_and_apply_changes_only_the_patch():
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    attack = PatchAttack(PatchTrainingConfig(side=5, target=3, epochs=3, step_size=8 / 255, decay_epochs=(),
                                             batch_size=32, location="fixed"))
    patch, history = attack.fit(model, x, y, seed=0)
    assert patch.shape == (3, 5, 5) and history[-1] < history[0]
    xf = x.float() / 255
    out = attack.apply(patch, xf)  # fixed location: the corner without placements
    assert torch.equal(out, attack.apply(patch, xf, corner_placements(64, (16, 16), 5)))
    assert torch.equal(out[..., :11, :], xf[..., :11, :]) and torch.equal(out[..., :, :11], xf[..., :, :11])
    assert torch.allclose(out[..., 11:, 11:], patch.expand(64, -1, -1, -1))
    with pytest.raises(ValueError, match="needs placements"):
        PatchAttack(PatchTrainingConfig(side=5)).apply(patch, xf)
    moved = PatchAttack(PatchTrainingConfig(side=5)).apply(
        patch, xf, sample_placements(64, (16, 16), 5, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(moved, out)


def test_rp2_attack_fits_over_the_victims_and_applies_under_its_mask():
    mask = sticker_mask()
    model = MaskReader(mask)
    x = victims()
    y = torch.full((len(x),), TRUE)
    params = RP2Params(target=TARGET, steps=60, lr=0.05, rotation=0.0, scale=(1, 1), brightness=(1, 1),
                       translate=0.0, eot_samples=1)
    attack = build_universal_attack("rp2", params, mask=mask)
    delta, history = attack.fit(model, x, y, seed=0)
    assert history["ce"][-1] < history["ce"][0]
    adv = attack.apply(delta, x.float() / 255)
    off = (1 - mask).bool().expand_as(adv)
    assert torch.equal(adv[off], (x.float() / 255)[off])  # outside the mask, the image bit for bit
    assert (model(adv).argmax(1) == TARGET).float().mean() > 0.9
    with pytest.raises(ValueError, match="starts its sticker at zero"):
        attack.fit(model, x, y, seed=0, init=torch.zeros_like(delta))
    with pytest.raises(ValueError, match="only 0 and 1"):
        RP2Attack(params, mask * 0.5)


def test_the_ray_tasks_fit_through_the_interface(monkeypatch):
    """patch_task and rp2_task build the registered universal attack and call its fit."""
    calls = []
    for cls in (PatchAttack, RP2Attack):
        monkeypatch.setattr(cls, "fit", lambda self, model, x, y, seed, device="cpu", init=None, c=cls:
                            calls.append((c.name, seed)) or (torch.zeros(3), []))
    spec_model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3)
    spec = {"arch": "resnet20", "num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3, "defenses": [],
            "state_dict": spec_model.state_dict()}
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    y = torch.zeros(2, dtype=torch.long)
    patch_task({"spec": spec, "data": (x, y), "cfg": PatchTrainingConfig(side=4), "seed": 3, "num_threads": 1})
    rp2_task({"spec": spec, "victims": x, "labels": y, "mask": sticker_mask(), "cfg": RP2Params(target=1), "seed": 4,
              "num_threads": 1})
    assert calls == [("patch", 3), ("rp2", 4)]
