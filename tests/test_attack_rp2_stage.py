"""The attack_rp2 stage: stickers per (defense, target, seed), white and black box, its
files and metrics, its cache, and its params checks. Runs the stage's ``main`` in a
temporary project with small random models (the Ray fan-out is replaced by a serial
map here; the e2e test covers Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.config import ParamsError, load_params
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RP2_DIR = ROOT.parent / "shared" / "datasets" / "rp2-stop-signs"
pytestmark = pytest.mark.skipif(not (RP2_DIR / "victim-32").is_dir(), reason="RP2 victims not found")

N_CLASSES = 43


def _params(tmp: Path, **rp2) -> Path:
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["dataset"] = "gtsrb"
    raw["patch"]["target"] = 5
    raw["rp2"] = {"enabled": True, "victims": str(RP2_DIR), "targets": [5, 1], "seeds": [0],
                  "defenses": ["none", "fnc"], "eval_transforms": 4,
                  "attack": {"steps": 15, "eot_samples": 2, "lr": 0.1}, **rp2}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    meta = {"dataset": "gtsrb", "image_shape": [3, 32, 32], "classes": [f"class {i}" for i in range(N_CLASSES)]}
    (tmp_path / "data/prepared/gtsrb").mkdir(parents=True)
    (tmp_path / "data/prepared/gtsrb/meta.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    model = build_model("resnet20", N_CLASSES, [0.5] * 3, [0.25] * 3)
    sd = model.state_dict()
    save_checkpoint(model_spec("resnet20", N_CLASSES, [0.5] * 3, [0.25] * 3, sd), "models/resnet20/baseline.pt")
    save_checkpoint(model_spec("resnet20", N_CLASSES, [0.5] * 3, [0.25] * 3, sd, [{"name": "fnc", "alpha": 0.5}]),
                    "models/resnet20/fnc.pt")

    import stages.attack_rp2 as stage

    calls = []

    def serial_map(fn, items, **_):
        calls.append(len(items))
        return [fn(item) for item in items]

    monkeypatch.setattr(stage, "init_ray", lambda: None)
    monkeypatch.setattr(stage, "ray_map", serial_map)
    return {"dir": tmp_path, "stage": stage, "calls": calls}


def test_stage_writes_white_and_black_box_metrics(project):
    stage, tmp = project["stage"], project["dir"]
    params = load_params(_params(tmp))
    stage.main(params)
    assert project["calls"] == [4]  # 2 defenses x 2 targets x 1 seed
    m = json.loads((tmp / "metrics/rp2.json").read_text())
    assert m["enabled"] and m["n_victims"] == 40 and m["true_class"] == 14
    summary = m["summary"]
    assert set(summary) == {"none", "fnc"}
    assert set(summary["none"]) == {"white_box"}  # the undefended model has no transfer row
    assert set(summary["fnc"]) == {"white_box", "black_box"}
    rows = m["stickers"]
    assert len(rows) == 4 + 2  # 4 white-box stickers, 2 of them (made on none) transferred to fnc
    for row in rows:
        for key in ("clean_accuracy", "fooling_rate", "target_success", "target_success_transformed"):
            assert 0.0 <= row[key] <= 1.0
        assert row["l2_dissimilarity"] > 0
    # the same victims, the same model: clean accuracy does not depend on the sticker
    fnc_rows = [r for r in rows if r["defense"] == "fnc"]
    assert len({r["clean_accuracy"] for r in fnc_rows}) == 1
    # worst over targets >= mean over targets
    for by in summary.values():
        for s in by.values():
            assert s["fooling_rate_worst"] >= s["fooling_rate_mean"] - 1e-12
            assert s["worst_target"] in (5, 1)
    # the stickers are confined to the mask
    from pipeline.data.rp2 import load_mask

    mask = load_mask(RP2_DIR / "masks/rectangles-32.png")
    delta = torch.load(tmp / "rp2/resnet20/none/target_5_seed_0.pt")
    assert delta.shape == (3, 32, 32) and bool((delta * (1 - mask)).eq(0).all()) and delta.abs().sum() > 0
    assert (tmp / "rp2/resnet20/stickers.png").stat().st_size > 0
    assert (tmp / "rp2/resnet20/fnc/target_1_seed_0.png").is_file()
    md = (tmp / "metrics/rp2.md").read_text()
    assert "black_box" in md and "white_box" in md and "fooling_rate_worst" in md


def test_black_box_row_is_the_none_sticker_on_the_defended_model(project):
    """Transfer rows evaluate the sticker made on ``none``: with FNC's alpha so large that it
    never clips, the defended model is the baseline, so its black-box row equals none's white box."""
    stage, tmp = project["stage"], project["dir"]
    spec = torch.load(tmp / "models/resnet20/fnc.pt", weights_only=False)
    spec["defenses"] = [{"name": "fnc", "alpha": 1e6}]
    save_checkpoint(spec, tmp / "models/resnet20/fnc.pt")
    stage.main(load_params(_params(tmp, targets=[5])))
    rows = json.loads((tmp / "metrics/rp2.json").read_text())["stickers"]
    white_none = next(r for r in rows if r["defense"] == "none")
    black_fnc = next(r for r in rows if r["defense"] == "fnc" and r["setting"] == "black_box")
    for key in ("clean_accuracy", "fooling_rate", "target_success", "l2_dissimilarity"):
        assert black_fnc[key] == pytest.approx(white_none[key])


def test_second_run_reuses_the_cached_stickers(project):
    stage, tmp = project["stage"], project["dir"]
    path = _params(tmp, targets=[5])
    stage.main(load_params(path))
    first = json.loads((tmp / "metrics/rp2.json").read_text())
    stage.main(load_params(path))
    assert project["calls"] == [2]  # the second run trained nothing
    assert json.loads((tmp / "metrics/rp2.json").read_text())["summary"] == first["summary"]


def test_disabled_stage_writes_a_note_only(project):
    stage, tmp = project["stage"], project["dir"]
    stage.main(load_params(_params(tmp, enabled=False)))
    assert json.loads((tmp / "metrics/rp2.json").read_text()) == {"enabled": False}
    assert "rp2.enabled: false" in (tmp / "rp2/resnet20/README.md").read_text()
    assert project["calls"] == []


@pytest.mark.parametrize(
    ("rp2", "message"),
    [
        ({"targets": [14]}, "include rp2.true_class"),
        ({"attack": {"target": 3}}, "rp2.targets instead"),
        ({"attack": {"p": 3}}, "rp2.attack.p"),
        ({"defenses": ["fnc"]}, "must include 'none'"),
        ({"defenses": ["none", "blur"]}, "unknown defense 'blur'"),
        ({"targets": [50]}, "classes of gtsrb"),
    ],
)
def test_bad_rp2_params_fail_with_the_key(tmp_path, rp2, message):
    with pytest.raises(ParamsError, match=message):
        load_params(_params(tmp_path, **rp2))


def test_missing_model_file_fails_before_any_attack(project):
    stage, tmp = project["stage"], project["dir"]
    (tmp / "models/resnet20/fnc.pt").unlink()
    with pytest.raises(FileNotFoundError, match="fnc.pt"):
        stage.main(load_params(_params(tmp)))
    assert project["calls"] == []


def test_node_id_outside_ray_does_not_start_ray():
    """Tasks run serially (as here) call node_id(); it must not start a local Ray instance."""
    import ray

    from pipeline.distributed import node_id

    if ray.is_initialized():
        pytest.skip("Ray already connected in this process")
    assert node_id() == "local"
    assert not ray.is_initialized()
