"""The attack_rp2 stage: stickers per (defense, target, seed), white and black box, its
files and metrics, its cache, and its params checks. Runs the stage's ``main`` in a
temporary project with small random models (the Ray fan-out is replaced by a serial
map in the ``project`` fixture; test_stage_fans_out_one_ray_task_per_sticker runs it on a
real local Ray instance, since every e2e profile has rp2 off)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.config import ParamsError, load_params
from pipeline.models import build_model
from tests.helpers import serial_map

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


def check_rows_against_the_saved_stickers(tmp: Path, rows: list[dict], attack: dict, transforms: int,
                                          arch: str = "resnet20") -> None:
    """Every per-sticker row of metrics/rp2.json, recomputed from what the stage saved: the
    sticker file ``rp2/<arch>/<source>/target_<t>_seed_<s>.pt`` pasted on the 40 victims
    (true class 14), classified by the row's model file; the rates from those predictions."""
    from pipeline.attacks.rp2 import RP2Params, apply_rp2, sample_transforms, transform_images
    from pipeline.checkpoint import build_from_spec, load_checkpoint
    from pipeline.data.rp2 import load_mask, load_victims

    victims, _ = load_victims(RP2_DIR, 32)
    x = victims.float() / 255
    mask = load_mask(RP2_DIR / "masks/rectangles-32.png")
    for row in rows:
        name = "baseline" if row["defense"] == "none" else row["defense"]
        model = build_from_spec(load_checkpoint(tmp / f"models/{arch}/{name}.pt")).eval()
        delta = torch.load(tmp / f"rp2/{arch}/{row['source']}/target_{row['target']}_seed_{row['seed']}.pt")
        adv = apply_rp2(x, delta, mask)
        with torch.no_grad():
            clean, pred = model(x).argmax(1), model(adv).argmax(1)
            tf = sample_transforms(transforms * len(x), RP2Params(**attack, target=row["target"]),
                                   torch.Generator().manual_seed(row["seed"]))
            pred_tf = model(transform_images(adv.repeat(transforms, 1, 1, 1), tf)).argmax(1)
        n, k = len(x), transforms * len(x)  # a count over n differs from its neighbours by 1 / n >> 1e-6
        assert row["clean_accuracy"] == pytest.approx(int((clean == 14).sum()) / n, abs=1e-6)
        assert row["fooling_rate"] == pytest.approx(int((pred != clean).sum()) / n, abs=1e-6)
        assert row["target_success"] == pytest.approx(int((pred == row["target"]).sum()) / n, abs=1e-6)
        assert row["target_success_transformed"] == pytest.approx(int((pred_tf == row["target"]).sum()) / k, abs=1e-6)
        l2 = ((x - adv).flatten(1).norm(dim=1) / adv.flatten(1).norm(dim=1)).mean()
        assert row["l2_dissimilarity"] == pytest.approx(float(l2), rel=1e-5) and row["l2_dissimilarity"] > 0


