"""Calibration of the LGS / DW patch detector: it reads the validation split and a patch
of its own, never the test split or the evaluation's patches, and the setting it keeps is
the strongest one within the allowed clean-accuracy cost."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.config import DataConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.defenses.calibration import calibrate_detector, detector_grid, select_setting
from pipeline.evaluation import fixed_placements
from pipeline.models import build_model
from tests.test_data import make_zip

ROOT = Path(__file__).resolve().parents[1]


def _spec() -> dict:
    torch.manual_seed(0)
    mean, std = [0.5] * 3, [0.25] * 3
    return model_spec("resnet20", 10, mean, std, build_model("resnet20", 10, mean, std).state_dict())


def test_the_script_reads_only_the_validation_split_and_its_own_patch(tmp_path, monkeypatch):
    src = make_zip(tmp_path / "src")
    prepare_dataset(DataConfig(root=str(src), val_per_class=1), tmp_path / "data/prepared/cifar10", seed=0)
    save_checkpoint(_spec(), tmp_path / "models/resnet20/baseline.pt")
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"].update(root=str(src), val_per_class=1, train_per_class=None, test_per_class=None)
    raw["patch"].update(epochs=1, batch_size=8, train_images=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    opened: list[str] = []
    real = torch.load

    def spy(f, *a, **kw):
        opened.append(Path(f).name)
        return real(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    spec = importlib.util.spec_from_file_location("calibrate", ROOT / "scripts" / "calibrate_patch_detector.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--defense", "dw", "--windows", "6:2", "--thresholds", "0.3,1.0", "--patch-epochs", "1"])
    assert "test.pt" not in opened and "val.pt" in opened
    assert not any(name.startswith("seed_") for name in opened)  # no evaluation patch
    table = pd.read_csv("calibration/dw.csv")
    assert list(table["threshold"]) == [0.3, 1.0] and (table["n_images"] == 9).all()  # target class left out
    # a threshold of 1 flags nothing: DW changes no pixel, so clean accuracy is the undefended model's
    never = table[table["threshold"] == 1.0].iloc[0]
    assert never["clean_flagged"] == 0 and never["patch_recall"] == 0 and never["clean_drop"] == 0


def test_calibration_measures_what_the_detector_flags():
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8) + 128  # flat images: no gradient anywhere
    y = torch.tensor([0, 1, 2, 3])
    patch = (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()  # dense noise
    placements = fixed_placements(4, 1, (32, 32), 8, seed=0)
    table = calibrate_detector(_spec(), "lgs", x, y, patch, placements, 5,
                               detector_grid([(8, 4)], [0.0, 0.2]), batch_size=2)
    assert (table["clean_flagged"] == 0).all()  # flat clean images have nothing to flag
    dense = table[table["threshold"] == 0.2].iloc[0]
    assert dense["patch_recall"] > 0.5 and dense["other_flagged"] < dense["patch_recall"]
    with pytest.raises(ValueError, match="detectors"):
        calibrate_detector(_spec(), "fnc", x, y, patch, placements, 5, [])


def test_the_kept_setting_is_the_strongest_within_the_clean_cost():
    table = pd.DataFrame([
        {"window": 8, "threshold": 0.1, "clean_drop": 0.20, "robust_accuracy": 0.70, "patch_recall": 1.0},  # costly
        {"window": 8, "threshold": 0.2, "clean_drop": 0.04, "robust_accuracy": 0.40, "patch_recall": 0.9},
        {"window": 6, "threshold": 0.3, "clean_drop": 0.01, "robust_accuracy": 0.40, "patch_recall": 0.5},  # cheaper
        {"window": 6, "threshold": 0.5, "clean_drop": 0.00, "robust_accuracy": 0.20, "patch_recall": 0.0},
    ])
    best = select_setting(table, 0.05)
    assert (best["window"], best["threshold"]) == (6, 0.3)
    assert select_setting(table, 0.3)["threshold"] == 0.1
    assert select_setting(table[table["clean_drop"] > 0.1], 0.05) is None
    # only settings that find the patch: the cheaper one flags half of it and is left out
    assert select_setting(table, 0.05, min_patch_recall=0.8)["threshold"] == 0.2
    assert select_setting(table, 0.01, min_patch_recall=0.8) is None
