"""FNC's trade-off curve (stage ``fnc_tradeoff``): what a cell computes, that it is the code path
of train_defended + evaluate, that the stage computes only missing cells and resumes, its
params' validation, its note when off, and the report's section. In-process on a small
synthetic project (Ray's fan-out replaced by a serial map), except one test through Ray."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline import cached, papers
from pipeline import validate as validate_mod
from pipeline.analysis import fnc_tradeoff as ft
from pipeline.checkpoint import load_checkpoint, model_spec, save_checkpoint
from pipeline.config import DataConfig, ParamsError, load_params
from pipeline.data import load_tensors
from pipeline.data.prepare import prepare_dataset
from pipeline.defenses.adjust import final_linear, recalibrate_batchnorm
from pipeline.evaluation import cell_metrics, fixed_placements, predict_shard
from pipeline.evaluation import test_order as evaluate_order
from pipeline.io import save_torch
from pipeline.models import build_model
from pipeline.tasks import defend_task, fnc_tradeoff_task
from tests.helpers import serial_map
from tests.test_data import CLASSES, png

ROOT = Path(__file__).resolve().parents[1]
HUGE = 1e6
"""An alpha no feature vector reaches: a norm is at most H x W (<= 1024 here) times its map's mean."""
SMALL = 1.0
"""An alpha that clips (the authors' value)."""


