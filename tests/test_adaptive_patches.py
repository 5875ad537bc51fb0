"""The adaptive (white-box) patch search of the evaluate stage: warm start from the
transferred patch plus random starts, the start chosen on the validation split (never
the test split), and the worst-case cell over transferred and adaptive patches.

The stage runs in-process on a tiny fake dataset (the Ray fan-out replaced by a serial
map); the e2e test of the defenses profile runs it through DVC and Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.attacks.patch import PatchTrainingConfig, train_universal_patch
from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.config import DataConfig, load_params
from pipeline.data.prepare import prepare_dataset
from pipeline.evaluation import cell_metrics, worst_case_metrics
from pipeline.io import load_torch, save_png, save_torch
from pipeline.models import build_model
from tests.helpers import serial_map
from tests.test_data import make_zip

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture()
def project(tmp_path, monkeypatch):
    src = make_zip(tmp_path / "src")
    meta = prepare_dataset(DataConfig(root=str(src), val_per_class=1), tmp_path / "data/prepared/cifar10", seed=0)
    torch.manual_seed(0)
    sd = build_model("resnet20", 10, meta["mean"], meta["std"]).state_dict()
    save_checkpoint(model_spec("resnet20", 10, meta["mean"], meta["std"], sd), tmp_path / "models/resnet20/baseline.pt")
    save_checkpoint(model_spec("resnet20", 10, meta["mean"], meta["std"], sd, [{"name": "fnc", "alpha": 0.5}]),
                    tmp_path / "models/resnet20/fnc.pt")
    patch = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(1))
    save_torch(patch, tmp_path / "patches/resnet20/advp/seed_0.pt")
    save_png(patch, tmp_path / "patches/resnet20/advp/seed_0.png")
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"].update(root=str(src), val_per_class=1, train_per_class=None, test_per_class=None)
    raw["patch"].update(seeds=[0], attacks=["advp"], epochs=1, decay_epochs=[], train_images=None, batch_size=8,
                        adaptive_restarts=1)
    raw["evaluate"].update(defenses=["none", "fnc"], attacks=["none", "advp", "advp_adaptive", "advp_bpda"],
                           num_shards=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for code in ("pipeline", "stages"):  # the stage keys its caches by the hash of its code files
        (tmp_path / code).symlink_to(ROOT / code)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import stages.evaluate as stage
    from pipeline import cached, matrix

    for module in (matrix, cached):  # the matrix's own fan-outs and those of cached_map
        monkeypatch.setattr(module, "init_ray", lambda: None)
        monkeypatch.setattr(module, "ray_map", serial_map)
    return {"dir": tmp_path, "stage": stage, "matrix": matrix}


def test_adaptive_search_selects_on_validation_and_the_worst_case_bounds_transfer(project, monkeypatch):
    opened: list[str] = []
    real = torch.load

    def spy(f, *a, **kw):  # every prepared split is read through torch.load
        opened.append(Path(f).name)
        return real(f, *a, **kw)

    matrix = project["matrix"]
    params = load_params("params.yaml")
    transferred = load_torch("patches/resnet20/advp/seed_0.pt")[None]
    monkeypatch.setattr(torch, "load", spy)
    specs = {d: matrix.load_checkpoint(Path("models/resnet20") / f"{f}.pt")
             for d, f in (("none", "baseline"), ("fnc", "fnc"))}
    made, selection = matrix.adaptive_patches(params, specs, {"none": "w0", "fnc": "w1"}, ["advp_adaptive",
                                              "advp_bpda"], 10, {"advp": transferred}, {"advp": ["p0"]})
    assert "test.pt" not in opened, "the adaptive search read the test split"
    assert {"train.pt", "val.pt"} <= set(opened)
    # the baseline's adaptive patches are its own transferred ones
    assert torch.equal(made[("none", "advp_adaptive")][0], transferred)
    for cell in ("advp_adaptive", "advp_bpda"):
        info = selection[("fnc", cell)]
        assert info["selected_start"] in ("transferred", "warm", "random_1")
        assert info["val_images"] == 9  # one validation image a class, the target class left out
        # the transferred patch is a candidate: the kept one is at least as strong on validation
        assert info["val_robust_accuracy"] <= info["val_robust_accuracy_transferred"]
    # three candidates trained or reused: warm and random_1 for _adaptive, and for _bpda through FNC
    cached = list(Path(".cache/evaluate_patches").glob("*/result.pt"))
    assert len(cached) == 4


def test_the_evaluate_stage_writes_worst_case_cells_no_weaker_than_any_variant(project):
    project["stage"].main(load_params("params.yaml"))
    table = json.loads(Path("metrics/evaluate.json").read_text())["resnet20"]
    for d in ("none", "fnc"):
        worst = table[d]["advp_worst"]
        for variant in ("advp", "advp_adaptive", "advp_bpda"):
            assert worst["robust_accuracy"] <= table[d][variant]["robust_accuracy"]
            assert worst["attack_success_rate"] >= table[d][variant]["attack_success_rate"]
        assert worst["worst_attack"] in ("advp", "advp_adaptive", "advp_bpda")
        assert worst["n_images"] == table[d]["advp"]["n_images"]
    assert table["fnc"]["advp_adaptive"]["selected_start"] in ("transferred", "warm", "random_1")
    assert "selected_start" not in table["none"]["advp_adaptive"]


def test_worst_case_is_the_per_seed_minimum_over_cells():
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    clean = labels.clone()
    # seed 0: cell a breaks 2 images, cell b breaks 4; seed 1: a breaks 3, b breaks 1
    a = torch.stack([torch.tensor([[5, 5, 2, 3, 0, 1]]), torch.tensor([[5, 5, 5, 3, 0, 1]])])
    b = torch.stack([torch.tensor([[5, 5, 5, 5, 0, 1]]), torch.tensor([[5, 1, 2, 3, 0, 1]])])
    out = worst_case_metrics(clean, {"a": a, "b": b}, labels, target=5)
    per = {k: cell_metrics(clean, v, labels, 5) for k, v in (("a", a), ("b", b))}
    assert out["worst_attack"] == "b,a"
    assert out["robust_accuracy"] == pytest.approx(((6 - 4) / 6 + (6 - 3) / 6) / 2)
    assert out["robust_accuracy"] < min(p["robust_accuracy"] for p in per.values())
    assert out["attack_success_rate"] == pytest.approx((4 / 6 + 3 / 6) / 2)
    assert out["n_images"] == 6 and out["n_seeds"] == 2
    with pytest.raises(ValueError, match="equal shape"):
        worst_case_metrics(clean, {"a": a, "b": b[:1]}, labels, 5)


def test_a_warm_start_is_where_the_patch_search_begins():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    cfg = PatchTrainingConfig(side=4, target=3, epochs=1, step_size=1e-6, decay_epochs=(), batch_size=8)
    init = torch.full((3, 4, 4), 0.7)
    warm, _ = train_universal_patch(model, x, y, cfg, seed=0, init=init)
    cold, _ = train_universal_patch(model, x, y, cfg, seed=0)
    assert torch.allclose(warm, init, atol=1e-5) and cold.max() < 1e-5  # one tiny step from each start
    with pytest.raises(ValueError, match="init patch"):
        train_universal_patch(model, x, y, cfg, seed=0, init=torch.full((3, 5, 5), 0.5))
