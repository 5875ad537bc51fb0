"""End to end: the smoke profile through ``dvc repro`` on real CIFAR-10 images."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import git

pytestmark = pytest.mark.e2e

STAGES = ["prepare", "train_baseline", "train_defended@fnc", "generate_patches", "evaluate", "analyze@feature_norms",
          "analyze@pixel_robustness", "analyze@loss_landscape", "analyze@gradcam_distance", "analyze@masking",
          "fnc_tradeoff", "report"]


def dvc(project, *args: str, tracking: str | None = None) -> subprocess.CompletedProcess:
    """``dvc <args>`` in the smoke project (with another MLflow store if ``tracking`` is given)."""
    env = project["env"] if tracking is None else {**project["env"], "MLFLOW_TRACKING_URI": tracking}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project["dir"], env=env,
                          capture_output=True, text=True, timeout=600)


def test_metrics_nested_model_defense_attack(smoke_project):
    metrics = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())
    cells = metrics["resnet20"]
    assert set(cells) == {"none", "fnc"}
    params = smoke_project["params"]
    for defense in ("none", "fnc"):
        assert list(cells[defense]) == [*params["evaluate"]["attacks"], "per_image_worst", "advp_worst", "lavan_worst"]
        for attack, m in cells[defense].items():
            if attack in ("advp", "lavan", "occlusion", "advp_worst", "lavan_worst"):
                assert m["n_seeds"] == len(params["patch"]["seeds"])
            elif attack in params["attacks"]:  # a per-image attack: its subset, with an interval around it
                assert m["n_images"] == params["attacks"][attack]["n_images"], attack
                assert m["robust_accuracy_ci_low"] <= m["robust_accuracy"] <= m["robust_accuracy_ci_high"], attack
        for attack in ("advp", "lavan"):  # the worst case bounds every way of making the patch
            for variant in (attack, f"{attack}_adaptive", *(["advp_bpda"] if attack == "advp" else [])):
                assert cells[defense][f"{attack}_worst"]["robust_accuracy"] <= \
                    cells[defense][variant]["robust_accuracy"] + 1e-12, (defense, variant)
        # AutoAttack and PGD-10 attack the same first 100 images: the ensemble is never weaker
        assert cells[defense]["autoattack"]["robust_accuracy"] <= cells[defense]["pgd"]["robust_accuracy"]
        worst = cells[defense]["per_image_worst"]  # FGSM, PGD, AutoAttack, masked PGD: their first 100 images
        assert worst["attacks"] == "pgd,fgsm,autoattack,masked_pgd"
        assert worst["n_images"] == params["attacks"]["pgd"]["n_images"]
        for attack in worst["attacks"].split(","):
            assert worst["robust_accuracy"] <= cells[defense][attack]["robust_accuracy"], (defense, attack)
    # every test image counted; the targeted cells leave the target class out
    n_test = 10 * smoke_project["params"]["data"]["test_per_class"]
    assert cells["none"]["none"]["n_images"] == n_test
    assert cells["none"]["advp"]["n_images"] == n_test - smoke_project["params"]["data"]["test_per_class"]


def test_rp2_stage_is_off_in_the_cifar_profile(smoke_project):
    """attack_rp2 runs in every profile; without a traffic-sign model it only writes a note."""
    assert json.loads((smoke_project["dir"] / "metrics" / "rp2.json").read_text()) == {"enabled": False}
    assert "rp2.enabled: false" in (smoke_project["dir"] / "rp2" / "resnet20" / "README.md").read_text()


def test_patch_really_attacks_the_baseline(smoke_project):
    """The smoke profile must still show a real effect: >= 10 points of accuracy lost."""
    m = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]["none"]
    assert m["advp"]["clean_accuracy"] - m["advp"]["robust_accuracy"] >= 0.10
    # the patch does more than occlude: the same-size noise patch costs less
    assert m["advp"]["robust_accuracy"] < m["occlusion"]["robust_accuracy"]
    assert m["advp"]["attack_success_rate"] > m["occlusion"]["attack_success_rate"]


# Minimum accuracy drop each attack must cause on the smoke baseline (a weak, undefended ResNet-20 at ~45 %
# clean accuracy), on the attacked subset; the smoke profile's `attacks` section sets the budgets.
MIN_DROP = {
    # L-inf 8/255 on an undefended CIFAR model: FGSM removes most correct predictions (Goodfellow et al. 2015),
    # PGD-10 nearly all (Madry et al. 2018, Table 1: 3.5 % for a naturally trained model at eps 8).
    "fgsm": 0.15,
    "pgd": 0.25,
    # masked PGD on the top 25 % of pixels of the robustness map still flips most predictions (Hwang et al. 2019);
    "masked_pgd": 0.15,
    # DeepFool runs until the boundary is crossed (Moosavi-Dezfooli et al. 2016): almost every correct image flips.
    "deepfool": 0.25,
    # JSMA (gamma 10 % of features) and C&W L2 flip most images of a weak model; 10 and 30 images, so a loose bound.
    "jsma": 0.10,
    "cw_l2": 0.10,
    # Mask-FGSM changes at most tau of the input values.
    "mask_fgsm": 0.02,
    # One Pixel at smoke budgets (5 pixels, 5 generations, 5 images) flips none to a few of the ~2 correctly
    # classified images depending on the baseline's draw: no success is required, its pixel budget is checked.
    "one_pixel": None,
    # AutoAttack (smoke budgets) is at least as strong as PGD-10 on the same images
    "autoattack": 0.25,
}


@pytest.mark.parametrize("attack", sorted(MIN_DROP))
def test_every_attack_lowers_the_baseline_accuracy(smoke_project, attack):
    cells = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]["none"]
    assert attack in cells, f"the smoke profile should evaluate {attack}"
    m = cells[attack]
    assert m["n_images"] == smoke_project["params"]["attacks"][attack]["n_images"]
    drop = m["clean_accuracy"] - m["robust_accuracy"]
    if MIN_DROP[attack] is None:  # One Pixel: at most `pixels` of the 32x32 pixels changed, all 3 values each
        assert drop >= 0 and m["l0"] <= smoke_project["params"]["attacks"][attack]["pixels"] / (32 * 32) + 1e-9, m
    else:
        assert drop > MIN_DROP[attack], (attack, m)
    assert 0.0 <= m["l0"] <= 1.0 and 0.0 < m["ssim"] <= 1.0
    if attack in ("fgsm", "pgd", "masked_pgd"):  # L-inf budget respected, pixel units of [0, 1]
        assert m["linf"] <= smoke_project["params"]["attacks"][attack]["eps"] + 1e-6


def test_lavan_patch_attacks_beyond_occlusion(smoke_project):
    m = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]["none"]
    assert (smoke_project["dir"] / "patches/resnet20/lavan/seed_0.pt").is_file()
    # a trained universal patch does more than the same-size noise patch at the same placements
    assert m["lavan"]["robust_accuracy"] < m["occlusion"]["robust_accuracy"]
    assert m["lavan"]["attack_success_rate"] > m["occlusion"]["attack_success_rate"]


def test_evaluate_reuses_cached_cells(smoke_project, tmp_path):
    """Every (defense, attack) cell is cached: rerunning evaluate without an attack recomputes
    nothing (in a copy of the project, with MLflow runs in a side store)."""
    work = tmp_path / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True)
    copy = {**smoke_project, "dir": work, "env": {**smoke_project["env"], "PYTHONPATH": str(work)}}
    before = json.loads((work / "metrics" / "evaluate.json").read_text())["resnet20"]
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["attacks"] = [a for a in params["evaluate"]["attacks"] if a != "fgsm"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(copy, "repro", "evaluate", tracking=f"sqlite:///{work / 'mlflow-cache-test.db'}")
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    n_cells = len(params["evaluate"]["defenses"]) * len(params["evaluate"]["attacks"])
    assert f"{n_cells} of {n_cells} cells cached" in log
    assert "Running stage 'evaluate'" in log and "per-image attacks:" not in log  # it ran, and attacked nothing
    after = json.loads((work / "metrics" / "evaluate.json").read_text())["resnet20"]
    assert "fgsm" not in after["none"]
    assert after["none"]["pgd"] == before["none"]["pgd"]


def test_stage_outputs_match_params(smoke_project):
    d, params = smoke_project["dir"], smoke_project["params"]
    import torch

    meta = json.loads((d / "data/prepared/cifar10/meta.json").read_text())
    d_ = params["data"]  # the validation split comes out of the training images
    assert meta["splits"]["train"]["n_images"] == 10 * (d_["train_per_class"] - d_["val_per_class"])
    assert set(meta["splits"]["val"]["per_class"].values()) == {d_["val_per_class"]}
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


def test_dvc_metrics_show_lists_the_headline_and_the_table_on_request(smoke_project):
    """``dvc metrics show`` prints metrics/headline.json alone, one narrow line: per defense
    the clean accuracy and the robust accuracy under the worst-case AdvP patch, AutoAttack
    and the per-image worst case (at most PGD's), the matrix's own cells; the matrix itself is shown when named."""
    out = dvc(smoke_project, "metrics", "show", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)[""]["data"]
    assert list(shown) == ["metrics/headline.json"]
    cells = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    headline = shown["metrics/headline.json"]["data"]
    assert list(headline) == list(cells)
    for defense, row in cells.items():
        want = {"clean_accuracy": row["none"]["clean_accuracy"], "advp_worst": row["advp_worst"]["robust_accuracy"]}
        want.update({a: row[a]["robust_accuracy"] for a in ("autoattack", "per_image_worst")})
        assert headline[defense] == pytest.approx(want)
    table = dvc(smoke_project, "metrics", "show")
    assert max(map(len, table.stdout.splitlines())) <= 200, table.stdout
    full = dvc(smoke_project, "metrics", "show", "metrics/evaluate.json", "--json")
    assert full.returncode == 0, full.stderr
    for key in ("clean_accuracy", "robust_accuracy", "attack_success_rate"):
        assert key in full.stdout


def test_dvc_plots_show_draws_every_chart_with_named_axes(smoke_project):
    """No plot fails to load (the spectrum analysis's note is no plot), every chart names its
    axes, and the patch loss is a line per attack and seed."""
    out = dvc(smoke_project, "plots", "show", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]
    charts = {name: p["content"] for name, plots in shown["data"].items() for p in plots
              if p["type"] == "vega" and p["content"]}
    a = "analysis/resnet20/"
    assert {"plots/evaluate_accuracy.csv", "plots/train_baseline.csv", "plots/patch_loss.csv", a + "feature_norms/ifnr.csv",
            a + "pixel_robustness/accuracy_vs_k.csv", a + "loss_landscape/loss_history.csv",
            a + "gradcam_distance/confidence_vs_distance.csv", a + "masking/eps_sweep.csv"} <= set(charts)
    for name, spec in charts.items():
        encodings = [part["encoding"] for part in (spec, *spec.get("layer", [])) if "encoding" in part]
        titles = {ch: enc[ch]["title"] for enc in encodings for ch in ("x", "y") if ch in enc}
        assert set(titles) == {"x", "y"} and all(titles.values()) and "step" not in titles.values(), (name, titles)
    params = smoke_project["params"]["patch"]
    lines = {row["series"] for row in charts["plots/patch_loss.csv"]["data"]["values"]}
    assert lines == {f"{attack} seed {seed}" for attack in params["attacks"] for seed in params["seeds"]}


def test_mlflow_has_one_run_per_stage_with_metrics_and_patch(smoke_project):
    """Read back through the client API from the real ``mlflow server`` the smoke run logged to."""
    import mlflow

    assert smoke_project["env"]["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    client = mlflow.MlflowClient(tracking_uri=smoke_project["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(smoke_project["params"]["mlflow"]["experiment"])
    every = client.search_runs([exp.experiment_id], max_results=1000)
    runs = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages == sorted(STAGES)
    by_stage = {r.data.tags["stage"]: r for r in runs}
    ev = by_stage["evaluate"]
    assert ev.info.run_name == "evaluate" and ev.data.tags["dvc_experiment"] == "workspace"
    # one nested run per evaluation cell; filtered to one attack, the baseline beside every defense
    cells = client.search_runs([exp.experiment_id], max_results=1000, filter_string=(
        f"tags.mlflow.parentRunId = '{ev.info.run_id}' and params.attack = 'advp'"))
    metrics_file = json.loads((smoke_project["dir"] / "metrics/evaluate.json").read_text())["resnet20"]
    assert sorted(c.data.params["defense"] for c in cells) == sorted(metrics_file)
    for c in cells:
        want = metrics_file[c.data.params["defense"]]["advp"]
        assert c.data.params["attack_kind"] == "patch transferred"
        assert c.data.metrics["robust_accuracy"] == pytest.approx(want["robust_accuracy"])
        assert c.data.metrics["n_images"] == want["n_images"]
    n_cells = sum(len(row) for row in metrics_file.values())
    assert len([r for r in every if r.data.tags.get("mlflow.parentRunId") == ev.info.run_id]) == n_cells
    for key in ("none.advp.robust_accuracy", "fnc.advp.robust_accuracy", "none.advp.attack_success_rate",
                "fnc.none.clean_accuracy"):
        assert not math.isnan(ev.data.metrics[key])
    metrics = json.loads((smoke_project["dir"] / "metrics/evaluate.json").read_text())["resnet20"]
    assert ev.data.metrics["fnc.advp.robust_accuracy"] == pytest.approx(metrics["fnc"]["advp"]["robust_accuracy"])
    for attack in smoke_project["params"]["patch"]["attacks"]:
        artifacts = [a.path for a in client.list_artifacts(ev.info.run_id, f"patches/{attack}")]
        assert any(p.endswith(".png") for p in artifacts), (attack, artifacts)
    for r in runs:  # the tags the compare view groups and filters by
        assert r.data.tags["git_commit"] != ""
        assert r.data.tags["profile"] == "smoke" and r.data.tags["paper"].startswith("FNC")
        assert r.data.tags["model"] == "resnet20" if r.data.tags["stage"] != "prepare" else "dataset" in r.data.tags
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
        assert changed.isdisjoint({"prepare", "train_baseline", "generate_patches", "fnc_tradeoff"})
    finally:
        params_path.write_text(original)


def test_adaptive_patches_are_white_box_on_each_defense(smoke_project):
    """``advp_adaptive``: on the baseline the same patches as ``advp`` (so the same numbers);
    on FNC the patch search on FNC itself, warm-started from the transferred patch, keeps per
    seed the candidate that attacks the validation split best (the transferred patch is one)."""
    cells = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    assert cells["none"]["advp_adaptive"] == cells["none"]["advp"]
    assert cells["none"]["lavan_adaptive"] == cells["none"]["lavan"]
    fnc = cells["fnc"]
    for attack in ("advp_adaptive", "lavan_adaptive"):
        assert fnc[attack]["n_seeds"] == len(smoke_project["params"]["patch"]["seeds"])
        assert fnc[attack]["clean_accuracy"] == fnc["advp"]["clean_accuracy"]
        assert fnc[attack]["robust_accuracy"] < fnc[attack]["clean_accuracy"]  # the patch still does harm
        starts = fnc[attack]["selected_start"].split(",")
        assert len(starts) == len(smoke_project["params"]["patch"]["seeds"]) and set(starts) <= {"transferred", "warm"}
        assert fnc[attack]["val_robust_accuracy"] <= fnc[attack]["val_robust_accuracy_transferred"]
        if set(starts) == {"transferred"}:  # the transferred patches kept: the transferred numbers
            assert fnc[attack]["robust_accuracy"] == fnc[attack.removesuffix("_adaptive")]["robust_accuracy"]


def test_bpda_patches_pass_the_clipping_on_fnc_only(smoke_project):
    """``advp_bpda``: on the baseline the baseline's patches; on FNC patches trained with the
    clipping's backward replaced by the identity, other patches than the plain adaptive ones,
    that still do harm."""
    cells = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    assert cells["none"]["advp_bpda"] == cells["none"]["advp"]
    fnc = cells["fnc"]["advp_bpda"]
    assert fnc["n_seeds"] == len(smoke_project["params"]["patch"]["seeds"])
    assert fnc["robust_accuracy"] < fnc["clean_accuracy"]
    assert fnc["val_robust_accuracy"] <= fnc["val_robust_accuracy_transferred"]
    # its own search (a cache entry of its own): only where both kept the transferred patches are they equal
    if fnc["selected_start"] != cells["fnc"]["advp_adaptive"]["selected_start"] or "warm" in fnc["selected_start"]:
        assert fnc != cells["fnc"]["advp_adaptive"]


def test_a_new_defended_model_reruns_only_its_own_stage(smoke_project):
    """Adding a defended model to ``defended`` adds one train_defended instance and reruns
    nothing upstream; once it exists, evaluate (which reads the models folder) is stale."""
    work = smoke_project["dir"]
    params_path = work / "params.yaml"
    original = params_path.read_text()
    side_store = f"sqlite:///{work / 'mlflow-defended-test.db'}"
    made = [work / "models/resnet20/blur_input.pt", work / "metrics/train_defended/blur_input.json",
            work / "plots/train_defended/blur_input.csv"]
    try:
        params = yaml.safe_load(original)
        params["defended"] = ["fnc", "blur_input"]
        params["blur_input"] = {"insert_after": [{"name": "input_blur", "kernel": "gaussian", "size": 3}]}
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(dvc(smoke_project, "status", "--json").stdout))
        assert "train_defended@blur_input" in changed
        assert changed.isdisjoint({"prepare", "train_baseline", "generate_patches", "train_defended@fnc"})
        out = dvc(smoke_project, "repro", "train_defended@blur_input", tracking=side_store)
        assert out.returncode == 0, out.stderr[-3000:]
        m = json.loads(made[1].read_text())
        baseline = json.loads((work / "metrics/train_baseline.json").read_text())["clean_accuracy"]
        assert abs(m["baseline_clean_accuracy"] - baseline) <= 0.002  # memory-format rounding may flip one image
        changed = set(json.loads(dvc(smoke_project, "status", "--json").stdout))
        assert "evaluate" in changed and "train_defended@fnc" not in changed
    finally:
        params_path.write_text(original)
        for f in made:
            f.unlink(missing_ok=True)
    assert "evaluate" not in set(json.loads(dvc(smoke_project, "status", "--json").stdout))


def test_analyses_on_the_smoke_models(smoke_project):
    """FNC caps the feature norms the patch inflates: its IFNR at the last block is below
    the baseline's (Yu et al., Section 4); every analysis left its table and figure."""
    import pandas as pd

    out = smoke_project["dir"] / "analysis" / "resnet20"
    ifnr = pd.read_csv(out / "feature_norms" / "ifnr.csv")
    last = ifnr.sort_values("depth").groupby("defense")["ifnr_mean"].last()
    assert last["fnc"] < last["none"]
    for f in ("feature_norms/ifnr.png", "pixel_robustness/accuracy_vs_k.csv", "loss_landscape/loss_landscape.png",
              "gradcam_distance/confidence_vs_distance.csv"):
        assert (out / f).is_file(), f
    assert "rp2.enabled is false" in (out / "spectrum" / "README.md").read_text()


def test_fnc_tradeoff_of_the_smoke_run(smoke_project):
    """Every (alpha, adjustment) cell of the smoke profile's fnc_tradeoff on its test images, each
    rate inside its interval, and the CSV a row per cell."""
    import pandas as pd

    section, params = smoke_project["params"]["fnc_tradeoff"], smoke_project["params"]
    out = json.loads((smoke_project["dir"] / "metrics" / "fnc_tradeoff.json").read_text())
    assert out["enabled"] and out["n_images"] == section["test_images"]
    assert {adj: sorted(float(a) for a in cells) for adj, cells in out["cells"].items()} == {
        adj: sorted(section["alphas"]) for adj in section["adjustments"]}
    for cells in (*out["cells"].values(), {"baseline": out["baseline"]}):
        for c in cells.values():
            assert c["clean_accuracy_ci_low"] <= c["clean_accuracy"] <= c["clean_accuracy_ci_high"]
            for attack in params["patch"]["attacks"]:
                m = c[attack]
                assert m["n_seeds"] == len(params["patch"]["seeds"])
                assert m["robust_accuracy_ci_low"] <= m["robust_accuracy"] <= m["robust_accuracy_ci_high"]
    rows = pd.read_csv(smoke_project["dir"] / "plots" / "fnc_tradeoff.csv")
    assert len(rows) == len(section["alphas"]) * len(section["adjustments"])
    assert out["closest"]["adjustment"] in section["adjustments"]


def test_report_of_the_smoke_run(smoke_project):
    md = (smoke_project["dir"] / "reports" / "report.md").read_text()
    assert "## FNC against universal patches" in md and "69.98 %" in md  # the paper's number beside ours
    metrics = json.loads((smoke_project["dir"] / "metrics/evaluate.json").read_text())["resnet20"]
    assert f"{100 * metrics['fnc']['advp']['robust_accuracy']:.2f} %" in md
    assert "## FNC trade-off" in md and "Closest to the third-party re-run" in md
    page = (smoke_project["dir"] / "reports" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3


def test_sweeps_and_comparisons_as_the_readme_shows(smoke_project, tmp_path):
    """README, Sweeps and comparisons, on a copy of the finished smoke project: an experiment
    that changes a key only `report` reads reruns only `report` (and the cheap `validate`);
    `dvc exp show --only-changed`, `dvc metrics diff` and `dvc plots diff` against it exit 0
    without a failed chart; its MLflow run carries the experiment's name; a queued grid queues
    one experiment per value."""
    import mlflow

    work = tmp_path / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True)
    store = f"sqlite:///{work / 'exp.db'}"
    project = {**smoke_project, "dir": work, "env": {**smoke_project["env"], "MLFLOW_TRACKING_URI": store,
                                                     "PYTHONPATH": str(work)}}
    git(work, "add", "-A")
    git(work, "commit", "-qm", "finished smoke run")
    run = dvc(project, "exp", "run", "-n", "drop-4pt", "-S", "report.max_clean_drop=0.04")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ran = {line.split("'")[1] for line in run.stdout.splitlines() if line.startswith("Running stage")}
    assert ran <= {"validate", "report"} and "report" in ran, ran
    show = dvc(project, "exp", "show", "--only-changed", "--drop", ".*/", "--csv")
    assert show.returncode == 0 and "drop-4pt" in show.stdout and "report.max_clean_drop" in show.stdout, show.stderr
    for args in (("metrics", "diff", "HEAD", "drop-4pt"), ("plots", "diff", "HEAD", "drop-4pt")):
        out = dvc(project, *args)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        assert "failed" not in (out.stdout + out.stderr).lower(), (args, out.stdout[-2000:], out.stderr[-2000:])
    client = mlflow.MlflowClient(tracking_uri=store)
    (report,) = client.search_runs([client.get_experiment_by_name(smoke_project["params"]["mlflow"]["experiment"])
                                    .experiment_id], filter_string="tags.stage = 'report'")
    assert report.data.tags["dvc_experiment"] == "drop-4pt" and report.info.run_name == "report [drop-4pt]"
    queued = dvc(project, "exp", "run", "--queue", "-S", "report.max_clean_drop=0.03,0.06")
    assert queued.returncode == 0, queued.stderr
    status = dvc(project, "queue", "status")
    assert status.stdout.count("Queued") == 2, status.stdout
    assert dvc(project, "queue", "remove", "--all").returncode == 0
