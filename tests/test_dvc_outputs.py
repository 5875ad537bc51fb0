"""What DVC prints: the headline metrics, the evaluate chart's rows and figure, and
dvc.yaml's top-level ``metrics:`` / ``plots:`` read by ``dvc metrics show`` and
``dvc plots show`` in a small project laid out as the stages write it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import matrix
from pipeline.config import load_params
from pipeline.render import evaluate as render

ROOT = Path(__file__).resolve().parents[1]


def _cell(clean: float, robust: float | None = None, n: int = 100) -> dict:
    return {"clean_accuracy": clean, "n_images": n} | ({} if robust is None else {"robust_accuracy": robust})


def _table() -> dict[str, dict[str, dict]]:
    return {
        "none": {"none": _cell(0.9, n=1000), "advp": _cell(0.9, 0.5, 900), "advp_adaptive": _cell(0.9, 0.4, 900),
                 "pgd": _cell(0.88, 0.1, 200), "autoattack": _cell(0.88, 0.05, 200),
                 "one_pixel": _cell(0.93, 0.6, 30), "advp_worst": _cell(0.9, 0.4, 900),
                 "per_image_worst": _cell(0.88, 0.04, 200)},
        "fnc": {"none": _cell(0.8, n=1000), "advp": _cell(0.8, 0.7, 900), "advp_adaptive": _cell(0.8, 0.3, 900),
                "pgd": _cell(0.79, 0.02, 200), "autoattack": _cell(0.79, 0.01, 200),
                "one_pixel": _cell(0.9, 0.5, 40), "advp_worst": _cell(0.8, 0.3, 900),
                "per_image_worst": _cell(0.79, 0.005, 200)},
    }


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


def test_headline_is_clean_worst_patch_autoattack_and_per_image_worst_per_defense(params):
    assert params.patch.attacks[0] == "advp"
    h = matrix.headline(_table(), params)
    assert h == {"none": {"clean_accuracy": 0.9, "advp_worst": 0.4, "autoattack": 0.05, "per_image_worst": 0.04},
                 "fnc": {"clean_accuracy": 0.8, "advp_worst": 0.3, "autoattack": 0.01, "per_image_worst": 0.005}}
    assert list(h["fnc"]) == ["clean_accuracy", "advp_worst", "autoattack", "per_image_worst"]  # dvc exp show's order
    no_worst = {d: {a: c for a, c in row.items() if a != "per_image_worst"} for d, row in _table().items()}
    assert matrix.headline(no_worst, params)["fnc"] == {"clean_accuracy": 0.8, "advp_worst": 0.3, "pgd": 0.02,
                                                       "autoattack": 0.01}  # PGD where nothing bounds it


def test_headline_without_a_worst_case_cell_or_per_image_attacks(params):
    """Only the transferred patch evaluated (no adaptive cell, so no worst case) and no PGD or
    AutoAttack: the headline has the patch cell itself and leaves the others out."""
    table = {d: {a: c for a, c in row.items() if a in ("none", "advp", "one_pixel")} for d, row in _table().items()}
    assert matrix.headline(table, params) == {"none": {"clean_accuracy": 0.9, "advp": 0.5},
                                             "fnc": {"clean_accuracy": 0.8, "advp": 0.7}}


def test_per_image_worst_combines_the_attacks_of_pgds_threat_model():
    """FGSM, AutoAttack and masked PGD at PGD's L-inf eps join; Mask-FGSM (twice the eps),
    DeepFool (no eps) and a targeted attack do not; without PGD there is no worst-case cell."""
    params = load_params(ROOT / "params" / "smoke.yaml")
    attacks = ["pgd", "fgsm", "mask_fgsm", "autoattack", "deepfool", "masked_pgd"]
    assert matrix.per_image_worst_attacks(attacks, params) == ["pgd", "fgsm", "autoattack", "masked_pgd"]
    params.attacks["fgsm"] = {**params.attack_params("fgsm"), "target": 3}
    assert "fgsm" not in matrix.per_image_worst_attacks(attacks, params)
    assert matrix.per_image_worst_attacks(["fgsm", "autoattack"], params) == []
    assert matrix.per_image_worst_attacks(["pgd", "deepfool"], params) == []


def _frame(table: dict) -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "defense": d, "attack": a, **m} for d, row in table.items()
                         for a, m in row.items()])


def test_attack_labels_name_the_images_of_each_attack():
    labels = render.attack_labels(_frame(_table()))
    assert labels["none"] == "clean (n=1000)" and labels["pgd"] == "pgd (n=200)"
    assert labels["one_pixel"] == "one_pixel (n=30/40)"  # the defenses' subsets differ


def test_accuracy_bars_clean_for_the_clean_cell_robust_otherwise():
    bars = render.accuracy_bars(_frame(_table()))
    assert list(bars.columns) == ["defense", "attack", "n_images", "accuracy", "label", "series"]
    row = bars.set_index(["defense", "attack"])
    assert row.loc[("fnc", "none"), "accuracy"] == 0.8 and row.loc[("fnc", "none"), "label"] == "clean (n=1000)"
    assert row.loc[("none", "advp_worst"), "accuracy"] == 0.4
    assert (bars["series"] == bars["defense"]).all()


@pytest.mark.parametrize("n", [1, 10, 18, 20, 21, 60, 75])
def test_distinct_colours_never_repeat(n):
    colours = render.distinct_colours(n)
    assert len(colours) == n and len({tuple(c)[:3] for c in colours}) == n


def test_figure_gives_every_attack_its_own_colour_and_its_images(params, monkeypatch):
    figures = []
    monkeypatch.setattr(render.plt, "close", figures.append)
    table = _table()
    for row in table.values():  # more attacks than the default colour cycle's 10: 8 cells + 8 extra
        row.update({f"extra{i}": _cell(0.9, 0.1 * i, 50) for i in range(8)})
    png = render.figure(_frame(table), "m", params)
    assert png.startswith(b"\x89PNG")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "clean (n=1000)" and "one_pixel (n=30/40)" in labels and "extra3 (n=50)" in labels
    colours = {tuple(c.patches[0].get_facecolor()) for c in ax.containers if hasattr(c, "patches") and c.patches}
    assert len(colours) == len(labels) == 16


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_dvc_yaml_lists_the_headline_alone_and_only_files_as_plots():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert spec["metrics"] == ["metrics/headline.json"]
    for name, st in spec["stages"].items():  # a stage's plots would be folders and notes too
        body = st.get("do", st)
        assert "plots" not in body and "metrics" not in body, name
    for entry in spec["plots"]:
        path, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if path.endswith(".png"):
            continue
        assert {"x", "y", "title", "x_label", "y_label"} <= set(props), path
        template = props.get("template")
        assert template is None or (ROOT / ".dvc" / "plots" / f"{template}.json").is_file(), path


def _write_outputs(d: Path) -> None:
    """The plots and the headline in the columns the stages write them (two defenses)."""
    a = d / "analysis" / "resnet20"
    rows = {
        "plots/evaluate_accuracy.csv": render.accuracy_bars(_frame(_table())),
        "plots/train_baseline.csv": pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.5], "train_accuracy": [0.2, 0.4],
                                                  "test_accuracy": [0.3, 0.5], "lr": [0.1, 0.01]}),
        "plots/train_defended/madry.csv": pd.DataFrame({"epoch": [0], "train_loss": [2.0], "train_accuracy": [0.2],
                                                        "test_accuracy": [0.3], "lr": [0.1]}),
        "plots/patch_loss.csv": pd.DataFrame([{"attack": t, "seed": s, "epoch": e, "loss": 3.0 - e,
                                               "series": f"{t} seed {s}"}
                                              for t in ("advp", "lavan") for s in (0, 1) for e in range(3)]),
    }
    for defense in ("none", "fnc"):
        rows.setdefault("ifnr", []).extend({"defense": defense, "block": f"b{i}", "depth": i, "ifnr_mean": 3.0 / i,
                                            "ifnr_std": 0.1, "n_images": 10, "series": defense} for i in (1, 2, 3))
        rows.setdefault("k", []).extend({"defense": defense, "k": k, "which": w, "n_pixels": 1, "accuracy": 0.5 - k / 4,
                                         "n_images": 10, "series": f"{defense}, {w} k"}
                                        for w in ("top", "bottom") for k in (0.1, 0.5, 1.0))
        rows.setdefault("hist", []).extend({"defense": defense, "restart": r, "iteration": t, "loss": 1.0 + t,
                                            "series": defense, "line": r} for r in (0, 1) for t in range(3))
        rows.setdefault("conf", []).extend({"defense": defense, "distance": x, "confidence": 0.5, "clean_confidence": 0.6,
                                            "series": defense} for x in (0.0, 4.0))
        rows.setdefault("eps", []).extend({"defense": defense, "eps": e / 255, "robust_accuracy": 0.5 - e / 128,
                                           "ci_low": 0.0, "ci_high": 1.0, "n_images": 10, "eps_255": e, "series": defense}
                                          for e in (0.0, 8.0, 64.0))
    tables = {"feature_norms/ifnr.csv": "ifnr", "pixel_robustness/accuracy_vs_k.csv": "k",
              "loss_landscape/loss_history.csv": "hist", "gradcam_distance/confidence_vs_distance.csv": "conf",
              "masking/eps_sweep.csv": "eps"}
    for rel, key in tables.items():
        rows[str(a.relative_to(d) / rel)] = pd.DataFrame(rows.pop(key))
    for rel, df in rows.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(d / rel, index=False)
    for rel in ("plots/evaluate.png", "plots/fnc_tradeoff.png", "feature_norms/ifnr.png",
                "pixel_robustness/pixel_robustness.png",
                "loss_landscape/loss_landscape.png", "gradcam_distance/confidence_vs_distance.png",
                "masking/eps_sweep.png"):
        path = d / rel if rel.startswith("plots/") else a / rel
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    (a / "spectrum").mkdir()
    (a / "spectrum" / "README.md").write_text("a note, not a plot\n")
    (d / "metrics").mkdir()
    (d / "metrics" / "headline.json").write_text(json.dumps({"none": {"clean_accuracy": 0.9, "advp_worst": 0.4}}))
    (d / "metrics" / "evaluate.json").write_text(json.dumps({"resnet20": _table()}))


def _titles(spec: dict) -> list[tuple[str, str]]:
    """(channel, title) of every x / y encoding in a Vega-Lite spec, its layers included."""
    out = []
    for part in [spec, *spec.get("layer", [])]:
        for channel in ("x", "y"):
            if channel in part.get("encoding", {}):
                out.append((channel, part["encoding"][channel].get("title")))
    return out


def test_dvc_plots_and_metrics_show_in_a_project_laid_out_as_the_stages_write_it(tmp_path):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"], params["defended"] = "resnet20", ["madry"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert _dvc(tmp_path, "init", "--no-scm", "-q").returncode == 0
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    _write_outputs(tmp_path)

    out = _dvc(tmp_path, "plots", "show", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]  # the spectrum note is no plot
    assert "failed to load" not in out.stderr
    charts = {name: p["content"] for name, plots in shown["data"].items() for p in plots if p["type"] == "vega"}
    a = "analysis/resnet20/"
    assert set(charts) == {"plots/evaluate_accuracy.csv", "plots/train_baseline.csv", "plots/train_defended/madry.csv",
                           "plots/patch_loss.csv", a + "feature_norms/ifnr.csv", a + "pixel_robustness/accuracy_vs_k.csv",
                           a + "loss_landscape/loss_history.csv", a + "gradcam_distance/confidence_vs_distance.csv",
                           a + "masking/eps_sweep.csv"}
    images = {name for name, plots in shown["data"].items() for p in plots if p["type"] == "image"}
    assert "plots/evaluate.png" in images and a + "masking/eps_sweep.png" in images
    for name, spec in charts.items():
        titles = dict(_titles(spec))
        assert set(titles) == {"x", "y"} and all(titles.values()), (name, titles)
        assert "step" not in titles.values() and spec["title"]["text"], name  # never the row number
    bars = charts["plots/evaluate_accuracy.csv"]
    assert bars["mark"]["type"] == "bar" and bars["encoding"]["y"]["field"] == "label"
    assert bars["encoding"]["color"]["field"] == "series"
    seeds = {row["series"] for row in charts["plots/patch_loss.csv"]["data"]["values"]}
    assert seeds == {"advp seed 0", "advp seed 1", "lavan seed 0", "lavan seed 1"}  # a line each, not one zigzag

    out = _dvc(tmp_path, "metrics", "show")
    assert out.returncode == 0, out.stderr
    assert "metrics/headline.json" in out.stdout and "metrics/evaluate.json" not in out.stdout
    assert max(map(len, out.stdout.splitlines())) < 120
    full = _dvc(tmp_path, "metrics", "show", "metrics/evaluate.json", "--json")
    assert full.returncode == 0 and "robust_accuracy" in full.stdout  # the matrix, on request