def _gtsrb_workdir(tmp_path, monkeypatch) -> None:
    """Work in ``tmp_path`` with a prepared GTSRB meta (no images: the stage reads RP2's victims),
    a private MLflow store and torch's seed fixed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    meta = {"dataset": "gtsrb", "image_shape": [3, 32, 32], "classes": [f"class {i}" for i in range(N_CLASSES)]}
    (tmp_path / "data/prepared/gtsrb").mkdir(parents=True)
    (tmp_path / "data/prepared/gtsrb/meta.json").write_text(json.dumps(meta))
    torch.manual_seed(0)


@pytest.fixture()
def project(tmp_path, monkeypatch):
    _gtsrb_workdir(tmp_path, monkeypatch)
    model = build_model("resnet20", N_CLASSES, [0.5] * 3, [0.25] * 3)
    sd = model.state_dict()
    save_checkpoint(model_spec("resnet20", N_CLASSES, [0.5] * 3, [0.25] * 3, sd), "models/resnet20/baseline.pt")
    save_checkpoint(model_spec("resnet20", N_CLASSES, [0.5] * 3, [0.25] * 3, sd, [{"name": "fnc", "alpha": 0.5}]),
                    "models/resnet20/fnc.pt")

    import stages.attack_rp2 as stage

    calls = []

    def counting_map(fn, items, **kwargs):
        calls.append(len(items))
        return serial_map(fn, items, **kwargs)

    from pipeline import cached

    monkeypatch.setattr(cached, "init_ray", lambda: None)
    monkeypatch.setattr(cached, "ray_map", counting_map)
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
    check_rows_against_the_saved_stickers(tmp, rows, {"steps": 15, "eot_samples": 2, "lr": 0.1}, transforms=4)
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
    assert "black_box" in md and "white_box" in md and "fooling_rate_worst [95% CI]" in md


def test_summary_rates_carry_wilson_intervals_over_the_victims():
    """Means over targets and seeds, the worst target, and 95 % Wilson intervals over the
    victims (the stickers share them), checked against SciPy directly."""
    import pandas as pd
    from scipy.stats import binomtest

    from pipeline.stickers import summarise

    rates = {(5, 0): 0.5, (5, 1): 0.3, (1, 0): 0.1, (1, 1): 0.1}  # (target, seed) -> fooling rate over 40
    rows = pd.DataFrame([{"defense": "none", "setting": "white_box", "target": t, "seed": sd, "clean_accuracy": 0.95,
                          "fooling_rate": r, "target_success": r / 2, "target_success_transformed": r / 4,
                          "l2_dissimilarity": 0.2} for (t, sd), r in rates.items()])
    s = summarise(rows, 40)["none"]["white_box"]
    assert s["fooling_rate_mean"] == pytest.approx(0.25) and s["fooling_rate_worst"] == pytest.approx(0.4)
    assert s["worst_target"] == 5 and s["n_stickers"] == 4 and s["n_seeds"] == 2 and s["n_victims"] == 40
    for key, k in (("fooling_rate_mean", 10), ("fooling_rate_worst", 16)):  # 0.25 and 0.4 of 40 victims
        ci = binomtest(k, 40).proportion_ci(method="wilson")
        assert (s[f"{key}_ci_low"], s[f"{key}_ci_high"]) == pytest.approx((ci.low, ci.high))
    # 40 victims: an interval about +-0.14 wide near 0.3, as the issue computed
    assert 0.25 < s["fooling_rate_mean_ci_high"] - s["fooling_rate_mean_ci_low"] < 0.3
    with pytest.raises(ValueError, match="n_victims"):
        summarise(rows, 0)
    # each row against the undefended white-box one: a direction only outside both intervals
    assert s["fooling_rate_mean_vs_none"] == ""  # the baseline itself
    low = pd.DataFrame([{**r, "defense": "blur", "fooling_rate": 0.0} for r in rows.to_dict("records")])
    same = pd.DataFrame([{**r, "defense": "same", "fooling_rate": r["fooling_rate"] + 0.025}
                         for r in rows.to_dict("records")])
    both = summarise(pd.concat([rows, low, same]), 40)
    assert both["blur"]["white_box"]["fooling_rate_mean_vs_none"] == "lower"  # 0 of 40 against 10 of 40
    assert both["same"]["white_box"]["fooling_rate_mean_vs_none"] == "within noise"  # 11 of 40


def test_summary_table_names_each_row_as_the_slides_table_that_it_reproduces():
    """BlurNet's models get their slide row by name (Table 1 for black-box stickers, Table 2 for
    white-box ones, both for the baseline); a profile without BlurNet's models has no such column."""
    from types import SimpleNamespace

    import pandas as pd

    from pipeline.render.rp2 import markdown as _markdown
    from pipeline.render.rp2 import slides_row
    from pipeline.stickers import summarise

    def rows(defenses):
        return pd.DataFrame([{"defense": d, "setting": st, "source": "none", "target": 5, "seed": 0,
                              "clean_accuracy": 1.0, "fooling_rate": 0.3, "target_success": 0.0,
                              "target_success_transformed": 0.0, "l2_dissimilarity": 0.2, "seconds": 1.0}
                             for d, st in defenses])

    r, classes = SimpleNamespace(true_class=14), [f"class {i}" for i in range(43)]
    blur = rows([("none", "white_box"), ("blurnet5", "black_box"), ("blurnet_learned7", "white_box"),
                 ("blurnet_learned7", "black_box"), ("fnc", "white_box")])
    md = _markdown(blur, summarise(blur, 40), classes, r, 40)
    assert "slides' row" in md
    assert "Table 1: 5x5 filter on L1 feature maps" in md and "Table 2: 7x7 conv, alpha 0.1" in md
    assert "Table 1: Baseline; Table 2: Baseline (alpha 0)" in md
    assert slides_row("blurnet_learned7", "black_box") == ""  # the slides print its white-box row only
    assert slides_row("fnc", "white_box") == ""
    other = rows([("none", "white_box"), ("fnc", "white_box")])
    assert "slides' row" not in _markdown(other, summarise(other, 40), classes, r, 40)


