"""End to end: the smoke profile through ``dvc repro`` on real CIFAR-10 images."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.e2e

STAGES = ["prepare", "train_baseline", "train_defended@fnc", "generate_patches", "evaluate"]


def dvc(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project["dir"], env=project["env"],
                          capture_output=True, text=True, timeout=600)


def test_metrics_nested_model_defense_attack(smoke_project):
    metrics = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())
    cells = metrics["resnet20"]
    assert set(cells) == {"none", "fnc"}
    for defense in ("none", "fnc"):
        assert set(cells[defense]) == {"none", "advp", "occlusion"}
        for attack, m in cells[defense].items():
            assert 0.0 <= m["clean_accuracy"] <= 1.0
            assert m["n_images"] > 0
            if attack != "none":
                for key in ("robust_accuracy", "attack_success_rate", "fooling_rate"):
                    assert 0.0 <= m[key] <= 1.0, (defense, attack, key)
                assert m["n_seeds"] == len(smoke_project["params"]["patch"]["seeds"])
    # every test image counted; the targeted cells leave the target class out
    n_test = 10 * smoke_project["params"]["data"]["test_per_class"]
    assert cells["none"]["none"]["n_images"] == n_test
    assert cells["none"]["advp"]["n_images"] == n_test - smoke_project["params"]["data"]["test_per_class"]


def test_patch_really_attacks_the_baseline(smoke_project):
    """The smoke profile must still show a real effect: >= 10 points of accuracy lost."""
    m = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]["none"]
    assert m["advp"]["clean_accuracy"] - m["advp"]["robust_accuracy"] >= 0.10
    # the patch does more than occlude: the same-size noise patch costs less
    assert m["advp"]["robust_accuracy"] < m["occlusion"]["robust_accuracy"]
    assert m["advp"]["attack_success_rate"] > m["occlusion"]["attack_success_rate"]


def test_stage_outputs_match_params(smoke_project):
    d, params = smoke_project["dir"], smoke_project["params"]
    import torch

    meta = json.loads((d / "data/prepared/cifar10/meta.json").read_text())
    assert meta["splits"]["train"]["n_images"] == 10 * params["data"]["train_per_class"]
    assert set(meta["splits"]["test"]["per_class"].values()) == {params["data"]["test_per_class"]}
    for seed in params["patch"]["seeds"]:
        patch = torch.load(d / f"patches/resnet20/advp/seed_{seed}.pt", weights_only=True)
        assert patch.shape == (3, 10, 10)  # floor(sqrt(0.1 * 32 * 32))
        assert patch.min() >= 0 and patch.max() <= 1
        assert (d / f"patches/resnet20/advp/seed_{seed}.png").is_file()
    fnc = torch.load(d / "models/resnet20/fnc.pt", weights_only=True)
    assert fnc["defenses"] == [{"name": "fnc", "alpha": params["fnc"]["alpha"], "eps": params["fnc"]["eps"]}]
    defended = json.loads((d / "metrics/train_defended/fnc.json").read_text())
    assert defended["adjustment"] == params["fnc"]["adjustment"]
    history = (d / "plots/train_baseline.csv").read_text().strip().splitlines()
    assert len(history) == 1 + params["train"]["epochs"]


def test_dvc_metrics_show_lists_the_table(smoke_project):
    out = dvc(smoke_project, "metrics", "show", "--json")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for key in ("clean_accuracy", "robust_accuracy", "attack_success_rate"):
        assert key in text


def test_mlflow_has_one_run_per_stage_with_metrics_and_patch(smoke_project):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=smoke_project["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(smoke_project["params"]["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id])
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == sorted(STAGES)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    ev = by_stage["evaluate"]
    for key in ("none.advp.robust_accuracy", "fnc.advp.robust_accuracy", "none.advp.attack_success_rate",
                "fnc.none.clean_accuracy"):
        assert not math.isnan(ev.data.metrics[key])
    metrics = json.loads((smoke_project["dir"] / "metrics/evaluate.json").read_text())["resnet20"]
    assert ev.data.metrics["fnc.advp.robust_accuracy"] == pytest.approx(metrics["fnc"]["advp"]["robust_accuracy"])
    artifacts = [a.path for a in client.list_artifacts(ev.info.run_id, "patches")]
    assert any(p.endswith(".png") for p in artifacts)
    for r in runs:
        assert r.data.tags["git_commit"] != ""
        assert "version.torch" in r.data.tags and "hw.cpu" in r.data.tags
    epochs = client.get_metric_history(by_stage["train_baseline"].info.run_id, "test_accuracy")
    assert len(epochs) == smoke_project["params"]["train"]["epochs"]


def test_second_repro_is_a_noop_and_alpha_reruns_only_fnc(smoke_project):
    again = dvc(smoke_project, "repro")
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout
    params_path = smoke_project["dir"] / "params.yaml"
    original = params_path.read_text()
    try:
        params = yaml.safe_load(original)
        params["fnc"]["alpha"] = params["fnc"]["alpha"] + 0.1
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        status = dvc(smoke_project, "status", "--json")
        assert status.returncode == 0, status.stderr
        changed = set(json.loads(status.stdout))
        assert "train_defended@fnc" in changed
        assert changed.isdisjoint({"prepare", "train_baseline", "generate_patches"})
    finally:
        params_path.write_text(original)
