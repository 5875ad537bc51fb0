"""The analyze stage: every analysis writes its tables and figures for every model of
``analysis.defenses`` (in-process, the Ray fan-out replaced by a serial map; the e2e test
runs it through DVC and Ray)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.checkpoint import apply_defenses, model_spec, save_checkpoint
from pipeline.config import DataConfig, load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.io import save_torch
from pipeline.models import build_model
from tests.test_data import make_zip

ROOT = Path(__file__).resolve().parents[1]
RP2_DIR = ROOT.parent / "shared" / "datasets" / "rp2-stop-signs"


@pytest.fixture()
def project(tmp_path, monkeypatch):
    src = make_zip(tmp_path / "src")
    meta = prepare_dataset(DataConfig(root=str(src)), tmp_path / "data/prepared/cifar10", seed=0)
    torch.manual_seed(0)
    sd = build_model("resnet20", 10, meta["mean"], meta["std"]).state_dict()
    save_checkpoint(model_spec("resnet20", 10, meta["mean"], meta["std"], sd), tmp_path / "models/resnet20/baseline.pt")
    save_checkpoint(model_spec("resnet20", 10, meta["mean"], meta["std"], sd, [{"name": "fnc", "alpha": 0.5}]),
                    tmp_path / "models/resnet20/fnc.pt")
    save_torch(torch.rand(3, 10, 10), tmp_path / "patches/resnet20/advp/seed_0.pt")
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["root"] = str(src)
    raw["patch"]["seeds"] = [0]
    raw["analysis"].update(images=12, fit_images=8, landscape_images=4, restarts=3, landscape_steps=3, steps=2,
                           gradcam_images=4, ks=[0.1, 1.0], distances=[0, 4, 8])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import stages.analyze as stage

    monkeypatch.setattr(stage, "init_ray", lambda: None)
    monkeypatch.setattr(stage, "ray_map", lambda fn, items, **_: [fn(i) for i in items])
    return {"dir": tmp_path, "stage": stage, "raw": raw, "meta": meta}


def test_feature_norms_ifnr_per_block_and_defense(project):
    project["stage"].main(load_params("params.yaml"), "feature_norms")
    out = Path("analysis/resnet20/feature_norms")
    df = pd.read_csv(out / "ifnr.csv")
    assert set(df["defense"]) == {"none", "fnc"}
    assert (df.groupby("defense")["depth"].max() == 9).all()  # ResNet-20: 9 residual blocks
    assert (df["ifnr_mean"] >= 0).all() and (df["n_images"] == 12).all()
    assert {f.name for f in out.iterdir()} == {"ifnr.csv", "ifnr.png", "norm_maps_none.png", "norm_maps_fnc.png"}


def test_pixel_robustness_landscape_and_gradcam(project):
    stage = project["stage"]
    params = load_params("params.yaml")
    for name in ("pixel_robustness", "loss_landscape", "gradcam_distance"):
        stage.main(params, name)
    curve = pd.read_csv("analysis/resnet20/pixel_robustness/accuracy_vs_k.csv")
    assert len(curve) == 2 * 2 * 2  # defenses x (top, bottom) x ks
    assert curve["accuracy"].between(0, 1).all()
    n = curve["n_images"].iloc[0]  # each accuracy carries its Wilson interval over the images
    assert (curve["n_images"] == n).all() and n > 0
    assert ((curve["ci_low"] <= curve["accuracy"]) & (curve["accuracy"] <= curve["ci_high"])
            & (curve["ci_high"] - curve["ci_low"] > 1 / n)).all()
    assert set(curve["series"]) == {f"{d}, {w} k" for d in ("none", "fnc") for w in ("top", "bottom")}  # dvc plots' lines
    hist = pd.read_csv("analysis/resnet20/loss_landscape/loss_history.csv")
    assert hist.groupby("defense")["restart"].nunique().eq(3).all()
    assert (hist["series"] == hist["defense"]).all() and (hist["line"] == hist["restart"]).all()
    assert hist.groupby("defense")["iteration"].nunique().eq(4).all()  # start + 3 steps
    conf = pd.read_csv("analysis/resnet20/gradcam_distance/confidence_vs_distance.csv")
    assert list(conf[conf.defense == "none"]["distance"]) == [0, 4, 8] and conf["confidence"].between(0, 1).all()
    for f in ("pixel_robustness/pixel_robustness.png", "loss_landscape/loss_landscape.png",
              "gradcam_distance/confidence_vs_distance.png"):
        assert Path("analysis/resnet20", f).stat().st_size > 1000


def test_spectrum_is_a_note_without_rp2(project):
    project["stage"].main(load_params("params.yaml"), "spectrum")
    assert "rp2.enabled is false" in Path("analysis/resnet20/spectrum/README.md").read_text()


def test_feature_norms_is_a_note_for_a_model_without_blocks(project):
    """The traffic-sign CNN (params/blurnet.yaml, params/gtsrb.yaml) has no residual block: a note, not a crash."""
    meta, raw = project["meta"], project["raw"]
    raw["model"]["name"] = "traffic_cnn"
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    sd = build_model("traffic_cnn", 10, meta["mean"], meta["std"]).state_dict()
    for d in ("baseline", "fnc"):
        save_checkpoint(model_spec("traffic_cnn", 10, meta["mean"], meta["std"], sd), f"models/traffic_cnn/{d}.pt")
    save_torch(torch.rand(3, 10, 10), "patches/traffic_cnn/advp/seed_0.pt")
    project["stage"].main(load_params("params.yaml"), "feature_norms")
    out = Path("analysis/traffic_cnn/feature_norms")
    assert [f.name for f in out.iterdir()] == ["README.md"]
    assert "traffic_cnn has none" in (out / "README.md").read_text()


@pytest.mark.skipif(not (RP2_DIR / "victim-32").is_dir(), reason="RP2 victims not found")
def test_spectrum_of_the_victims(project):
    raw = project["raw"]
    raw["rp2"] = {"enabled": True, "victims": str(RP2_DIR), "true_class": 3, "targets": [5], "seeds": [0],
                  "defenses": ["none"]}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:16, 8:24] = 1
    save_torch(torch.rand(3, 32, 32) * mask, "rp2/resnet20/none/target_5_seed_0.pt")
    project["stage"].main(load_params("params.yaml"), "spectrum")
    df = pd.read_csv("analysis/resnet20/spectrum/high_frequency.csv")
    assert len(df) == 2 * 2 * 2  # defenses x (input, layer 1) x (natural, perturbed)
    assert df["high_frequency_fraction"].between(0, 1).all()
    assert Path("analysis/resnet20/spectrum/spectrum_none.png").is_file()


def test_pixel_robustness_writes_prm_iou_for_prm_models(project):
    """A PRM model with lambda 1 sees only its designated pixels: the analysis' IoU with the
    set it was trained with is 1, beside the random-set reference 0.143; the baseline has
    no PRM layer and no row."""
    raw, tmp = project["raw"], project["dir"]
    meta = project["meta"]
    prm = [{"name": "prm", "fraction": 0.25, "lam": 1.0}]
    model = apply_defenses(build_model("resnet20", 10, meta["mean"], meta["std"]), prm)
    save_checkpoint(model_spec("resnet20", 10, meta["mean"], meta["std"], model.state_dict(), prm),
                    tmp / "models/resnet20/prm.pt")
    raw["defended"] = ["fnc", "prm"]
    raw["prm"] = {"defenses": prm, "train": {"epochs": 1}}
    raw["analysis"]["defenses"] = ["none", "prm"]
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    project["stage"].main(load_params("params.yaml"), "pixel_robustness")
    iou = pd.read_csv("analysis/resnet20/pixel_robustness/prm_iou.csv")
    assert list(iou["defense"]) == ["prm"]
    assert iou["prm_iou"].iloc[0] == pytest.approx(1.0) and iou["random_set_iou"].iloc[0] == pytest.approx(1 / 7)


def test_masking_checks_per_defense_with_mlflow_tags(project):
    """analyze@masking: checks.csv has a row per (defense, check), (a) is n/a for the baseline
    (the stage loads it as the transfer source of the others), the eps sweep has a row per
    (defense, eps), and the MLflow run carries the verdict of each model as a tag."""
    import re

    import mlflow

    from pipeline.analysis.masking import suspected

    raw = project["raw"]
    raw["analysis"]["masking"] = {"images": 12, "eps_list": [0, "8/255", "64/255"], "pgd_steps": 2, "strong_steps": 2,
                                  "strong_restarts": 1, "square_queries": 5, "noise_draws": 2}
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    project["stage"].main(load_params("params.yaml"), "masking")
    out = Path("analysis/resnet20/masking")
    assert {f.name for f in out.iterdir()} == {"checks.csv", "eps_sweep.csv", "eps_sweep.png"}
    checks = pd.read_csv(out / "checks.csv", keep_default_na=False)
    assert list(zip(checks["defense"], checks["check"], strict=True)) == [(d, c) for d in ("none", "fnc")
                                                                        for c in "abcde"]
    passed = checks.set_index(["defense", "check"])["passed"]
    assert passed[("none", "a")] == "NA" and passed.drop(("none", "a")).isin(["True", "False"]).all()
    assert (checks["n_images"] == 12).all()
    sweep = pd.read_csv(out / "eps_sweep.csv")
    assert len(sweep) == 2 * 3 and list(sweep["eps_255"].round(6)[:3]) == [0, 8, 64]
    run = mlflow.search_runs(experiment_names=[raw["mlflow"]["experiment"]], output_format="list",
                             filter_string="tags.stage = 'analyze@masking'")[0]
    for d in ("none", "fnc"):
        tag = run.data.tags[f"masking.{d}"]
        assert re.fullmatch(r"not suspected|suspected: [a-e](, [a-e])*", tag)
        assert tag == suspected(checks[checks["defense"] == d].to_dict("records"))
    assert "fnc.checks_failed" in run.data.metrics