def test_a_difference_on_the_same_victims_is_read_from_a_paired_bootstrap():
    """A filter that fools the baseline's 10 victims and 6 more (0.40 against 0.25 of 40):
    the two Wilson intervals overlap, but every victim's difference is >= 0, so the paired
    interval over the victims lies above 0: "higher"; the difference is the difference of the
    means, and a filter fooling other victims at the same rate is "within noise"."""
    import pandas as pd

    from pipeline.stickers import summarise

    def row(d, rate):
        return {"defense": d, "setting": "white_box" if d == "none" else "black_box", "target": 5, "seed": 0,
                "clean_accuracy": 1.0, "fooling_rate": rate, "target_success": 0.0,
                "target_success_transformed": 0.0, "l2_dissimilarity": 0.2}

    base = torch.zeros(40)
    base[:10] = 1
    more, other = base.clone(), torch.zeros(40)
    more[10:16] = 1
    other[30:40] = 1
    rows = pd.DataFrame([row("none", 0.25), row("blur", 0.40), row("other", 0.25)])
    fooled = {("none", "white_box"): base, ("blur", "black_box"): more, ("other", "black_box"): other}
    unpaired = summarise(rows, 40)
    assert unpaired["blur"]["black_box"]["fooling_rate_mean_vs_none"] == "within noise"
    s = summarise(rows, 40, fooled)
    blur = s["blur"]["black_box"]
    assert blur["fooling_rate_mean_diff"] == pytest.approx(0.15)
    assert 0 < blur["fooling_rate_mean_diff_ci_low"] < 0.15 < blur["fooling_rate_mean_diff_ci_high"]
    assert blur["fooling_rate_mean_vs_none"] == "higher"
    assert s["other"]["black_box"]["fooling_rate_mean_vs_none"] == "within noise"
    assert s["other"]["black_box"]["fooling_rate_mean_diff"] == pytest.approx(0.0)
    assert "fooling_rate_mean_diff" not in s["none"]["white_box"]
    from types import SimpleNamespace

    from pipeline.render.rp2 import markdown as _markdown

    r, classes = SimpleNamespace(true_class=14), [f"class {i}" for i in range(43)]
    rows["seconds"] = 1.0
    assert "paired bootstrap" in _markdown(rows, s, classes, r, 40)  # the header says how it was read
    header = _markdown(rows, unpaired, classes, r, 40)
    assert "paired bootstrap" not in header and "Wilson intervals do not overlap" in header


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


