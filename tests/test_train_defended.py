"""train_defended for any defended model of ``defended``: insertion without training
(in-process, the Ray fan-out replaced by a serial map) and a trained defense (BlurNet
with a learned kernel under FGSM-RS adversarial training; the stage as a subprocess,
through Ray), its checkpoint, metrics, curve and resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint import build_from_spec, load_checkpoint, model_spec, save_checkpoint
from pipeline.config import DataConfig, ParamsError, load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.defenses.blurnet import BlurNetLayer
from pipeline.models import build_model
from tests.test_data import make_zip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A temporary project: 40 + 20 prepared random images and a random baseline."""
    src = make_zip(tmp_path / "src")
    meta = prepare_dataset(DataConfig(root=str(src)), tmp_path / "data/prepared/cifar10", seed=0)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, meta["mean"], meta["std"])
    save_checkpoint(model_spec("resnet20", 10, meta["mean"], meta["std"], model.state_dict()),
                    tmp_path / "models/resnet20/baseline.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return {"dir": tmp_path, "src": src}


def _params(tmp: Path, src: Path, **sections) -> Path:
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["root"] = str(src)
    raw["defended"] = ["fnc", *sections]
    raw.update(sections)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_insert_only_defense_keeps_the_baseline_weights(project, monkeypatch):
    import stages.train_defended as stage
    from pipeline import defended

    monkeypatch.setattr(defended, "init_ray", lambda: None)
    monkeypatch.setattr(defended, "ray_map", lambda fn, items, **_: [fn(i) for i in items])
    params = load_params(_params(project["dir"], project["src"],
                                 blur_input={"insert_after": [{"name": "input_blur", "size": 3}]}))
    stage.main(params, "blur_input")
    base = load_checkpoint("models/resnet20/baseline.pt")
    out = load_checkpoint("models/resnet20/blur_input.pt")
    assert out["defenses"] == [{"name": "input_blur", "kernel": "gaussian", "size": 3, "sigma": None}]
    assert out["state_dict"].keys() == base["state_dict"].keys()
    assert all(torch.equal(out["state_dict"][k], v) for k, v in base["state_dict"].items())
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():  # the input is blurred before the same network: outputs differ
        assert not torch.allclose(build_from_spec(out)(x), build_from_spec(base)(x))
    m = json.loads(Path("metrics/train_defended/blur_input.json").read_text())
    assert m["adjustment"] == "none" and m["clean_accuracy"] == m["clean_accuracy_unadjusted"]
    assert m["n_images"] == 20 and 0 <= m["baseline_clean_accuracy"] <= 1
    assert Path("plots/train_defended/blur_input.csv").read_text().startswith("epoch,")


def test_defense_that_does_not_fit_fails_before_work(project):
    import stages.train_defended as stage

    # a 15x15 input blur is fine, but PRM twice is not: the second finds PRM inserted
    params = load_params(_params(project["dir"], project["src"],
                                 twice={"defenses": ["prm", "prm"], "train": {"epochs": 1}}))
    with pytest.raises(ParamsError, match="twice: PRM is already inserted"):
        stage.main(params, "twice")
    assert not Path("models/resnet20/twice.pt").exists()


def test_params_checks_of_defended_models(project):
    tmp, src = project["dir"], project["src"]
    with pytest.raises(ParamsError, match="init: scratch needs training"):
        load_params(_params(tmp, src, m={"init": "scratch", "defenses": ["fnc"]}))
    with pytest.raises(ParamsError, match="trainable parts"):
        load_params(_params(tmp, src, m={"defenses": [{"name": "blurnet", "kernel": "learned"}]}))
    with pytest.raises(ParamsError, match="m: train.epochz"):
        load_params(_params(tmp, src, m={"defenses": ["prm"], "train": {"epochz": 1}}))
    with pytest.raises(ParamsError, match="needs defenses, insert_after or train.adversarial"):
        load_params(_params(tmp, src, m={"train": {}}))
    raw = yaml.safe_load(_params(tmp, src).read_text())
    raw["evaluate"]["defenses"] = ["none", "m"]
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="evaluate.defenses: unknown defense 'm'"):
        load_params(tmp / "params.yaml")
    raw["defended"] = ["fnc", "m"]
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="no section 'm'"):
        load_params(tmp / "params.yaml")


def test_trained_defense_through_ray_and_resume(project):
    tmp = project["dir"]
    section = {"defenses": [{"name": "blurnet", "kernel": "learned", "size": 3, "linf_weight": 0.01}],
               "train": {"epochs": 2, "batch_size": 10,
                         "adversarial": {"method": "fgsm_rs", "eps": "8/255", "eval_images": 8, "eval_steps": 2}}}
    _params(tmp, project["src"], blur_learned=section)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stages.train_defended", "--defense", "blur_learned"], cwd=tmp,
                              env=env, capture_output=True, text=True, timeout=600)

    try:
        proc, again = run(), run()  # the second run finds both epochs in the resume checkpoint
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = load_checkpoint(tmp / "models/resnet20/baseline.pt")
    out = load_checkpoint(tmp / "models/resnet20/blur_learned.pt")
    assert out["defenses"][0]["name"] == "blurnet" and out["defenses"][0]["kernel"] == "learned"
    model = build_from_spec(out)  # rebuilds with the learned kernel, strictly
    (layer,) = [m for m in model.modules() if isinstance(m, BlurNetLayer)]
    assert not torch.allclose(layer.weight, torch.full_like(layer.weight, 1 / 9))  # the kernel was trained
    shared = [k for k in base["state_dict"] if k in out["state_dict"]]
    assert any(not torch.equal(base["state_dict"][k], out["state_dict"][k]) for k in shared)
    m = json.loads((tmp / "metrics/train_defended/blur_learned.json").read_text())
    assert m["epochs"] == 2 and m["train_penalty"] > 0 and 0 <= m["test_robust_accuracy"] <= 1
    curve = (tmp / "plots/train_defended/blur_learned.csv").read_text().splitlines()
    assert len(curve) == 3 and "train_penalty" in curve[0] and "test_robust_accuracy" in curve[0]

    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from epoch 2" in again.stderr
    assert torch.equal(load_checkpoint(tmp / "models/resnet20/blur_learned.pt")["state_dict"][
        next(iter(out["state_dict"]))], next(iter(out["state_dict"].values())))