def structured_zip(root: Path) -> Path:
    """A CIFAR-10-like archive (``train.zip``: 10 images a class, ``test.zip``: 4) of smooth random
    colour fields at random contrast with a little noise: unlike pure noise images, their
    features differ enough from image to image that a random network tells them apart."""
    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", 10), ("test", 4)):
        n = 10 * per_class
        x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=32, mode="bilinear")
        x = (x * torch.rand(n, 1, 1, 1, generator=gen) + 0.1 * torch.rand(n, 3, 32, 32, generator=gen)).clamp(0, 1)
        images = (x * 255).round().to(torch.uint8).numpy()
        with zipfile.ZipFile(root / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf:
            for i, img in enumerate(images):
                zf.writestr(f"{split}/{CLASSES[i % 10]}/{i:04d}.png", png(img))
    return root


def calibrated_baseline(meta: dict, x_train: torch.Tensor) -> dict:
    """A ResNet-20 whose predictions differ from image to image: random weights, BatchNorm
    statistics of the training images, and the classifier's logits centred over them and
    scaled to unit spread (a random network predicts one class for everything otherwise)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, meta["mean"], meta["std"]).eval()
    recalibrate_batchnorm(model, [x_train.float() / 255])
    fc = final_linear(model)
    feats = []
    hook = fc.register_forward_hook(lambda _m, i, _o: feats.append(i[0]))
    with torch.no_grad():
        model(x_train.float() / 255)
        hook.remove()
        f = feats[0]
        fc.weight.div_(f.std(0).mean())
        fc.bias.copy_(-(f @ fc.weight.T).mean(0))
    return model_spec("resnet20", 10, meta["mean"], meta["std"], model.state_dict())


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """Prepared structured images (90 training, 40 test), the calibrated baseline, two random patches an
    attack, the smoke profile pointed at them, and the stage with a serial map that counts tasks."""
    src = structured_zip(tmp_path / "src")
    meta = prepare_dataset(DataConfig(root=str(src), val_per_class=1), tmp_path / "data/prepared/cifar10", seed=0)
    x_train, _ = load_tensors(tmp_path / "data/prepared/cifar10", "train")
    save_checkpoint(calibrated_baseline(meta, x_train), tmp_path / "models/resnet20/baseline.pt")
    gen = torch.Generator().manual_seed(0)
    for attack in ("advp", "lavan"):
        for seed in (0, 1):
            save_torch(torch.rand(3, 10, 10, generator=gen), tmp_path / f"patches/resnet20/{attack}/seed_{seed}.pt")
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"].update(root=str(src), val_per_class=1)
    raw["data"].pop("train_per_class")
    raw["data"].pop("test_per_class")
    raw["patch"].update(seeds=[0, 1], attacks=["advp", "lavan"])
    raw["fnc"].update(adjust_batches=2, batch_size=8)
    raw["fnc_tradeoff"] = {"alphas": [HUGE, SMALL], "adjustments": ["none"], "test_images": None}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import stages.fnc_tradeoff as stage

    calls: list[dict] = []

    def counting_map(fn, items, **kwargs):
        calls.extend(items)
        return serial_map(fn, items, **kwargs)

    monkeypatch.setattr(cached, "init_ray", lambda: None)
    monkeypatch.setattr(cached, "ray_map", counting_map)
    return {"dir": tmp_path, "stage": stage, "raw": raw, "calls": calls, "meta": meta}


def no_mlflow(monkeypatch, stage) -> None:
    """Skip MLflow in tests of the computation (one test logs, the others need not start a store)."""
    import contextlib

    monkeypatch.setattr(stage, "stage_run", lambda *a, **k: contextlib.nullcontext())
    for name in ("log_metrics", "log_child_runs", "log_artifact"):
        monkeypatch.setattr(stage, name, lambda *a, **k: None)


def set_tradeoff(project, **section) -> None:
    project["raw"]["fnc_tradeoff"].update(section)
    Path("params.yaml").write_text(yaml.safe_dump(project["raw"]))


def run(project) -> dict:
    project["calls"].clear()
    project["stage"].main(load_params("params.yaml"))
    return json.loads(Path("metrics/fnc_tradeoff.json").read_text())


def cached_cells() -> set[Path]:
    return set(Path(".cache/fnc_tradeoff").glob("*/cell.pt"))


def task_item(project, alpha, adjustment) -> dict:
    """What the stage hands ``fnc_tradeoff_task`` for one cell, on every test image."""
    params = load_params("params.yaml")
    x, _ = load_tensors("data/prepared/cifar10", "test")
    patches = {a: torch.stack([torch.load(f"patches/resnet20/{a}/seed_{s}.pt") for s in (0, 1)])
               for a in ("advp", "lavan")}
    placements = fixed_placements(len(x), 1, (32, 32), 10, params.evaluate.placement_seed)
    f = params.fnc
    return {"spec": load_checkpoint("models/resnet20/baseline.pt"), "alpha": alpha, "adjustment": adjustment,
            "eps": f.eps, "adjust_batches": f.adjust_batches, "finetune_epochs": f.finetune_epochs,
            "finetune_lr": f.finetune_lr, "adjust_batch_size": f.batch_size, "seed": params.seed,
            "horizontal_flip": True, "train": load_tensors("data/prepared/cifar10", "train"), "x": x,
            "placements": placements, "patches": patches, "batch_size": 7, "num_threads": 1}


def test_an_alpha_nothing_reaches_is_the_baseline_and_a_small_one_changes_patched_predictions(project):
    base = fnc_tradeoff_task(task_item(project, None, None))["preds"]
    huge = fnc_tradeoff_task(task_item(project, HUGE, "none"))["preds"]
    small = fnc_tradeoff_task(task_item(project, SMALL, "none"))["preds"]
    assert (base["advp"] != base["none"]).any(), "the patches must change some baseline prediction"
    assert len(set(base["none"].tolist())) > 2, "the baseline must not predict one class for everything"
    for key in ("none", "advp", "lavan"):
        assert torch.equal(huge[key], base[key]), key
    assert (small["advp"] != base["advp"]).any() and (small["lavan"] != base["lavan"]).any()


def test_the_stage_cells_at_a_huge_alpha_have_the_baselines_accuracy(project, monkeypatch):
    """Through the stage: the metrics of the alpha-1e6 cell equal the baseline's on the same images,
    recomputed here from the baseline's own predictions (evaluate's predict_shard)."""
    no_mlflow(monkeypatch, project["stage"])
    out = run(project)
    params = load_params("params.yaml")
    x, y = load_tensors("data/prepared/cifar10", "test")
    idx = evaluate_order(len(x), params.evaluate.subset_seed)
    x, y = x[idx], y[idx]
    patches = {a: torch.stack([torch.load(f"patches/resnet20/{a}/seed_{s}.pt") for s in (0, 1)])
               for a in ("advp", "lavan")}
    placements = fixed_placements(len(x), 1, (32, 32), 10, params.evaluate.placement_seed)
    preds = predict_shard(load_checkpoint("models/resnet20/baseline.pt"), x, placements, patches)
    cell = out["cells"]["none"][ft.alpha_key(HUGE)]
    assert cell["n_images"] == out["baseline"]["n_images"] == len(x) == 40
    assert cell["clean_accuracy"] == out["baseline"]["clean_accuracy"] == cell_metrics(preds["none"], None, y,
                                                                                        None)["clean_accuracy"]
    for attack in ("advp", "lavan"):
        want = cell_metrics(preds["none"], preds[attack], y, params.patch.target)
        for rate in ("robust_accuracy", "attack_success_rate", "robust_accuracy_std"):
            assert cell[attack][rate] == out["baseline"][attack][rate] == want[rate], (attack, rate)
        low, high = cell[attack]["robust_accuracy_ci_low"], cell[attack]["robust_accuracy_ci_high"]
        assert low <= cell[attack]["robust_accuracy"] <= high and high - low > 0
    small = out["cells"]["none"][ft.alpha_key(SMALL)]
    rows = pd.read_csv("plots/fnc_tradeoff.csv")
    assert list(zip(rows["adjustment"], rows["alpha"], strict=True)) == [("none", HUGE), ("none", SMALL)]
    assert rows["advp_robust_accuracy"].tolist() == [cell["advp"]["robust_accuracy"], small["advp"]["robust_accuracy"]]
    assert {"advp_robust_accuracy_ci_low", "lavan_attack_success_rate_ci_high", "advp_robust_accuracy_std",
            "clean_accuracy_ci_low", "n_images"} <= set(rows.columns)
    assert Path("plots/fnc_tradeoff.png").read_bytes().startswith(b"\x89PNG")
    assert out["closest"]["adjustment"] == "none" and out["reference"]["advp"] == papers.FNC_CIFAR10["advp"]


def test_a_cell_is_the_model_train_defended_makes_evaluated_as_evaluate_does(project):
    """The cell at (alpha, bn_recalibration) predicts what train_defended's FNC model (defend_task,
    same settings and seed) predicts through evaluate's predict_shard: one code path, not a copy."""
    item = task_item(project, SMALL, "bn_recalibration")
    cell = fnc_tradeoff_task(item)
    fnc = [{"name": "fnc", "alpha": SMALL, "eps": item["eps"]}]
    defended = defend_task({"spec": item["spec"], "defenses": fnc, "adjustment": "bn_recalibration",
                            "adjust_batches": item["adjust_batches"], "finetune_epochs": 1, "finetune_lr": 1e-3,
                            "batch_size": item["adjust_batch_size"], "seed": item["seed"], "train": item["train"],
                            "horizontal_flip": item["horizontal_flip"],
                            "test": load_tensors("data/prepared/cifar10", "test"), "num_threads": 1})
    assert cell["adjust_images"] == defended["adjust_images"] == item["adjust_batches"] * item["adjust_batch_size"]
    spec = {**item["spec"], "state_dict": defended["state_dict"], "defenses": fnc}
    want = predict_shard(spec, item["x"], item["placements"], item["patches"], 7)
    for key in ("none", "advp", "lavan"):
        assert torch.equal(cell["preds"][key], want[key]), key
    unadjusted = fnc_tradeoff_task(task_item(project, SMALL, "none"))["preds"]
    assert any((cell["preds"][k] != unadjusted[k]).any() for k in ("none", "advp")), "recalibration changed nothing"