def test_white_box_limits_the_optimised_stickers_and_keeps_every_black_box_row(project):
    """``rp2.white_box: [none]``: stickers are made on the undefended model only (2 targets),
    and every defended model of ``rp2.defenses`` still gets its black-box rows."""
    stage, tmp = project["stage"], project["dir"]
    stage.main(load_params(_params(tmp, white_box=["none"])))
    assert project["calls"] == [2]  # one task per (none, target, seed), none on fnc
    rows = json.loads((tmp / "metrics/rp2.json").read_text())["stickers"]
    assert {(r["defense"], r["setting"]) for r in rows} == {("none", "white_box"), ("fnc", "black_box")}
    assert {r["source"] for r in rows} == {"none"}


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
        ({"white_box": ["fnc"]}, "rp2.white_box"),
        ({"white_box": ["none", "blurnet3"]}, "rp2.white_box"),
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
    """Tasks run serially (as here) call node_id(); it must not start a local Ray instance.
    In a fresh interpreter, so that a Ray instance an earlier test left connected in this
    process cannot hide the fault (or skip the test)."""
    import subprocess
    import sys

    code = ("import ray; from pipeline.distributed import node_id; "
            "assert node_id() == 'local', node_id(); assert not ray.is_initialized(), 'node_id() started Ray'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_stage_fans_out_one_ray_task_per_sticker(tmp_path, monkeypatch, ray_local):
    """The stage's own Ray fan-out (no serial stand-in) on a real local Ray instance: a
    tiny profile (the traffic-sign CNN, undefended and BlurNet 3x3, one target, one seed,
    2 RP2 steps) makes one sticker per (defense, target, seed) in a Ray task each, and its
    metrics count the 40 victims."""
    import mlflow
    import ray

    import stages.attack_rp2 as stage

    _gtsrb_workdir(tmp_path, monkeypatch)
    blur = [{"name": "blurnet", "kernel": "box", "size": 3}]
    for name, defenses in (("baseline", None), ("blurnet3", blur)):
        model = build_model("traffic_cnn", N_CLASSES, [0.5] * 3, [0.25] * 3)
        save_checkpoint(model_spec("traffic_cnn", N_CLASSES, [0.5] * 3, [0.25] * 3, model.state_dict(), defenses),
                        f"models/traffic_cnn/{name}.pt")
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["dataset"] = "gtsrb"
    raw["model"]["name"] = "traffic_cnn"
    raw["patch"]["target"] = 5
    raw["defended"] = ["blurnet3"]
    raw["blurnet3"] = {"init": "scratch", "defenses": blur, "train": {}}
    raw["evaluate"]["defenses"] = raw["analysis"]["defenses"] = ["none", "blurnet3"]
    attack = {"steps": 2, "eot_samples": 1, "lr": 0.1}
    raw["rp2"] = {"enabled": True, "victims": str(RP2_DIR), "targets": [5], "seeds": [0],
                  "defenses": ["none", "blurnet3"], "eval_transforms": 2, "attack": attack}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(tmp_path / "params.yaml")

    from pipeline import cached

    fanned = []
    real_map = cached.ray_map

    def recording_map(fn, items, **kw):
        """The stage's ray_map, its task also reporting the process it ran in (a closure:
        cloudpickle sends it by value to the Ray workers)."""
        fanned.append((fn.__name__, len(items)))

        def with_pid(item):
            import os

            return {**fn(item), "pid": os.getpid()}

        return real_map(with_pid, items, **kw)

    monkeypatch.setattr(cached, "ray_map", recording_map)
    stage.main(params)

    assert fanned == [("rp2_task", 2)]  # one Ray task per (defense, target, seed): 2 x 1 x 1
    stickers = sorted(p.relative_to(tmp_path / "rp2/traffic_cnn").as_posix()
                      for p in (tmp_path / "rp2/traffic_cnn").rglob("*.pt"))
    assert stickers == ["blurnet3/target_5_seed_0.pt", "none/target_5_seed_0.pt"]
    m = json.loads((tmp_path / "metrics/rp2.json").read_text())
    assert m["enabled"] and m["n_victims"] == 40 and m["targets"] == [5] and m["true_class"] == 14
    rows = m["stickers"]
    assert sorted((r["defense"], r["setting"], r["source"]) for r in rows) == [
        ("blurnet3", "black_box", "none"), ("blurnet3", "white_box", "blurnet3"), ("none", "white_box", "none")]
    assert all(r["target"] == 5 and r["seed"] == 0 for r in rows)
    assert {d: {s: v["n_stickers"] for s, v in by.items()} for d, by in m["summary"].items()} == {
        "none": {"white_box": 1}, "blurnet3": {"white_box": 1, "black_box": 1}}
    check_rows_against_the_saved_stickers(tmp_path, rows, attack, transforms=2, arch="traffic_cnn")

    # the tasks ran in Ray worker processes of this instance, 2 steps each (their cached results say so)
    node = ray.get_runtime_context().get_node_id()
    cached = [torch.load(p, weights_only=False) for p in (tmp_path / ".cache/attack_rp2").rglob("sticker.pt")]
    assert len(cached) == 2
    for res in cached:
        assert res["pid"] != os.getpid() and res["node_id"] == node and len(res["history"]["loss"]) == 2
    run = mlflow.search_runs(experiment_names=[params.mlflow.experiment], output_format="list")[0]
    assert run.data.tags["node_ids"] == node and run.data.tags["attack"] == "rp2"


def test_sticker_figure_shows_one_seed_per_model_and_target(monkeypatch):
    """Three seeds of each (model, target) would triple the figure's height: it shows the first seed only."""
    import types

    from pipeline.render import rp2 as render

    shown = {}
    monkeypatch.setattr(render, "save_figure", lambda fig, path, dpi: shown.update(fig=fig))
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:4, 2:4] = 1
    done = {(source, target, seed): {"delta": torch.full((3, 8, 8), 0.1 * (seed + 1))}
            for source in ("none", "fnc") for target in (5, 1) for seed in (2, 0, 1)}
    models = {source: (lambda x: torch.zeros(len(x), 3)) for source in ("none", "fnc")}
    cfgs = {t: types.SimpleNamespace(sticker_fill=None) for t in (5, 1)}
    victims = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    render.stickers_figure(models, victims, mask, done, cfgs, ["a", "b", "c"], types.SimpleNamespace(true_class=0),
                           Path("x.png"))
    titles = [ax.get_title() for ax in shown["fig"].axes if "|delta|" in ax.get_title()]
    assert len(titles) == 4  # 2 models x 2 targets, one row each
    assert all("seed 0" in t for t in titles)
