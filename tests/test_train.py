"""Training: a resumed run repeats an uninterrupted one exactly; FNC adjustments do their job."""

from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import build_from_spec, model_spec
from pipeline.config import TrainConfig
from pipeline.defenses.adjust import final_linear, finetune_classifier, recalibrate_batchnorm
from pipeline.defenses.fnc import insert_fnc
from pipeline.io import load_torch, save_torch
from pipeline.train import Trainer, batch_crop_flip, iterate_batches

CFG = {"epochs": 3, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
       "pct_start": 0.3, "label_smoothing": 0.0, "channels_last": True, "eval_batch_size": 64}


def train_cfg(**overrides) -> TrainConfig:
    """The ``train`` section of these tests, validated, with ``overrides``."""
    return TrainConfig(**{**CFG, **overrides})


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand(n, 3, 32, 32, generator=g) * 60).to(torch.uint8)
    x[torch.arange(n), y % 3] += 150  # a learnable colour cue
    return x, y


def spec():
    return model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, None)


def check_resume_repeats_an_uninterrupted_run(make_trainer, path):
    """Three epochs straight, and one epoch + checkpoint + two epochs resumed: same
    weights; and the loss fell."""
    straight = make_trainer()
    hist = [straight.run_epoch(e) for e in range(3)]
    first = make_trainer()
    first.run_epoch(0)
    save_torch(first.state(), path)
    resumed = make_trainer()
    resumed.load_state(load_torch(path))
    resumed.run_epoch(1)
    resumed.run_epoch(2)
    a, b = straight.model_state_dict(), resumed.model_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    train, test = data(), data(32, seed=1)
    check_resume_repeats_an_uninterrupted_run(lambda: Trainer(spec(), train, test, train_cfg(), seed=0),
                                              tmp_path / "last.pt")


def test_bn_recalibration_sets_exact_batch_statistics():
    model = build_from_spec(spec())
    insert_fnc(model, 1.0)
    x, _ = data(64)
    seen = recalibrate_batchnorm(model, iterate_batches(x, None, 16, "cpu"))
    assert seen == 64 and not model.training
    bn = model.net.bn1
    feats = []
    h = model.net.conv1.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(x.float() / 255)
    h.remove()
    f = feats[0]
    assert torch.allclose(bn.running_mean, f.mean(dim=(0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1  # restored


def test_finetune_classifier_changes_only_the_classifier():
    model = build_from_spec(spec())
    x, y = data(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune_classifier(model, iterate_batches(x, y, 16, "cpu"), lr=0.01)
    head = {f"net.fc.{k}" for k in dict(final_linear(model).named_parameters())}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == head  # BatchNorm statistics frozen, features frozen


def test_a_diverging_run_stops_with_the_param_to_change():
    """A learning rate far too large for a network without BatchNorm makes the loss
    non-finite; the epoch ends with an error naming train.lr instead of training on NaN."""
    import pytest

    cfg = train_cfg(epochs=1, lr=1e6, channels_last=False)
    trainer = Trainer(model_spec("traffic_cnn", 10, [0.5] * 3, [0.25] * 3, None), data(), data(32, seed=1), cfg,
                      seed=0)
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        trainer.run_epoch(0)


def test_batched_augmentation_matches_torchvision_image_for_image():
    """The on-device augmentation (GPU training) is torchvision's pad + crop + flip,
    with per-image offsets and flips drawn from the generator."""
    from torchvision.transforms.v2 import functional as TF

    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    out = batch_crop_flip(x, 4, True, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # the same draws, in the same order
    top, left = torch.randint(0, 9, (24,), generator=g), torch.randint(0, 9, (24,), generator=g)
    flip = torch.rand(24, generator=g) < 0.5
    assert 0 < int(flip.sum()) < 24
    for i in range(24):
        ref = TF.crop(TF.pad(x[i], [4]), int(top[i]), int(left[i]), 32, 32)
        assert torch.equal(out[i], TF.horizontal_flip(ref) if flip[i] else ref)
    assert torch.equal(batch_crop_flip(x, 0, False, torch.Generator()), x)  # nothing to do: identity


def test_on_device_data_path_trains_and_resumes_exactly(tmp_path):
    """The GPU data path (the uint8 set held on the device, batches augmented there),
    exercised on the CPU: it learns, and a resumed run repeats an uninterrupted one."""
    train, test = data(), data(32, seed=1)

    def trainer():
        t = Trainer(spec(), train, test, train_cfg(), seed=0)
        t.train_on_device = train  # what a GPU device gets
        return t

    check_resume_repeats_an_uninterrupted_run(trainer, tmp_path / "last.pt")


def test_bn_recalibration_after_insertion_sees_the_training_augmentation():
    """adjust_after_insertion recalibrates on the images the network was trained on: random
    crops of the zero-padded image (and flips where the dataset flips). A first BatchNorm fed
    the input itself shows it: on all-white images its recalibrated mean is that of padded
    crops, below 1 (exactly 1 on unaugmented images)."""
    import torch.nn as nn

    from pipeline.defenses.adjust import adjust_after_insertion
    from pipeline.train import CROP_PADDING

    class InputBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.bn(x).mean(dim=(2, 3)))

    white = torch.full((256, 3, 32, 32), 255, dtype=torch.uint8)
    model = InputBN()
    out = adjust_after_insertion(model, "bn_recalibration", white, torch.zeros(256, dtype=torch.long),
                                 batch_size=32, seed=0, adjust_batches=8)
    assert out["adjust_images"] == 256
    # expected share of a crop inside the image: E[(32 - |offset - 4|) / 32]^2 over offsets 0..8
    inside = sum((32 - abs(o - CROP_PADDING)) / 32 for o in range(2 * CROP_PADDING + 1)) / (2 * CROP_PADDING + 1)
    assert model.bn.running_mean == pytest.approx(torch.full((3,), inside ** 2), abs=0.01)
    assert (model.bn.running_mean < 0.99).all()