def test_adding_an_alpha_computes_only_its_cells(project, monkeypatch):
    no_mlflow(monkeypatch, project["stage"])
    set_tradeoff(project, alphas=[HUGE], adjustments=["none", "bn_recalibration"])
    first = run(project)
    assert [(c["alpha"], c["adjustment"]) for c in project["calls"]] == [
        (None, None), (HUGE, "none"), (HUGE, "bn_recalibration")]
    assert len(cached_cells()) == 3
    set_tradeoff(project, alphas=[HUGE, SMALL])
    second = run(project)
    assert [(c["alpha"], c["adjustment"]) for c in project["calls"]] == [(SMALL, "none"), (SMALL, "bn_recalibration")]
    assert len(cached_cells()) == 5
    for adj in ("none", "bn_recalibration"):  # the cached cells read back as they were
        assert second["cells"][adj][ft.alpha_key(HUGE)] == first["cells"][adj][ft.alpha_key(HUGE)]
    assert set(second["cells"]["none"]) == {ft.alpha_key(HUGE), ft.alpha_key(SMALL)}
    run(project)
    assert project["calls"] == []  # nothing new: nothing computed
    project["raw"]["fnc"]["finetune_lr"] = 0.01  # no cell here fine-tunes: every cell stays cached
    set_tradeoff(project)
    run(project)
    assert project["calls"] == []
    project["raw"]["fnc"]["adjust_batches"] = 1  # only the recalibrated cells depend on it
    set_tradeoff(project)
    run(project)
    assert [(c["alpha"], c["adjustment"]) for c in project["calls"]] == [
        (HUGE, "bn_recalibration"), (SMALL, "bn_recalibration")]


