"""RP2's lambda for a target distortion: chosen from a sweep on validation stop signs
(scripts/rp2_distortion_curve.py), never on the evaluation's victims or the test split."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.attacks.rp2 import lambda_for_dissimilarity
from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.config import DataConfig
from pipeline.data.prepare import prepare_dataset
from pipeline.models import build_model
from tests.test_data import make_zip

ROOT = Path(__file__).resolve().parents[1]
RP2_DIR = ROOT.parent / "shared" / "datasets" / "rp2-stop-signs"


def test_lambda_is_interpolated_in_log_lambda_between_the_bracketing_grid_points():
    # dissimilarity falling by 0.05 per decade of lambda: 0.25 lies halfway (in log) between 1 and 100
    lams = [100.0, 0.01, 1.0]  # any order
    d = [0.3 - 0.05 * math.log10(v) for v in lams]
    assert lambda_for_dissimilarity(lams, d, 0.25) == pytest.approx(10.0)
    assert lambda_for_dissimilarity(lams, d, 0.4) == pytest.approx(0.01)  # a grid point exactly
    assert lambda_for_dissimilarity(lams, d, 0.9) == 0.01  # beyond the grid: the nearest point
    assert lambda_for_dissimilarity(lams, d, 0.0) == 100.0
    with pytest.raises(ValueError, match="lambda > 0"):
        lambda_for_dissimilarity([0.0, 1.0], [0.3, 0.2], 0.25)
    with pytest.raises(ValueError, match="equal non-empty"):
        lambda_for_dissimilarity([1.0], [0.3, 0.2], 0.25)


@pytest.mark.skipif(not (RP2_DIR / "victim-32").is_dir(), reason="RP2 victims not found")
def test_the_sweep_reads_validation_images_and_a_larger_lambda_gives_a_smaller_sticker(tmp_path, monkeypatch,
                                                                                      ray_local):
    src = make_zip(tmp_path / "src")
    prepare_dataset(DataConfig(root=str(src), val_per_class=2), tmp_path / "data/prepared/cifar10", seed=0)
    torch.manual_seed(0)
    mean, std = [0.5] * 3, [0.25] * 3
    model = build_model("traffic_cnn", 10, mean, std)
    save_checkpoint(model_spec("traffic_cnn", 10, mean, std, model.state_dict()),
                    tmp_path / "models/traffic_cnn/baseline.pt")
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"].update(root=str(src), val_per_class=2, train_per_class=None, test_per_class=None)
    raw["model"]["name"] = "traffic_cnn"
    raw["rp2"] = {"enabled": True, "victims": str(RP2_DIR), "true_class": 3, "targets": [5], "seeds": [0],
                  "defenses": ["none"], "eval_transforms": 0,
                  "attack": {"steps": 30, "eot_samples": 1, "lr": 0.1, "lambda": 0.001}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    opened: list[str] = []
    real = torch.load

    def spy(f, *a, **kw):
        opened.append(Path(f).name if isinstance(f, str | Path) else "")  # Ray passes buffers too
        return real(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    spec = importlib.util.spec_from_file_location("rp2_curve", ROOT / "scripts" / "rp2_distortion_curve.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--lambdas", "0.001,30", "--target-l2", "0.05"])
    assert "test.pt" not in opened and "val.pt" in opened
    table = pd.read_csv("calibration/rp2_distortion.csv")
    assert sorted(set(table["images"])) == ["validation", "victims"]
    assert set(table[table["images"] == "validation"]["n_images"]) == {2}  # val_per_class images of class 3
    assert set(table[table["images"] == "victims"]["n_images"]) == {40}
    for _, g in table.groupby("images"):  # the penalty shrinks the sticker on both image sets
        by_lam = g.set_index("lam")["l2_dissimilarity"]
        assert by_lam[30.0] < by_lam[0.001]
    assert Path("calibration/rp2_distortion.png").stat().st_size > 1000
    # an extended sweep trains only the new lambda's stickers and keeps the earlier rows as they were
    trained: list[int] = []
    real_map = script.ray_map
    monkeypatch.setattr(script, "ray_map", lambda fn, items, **kw: trained.append(len(items)) or real_map(fn, items, **kw))
    script.main(["--lambdas", "0.001,3,30", "--target-l2", "0.05"])
    assert trained == [2]  # lambda 3 on both image sets
    extended = pd.read_csv("calibration/rp2_distortion.csv")
    assert len(extended) == 6
    key = ["images", "lam", "target", "seed"]
    pd.testing.assert_frame_equal(extended[extended["lam"] != 3].sort_values(key).reset_index(drop=True),
                                  table.sort_values(key).reset_index(drop=True))
