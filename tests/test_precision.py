"""Mixed precision (train.amp, patch.amp): bf16 autocast only where the device runs it
natively, weights and the optimised patch stay float32, and the result still learns."""

from __future__ import annotations

import logging

import pytest
import torch

import pipeline.precision as precision
from pipeline.attacks.patch import PatchTrainingConfig, patch_objective, sample_placements, train_universal_patch
from pipeline.models import build_model
from pipeline.train import Trainer
from tests.test_train import data, spec, train_cfg


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has native bf16, so the bf16 path runs on any machine (it is
    only slower where emulated)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_amp_off_is_float32_everywhere():
    assert precision.amp_dtype("cpu", False) is None
    assert precision.precision_name(None) == "fp32"
    with precision.autocast("cpu", None):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.float32


def test_amp_without_native_bf16_falls_back_to_float32_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline.precision"):
        assert precision.amp_dtype("cpu", True) is None
    assert "no native bf16" in caplog.text


def test_amp_on_runs_the_forward_in_bf16(native_bf16):
    dtype = precision.amp_dtype("cpu", True)
    assert dtype == torch.bfloat16 and precision.precision_name(dtype) == "bf16-autocast"
    with precision.autocast("cpu", dtype):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16


def test_bf16_training_keeps_float32_weights_and_learns(native_bf16):
    train, test = data(), data(32, seed=1)
    trainer = Trainer(spec(), train, test, train_cfg(amp=True), seed=0)
    assert trainer.precision() == "bf16-autocast"
    hist = [trainer.run_epoch(e) for e in range(3)]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in trainer.model_state_dict().values())
    fp32 = Trainer(spec(), train, test, train_cfg(), seed=0)
    assert fp32.precision() == "fp32"
    for e in range(3):
        fp32.run_epoch(e)
    # same recipe, seed, order and augmentation; only the arithmetic differs
    a, b = trainer.model_state_dict(), fp32.model_state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_patch_is_float32_and_still_lowers_the_objective(native_bf16):
    torch.manual_seed(3)
    model = build_model("resnet20", 10, (0.5,) * 3, (0.25,) * 3).eval()
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (256,))
    cfg = PatchTrainingConfig(side=10, target=3, epochs=2, step_size=4 / 255, decay_epochs=(), batch_size=32, amp=True)
    patch, history = train_universal_patch(model, images[:192], labels[:192], cfg, seed=0)
    assert patch.dtype == torch.float32 and patch.min() >= 0 and patch.max() <= 1
    pl = sample_placements(64, (32, 32), 10, generator=torch.Generator().manual_seed(9))
    before = patch_objective(model, images[192:], labels[192:], torch.zeros(3, 10, 10), pl, target=3)
    after = patch_objective(model, images[192:], labels[192:], patch, pl, target=3)
    assert after < before - 0.1  # evaluated in float32