def test_a_killed_run_resumes_with_the_unfinished_cells(project, monkeypatch):
    no_mlflow(monkeypatch, project["stage"])
    stage = project["stage"]

    def dies_after_one(fn, items, on_result=None, **_):
        on_result(0, fn(items[0]))
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cached, "ray_map", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        stage.main(load_params("params.yaml"))
    assert len(cached_cells()) == 1 and not Path("metrics/fnc_tradeoff.json").exists()
    calls = []
    monkeypatch.setattr(cached, "ray_map", lambda fn, items, **kw: calls.extend(items) or serial_map(fn, items, **kw))
    stage.main(load_params("params.yaml"))
    assert [(c["alpha"], c["adjustment"]) for c in calls] == [(HUGE, "none"), (SMALL, "none")]
    assert len(cached_cells()) == 3


def test_subset_placements_are_evaluates_for_the_same_images():
    drawn = fixed_placements(50, 2, (32, 32), 10, seed=7)  # evaluate's, for its 50 images and 2 placements each
    mine = ft.subset_placements(20, 50, 2, (32, 32), 10, seed=7, location="random")
    for p in range(2):
        assert torch.equal(mine.top[p * 20:(p + 1) * 20], drawn.top[p * 50:p * 50 + 20])
        assert torch.equal(mine.left[p * 20:(p + 1) * 20], drawn.left[p * 50:p * 50 + 20])
    corner = ft.subset_placements(3, 3, 1, (32, 32), 10, seed=7, location="fixed")
    assert corner.top.tolist() == [22.0] * 3
    with pytest.raises(ValueError, match="n_reference"):
        ft.subset_placements(20, 10, 1, (32, 32), 10, seed=7, location="random")


def test_the_closest_cell_is_the_nearest_in_clean_and_advp_accuracy():
    def cell(alpha, adjustment, clean, advp):
        return {"alpha": alpha, "adjustment": adjustment, "clean_accuracy": clean, "advp": {"robust_accuracy": advp}}

    ref = {"clean_accuracy": 0.79, "advp": 0.70}
    cells = [cell(1.0, "none", 0.80, 0.60), cell(1.2, "bn_recalibration", 0.75, 0.71),
             cell(2.0, "none", 0.90, 0.50)]
    near = ft.closest(cells, ref)
    assert (near["alpha"], near["adjustment"]) == (1.2, "bn_recalibration")
    assert near["distance"] == pytest.approx(math.hypot(0.04, 0.01))
    assert ft.closest(cells, None) is None and ft.closest([], ref) is None
    assert ft.closest([{k: v for k, v in cells[0].items() if k != "advp"}], ref) is None  # no AdvP cell


def _write(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.parametrize("section, needle", [
    ({"alphas": [1.0, -0.5]}, "fnc_tradeoff.alphas: every alpha must be a finite number > 0"),
    ({"alphas": [0.0]}, "fnc_tradeoff.alphas"),
    ({"alphas": [1.0, 1.0]}, "fnc_tradeoff.alphas: alphas lists a value twice"),
    ({"alphas": [1.0], "adjustments": ["none", "retrain"]}, "fnc_tradeoff.adjustments.1"),
    ({"alphas": [1.0], "adjustments": []}, "fnc_tradeoff.adjustments"),
    ({"alphas": [1.0], "test_images": 0}, "fnc_tradeoff.test_images"),
    ({"alphas": [1.0], "alpha": 1.1}, "fnc_tradeoff.alpha: unknown key"),
])
def test_bad_fnc_tradeoff_params_are_one_line(tmp_path, capsys, section, needle):
    params = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    params["data"].update(root=str(tmp_path), download=True)  # valid without data on disk
    params["fnc_tradeoff"] = section
    path = _write(tmp_path / "params.yaml", params)
    with pytest.raises(ParamsError, match="fnc_tradeoff"):
        load_params(path)
    assert validate_mod.main([str(path), "--stamp", str(tmp_path / "stamp"), "--sections", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: validate:") and needle in err[0], err
    assert not (tmp_path / "stamp").exists() and not (tmp_path / "fnc_tradeoff.json").exists()
    if "retrain" in str(section):
        assert "'none', 'bn_recalibration' or 'finetune_classifier'" in err[0]


def test_the_section_is_optional_and_validate_writes_it_resolved(tmp_path):
    """A profile without the section (params/blurnet.yaml) is valid with the stage off; the validate
    stage writes the section with its defaults, the same bytes as when written out in full, and
    other bytes when a value changes (the stage's dependency in dvc.yaml)."""
    assert load_params(ROOT / "params" / "blurnet.yaml").fnc_tradeoff.alphas == []
    params = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    params["data"].update(root=str(tmp_path), download=True)
    params.pop("fnc_tradeoff")
    files = []
    for k, section in enumerate((None, {"alphas": [], "adjustments": ["none", "bn_recalibration",
                                                                     "finetune_classifier"], "test_images": None},
                                 {"alphas": [1.1]})):
        if section is not None:
            params["fnc_tradeoff"] = section
        path = _write(tmp_path / f"p{k}.yaml", params)
        assert validate_mod.main([str(path), "--stamp", str(tmp_path / "stamp"), "--sections", str(tmp_path / str(k))]) == 0
        files.append((tmp_path / str(k) / "fnc_tradeoff.json").read_bytes())
    assert files[0] == files[1] != files[2]
    assert json.loads(files[0])["alphas"] == [] and json.loads(files[2])["alphas"] == [1.1]


def test_dvc_yaml_lists_what_the_stage_reads_and_not_fnc_alpha():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stage = spec["fnc_tradeoff"]
    assert "fnc.alpha" not in stage["params"] and "fnc.adjustment" not in stage["params"] and "fnc" not in stage["params"]
    assert "validate/fnc_tradeoff.json" in stage["deps"] and "fnc_tradeoff" not in stage["params"]
    assert {"fnc.eps", "fnc.adjust_batches", "evaluate.subset_seed", "evaluate.placement_seed", "seed"} <= set(
        stage["params"])
    outs = {next(iter(o)) for o in stage["outs"]}
    assert outs == {"metrics/fnc_tradeoff.json", "metrics/fnc_tradeoff.md", "plots/fnc_tradeoff.csv",
                    "plots/fnc_tradeoff.png"}
    assert "validate/fnc_tradeoff.json" in {next(iter(o)) for o in spec["validate"]["outs"]}
    assert "--sections validate" in spec["validate"]["cmd"]
    assert {"metrics/fnc_tradeoff.json", "plots/fnc_tradeoff.png"} <= set(spec["report"]["deps"])


def test_off_writes_a_note_and_runs_nothing(project, monkeypatch):
    stage = project["stage"]
    monkeypatch.setattr(stage, "stage_run", lambda *a, **k: pytest.fail("no MLflow run when off"))
    set_tradeoff(project, alphas=[])
    out = run(project)
    assert out["enabled"] is False and "fnc_tradeoff.alphas is empty" in out["note"]
    assert project["calls"] == [] and not Path(".cache/fnc_tradeoff").exists()
    assert "off" in Path("metrics/fnc_tradeoff.md").read_text()
    assert Path("plots/fnc_tradeoff.csv").read_text().strip() == ",".join(ft.CSV_HEAD)
    assert Path("plots/fnc_tradeoff.png").read_bytes().startswith(b"\x89PNG")


def test_report_section_names_the_closest_cell_or_says_it_is_off(project, monkeypatch):
    no_mlflow(monkeypatch, project["stage"])
    set_tradeoff(project, alphas=[SMALL, HUGE])
    out = run(project)
    from pipeline.render import report

    rep = report.Report()
    report._fnc_tradeoff(rep, lambda stage: "run-id")
    md = rep.markdown()
    assert "## FNC trade-off" in md and "![" in md
    near = out["closest"]
    assert f"is alpha {near['alpha']:g} with {near['adjustment']}:" in md
    others = [c for c in out["cells"]["none"].values() if c["alpha"] != near["alpha"]]
    ref = out["reference"]
    for c in others:  # the named cell is no farther from the published point than any other
        assert math.hypot(c["clean_accuracy"] - ref["clean_accuracy"], c["advp"]["robust_accuracy"] - ref["advp"]) \
            >= near["distance"]
    lines = [line for line in md.splitlines() if line.startswith("| none ")]
    assert len(lines) == 2 and all("[" in line and "]" in line for line in lines)  # rates with their intervals
    set_tradeoff(project, alphas=[])
    run(project)
    rep = report.Report()
    report._fnc_tradeoff(rep, lambda stage: "")
    assert "fnc_tradeoff.alphas is empty" in rep.markdown() and "![" not in rep.markdown()


def test_through_ray_with_mlflow(project, monkeypatch, ray_local):
    """The stage's real fan-out (Ray) and MLflow logging: one nested run per cell."""
    import mlflow

    from pipeline.distributed import init_ray, ray_map

    stage = project["stage"]
    monkeypatch.setattr(cached, "init_ray", init_ray)
    monkeypatch.setattr(cached, "ray_map", ray_map)
    set_tradeoff(project, alphas=[SMALL], adjustments=["none", "bn_recalibration"])
    stage.main(load_params("params.yaml"))
    out = json.loads(Path("metrics/fnc_tradeoff.json").read_text())
    assert set(out["cells"]) == {"none", "bn_recalibration"} and len(cached_cells()) == 3
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(project["raw"]["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("stage") == "fnc_tradeoff")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["fnc.adjustment"] for r in children) == ["bn_recalibration", "none"]
    bn = next(r for r in children if r.data.params["fnc.adjustment"] == "bn_recalibration")
    want = out["cells"]["bn_recalibration"][ft.alpha_key(SMALL)]
    assert bn.data.metrics["advp.robust_accuracy"] == pytest.approx(want["advp"]["robust_accuracy"])
    assert parent.data.metrics["baseline.clean_accuracy"] == pytest.approx(out["baseline"]["clean_accuracy"])
    assert parent.data.params["fnc_tradeoff.alphas"] == str([SMALL])
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "fnc_tradeoff")} >= {
        "fnc_tradeoff/fnc_tradeoff.png", "fnc_tradeoff/fnc_tradeoff.csv"}
