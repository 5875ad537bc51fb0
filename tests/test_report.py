"""The report stage: the papers' numbers beside ours with the difference, 'not published'
where a paper prints nothing, the BlurNet tables from attack_rp2's summary, and an HTML
rendering with the figures embedded."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _write(path: str, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))


def _project(tmp_path: Path, monkeypatch, profile: str) -> None:
    """Work in ``tmp_path`` with ``params/<profile>.yaml`` as params.yaml and a private MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())
    raw["data"]["root"] = str(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(raw))


def _table_with(md: str, column: str) -> dict[str, dict[str, str]]:
    """The markdown table whose header has ``column``: first cell -> {header: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and column in line)
    cells = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, rows = cells[0], cells[2:]  # the second line is the separator
    return {r[0]: dict(zip(header, r, strict=True)) for r in rows}


def test_report_puts_ours_beside_the_papers(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, "smoke")
    cell = {"clean_accuracy": 0.8, "robust_accuracy": 0.5, "attack_success_rate": 0.3, "n_images": 900}
    _write("metrics/evaluate.json", {"resnet20": {
        "none": {"none": {"clean_accuracy": 0.8, "n_images": 1000}, "advp": cell},
        "fnc": {"none": {"clean_accuracy": 0.75, "n_images": 1000},
                "advp": {**cell, "robust_accuracy": 0.6, "robust_accuracy_ci_low": 0.55, "robust_accuracy_ci_high": 0.65},
                "advp_adaptive": {**cell, "robust_accuracy": 0.4}, "advp_bpda": {**cell, "robust_accuracy": 0.4},
                "per_image_worst": {"robust_accuracy": 0.05, "robust_accuracy_ci_low": 0.02,
                                    "robust_accuracy_ci_high": 0.1, "n_images": 200, "worst_attack": "autoattack",
                                    "attacks": "pgd,autoattack"}}}})
    _write("metrics/train_baseline.json", {"clean_accuracy": 0.8, "epochs": 6})
    _write("metrics/train_defended/fnc.json", {"clean_accuracy": 0.75})
    summary = {"clean_accuracy": 0.9, "fooling_rate_mean": 0.5, "fooling_rate_mean_ci_low": 0.35,
               "fooling_rate_mean_ci_high": 0.65, "fooling_rate_worst": 0.8, "fooling_rate_worst_ci_low": 0.65,
               "fooling_rate_worst_ci_high": 0.9, "worst_target": 5, "target_success_mean": 0.3,
               "target_success_transformed_mean": 0.2, "l2_dissimilarity_mean": 0.1, "n_stickers": 3, "n_victims": 40}
    _write("metrics/rp2.json", {"enabled": True, "targets": [5, 1, 38], "summary": {
        "none": {"white_box": summary},
        "blurnet5": {"black_box": {**summary, "fooling_rate_mean": 0.25, "fooling_rate_mean_ci_low": 0.14,
                                   "fooling_rate_mean_ci_high": 0.4, "fooling_rate_mean_vs_none": "within noise"}},
        "blurnet3": {"black_box": {**summary, "fooling_rate_mean": 0.15, "fooling_rate_mean_ci_low": 0.07,
                                   "fooling_rate_mean_ci_high": 0.29, "fooling_rate_mean_vs_none": "lower"}}}})
    Path("plots").mkdir()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig("plots/evaluate.png")
    import stages.report as stage

    stage.main(load_params("params.yaml"))
    md = Path("reports/report.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    row = next(r for r in rows if r[:2] == ["accuracy under AdvP (transferred)", "fnc"])
    assert row[2:5] == ["69.98 %", "60.00 % [55.0, 65.0]", "-9.98 pt"]  # paper, ours with its interval, difference
    row = next(r for r in rows if r[:2] == ["accuracy under AdvP (adaptive)", "fnc"])
    assert row[2:4] == ["not published", "40.00 %"]
    # the defense-suite matrix: every patch cell with its success rate, the worst one named
    suite = _table_with(md, "worst case under a patch (attack)")
    header = list(suite["fnc"])
    assert suite["none"]["advp transferred: robust / success"] == "50.00 % / 30.00 %"
    assert suite["fnc"]["advp transferred: robust / success"] == "60.00 % [55.0, 65.0] / 30.00 %"
    assert suite["fnc"]["worst case under a patch (attack)"] == "40.00 % (advp_adaptive)"  # a tie: the first kind
    assert "lavan adaptive: robust / success" not in header  # listed in the profile, not in the metrics
    pgd_images = load_params("params.yaml").attack_params("pgd")["n_images"]
    assert suite["fnc"][f"PGD-10 (n={pgd_images})"] == ""  # no cell: a missing value is never invented
    assert suite["fnc"]["per-image worst case (n=200)"] == "5.00 % [2.0, 10.0] (autoattack)"
    assert suite["none"]["per-image worst case (n=200)"] == ""
    assert "no attack of PGD's threat model (pgd, autoattack) fools it" in md
    assert suite["fnc"]["clean drop"] == "5.00 pt"  # 80 % -> 75 %: not above report.max_clean_drop (5 pt)
    # the patch masking check: the adaptive patch succeeds as often as the transferred one
    assert suite["fnc"]["gradient masking"] == "not suspected"
    black = next(r for r in rows if r[0] == "blurnet5")  # the slides' 5x5 row, black box
    assert "17.50 %" in black and "+7.50 pt" in black
    assert "25.00 % [14.0, 40.0]" in black and "within noise" in black  # [14, 40] overlaps the baseline's [35, 65]
    assert "lower" in next(r for r in rows if r[0] == "blurnet3")  # [7, 29] lies below it
    assert "![the evaluation matrix" in md
    page = Path("reports/report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page and "<table" in page


def test_defense_matrix_marks_clean_cost_masking_and_robust_above_clean(tmp_path, monkeypatch):
    """A defense that loses clean accuracy is marked, one whose adaptive patch is weaker than the
    transferred one is 'masking suspected', and accuracy above clean is never read as robustness."""
    _project(tmp_path, monkeypatch, "smoke")
    cell = {"clean_accuracy": 0.8, "robust_accuracy": 0.1, "attack_success_rate": 0.8, "attack_success_rate_std": 0.0,
            "n_images": 900}
    weak = {**cell, "clean_accuracy": 0.5, "robust_accuracy": 0.6, "attack_success_rate": 0.05}
    _write("metrics/evaluate.json", {"resnet20": {
        "none": {"none": {"clean_accuracy": 0.8, "n_images": 1000}, "advp": cell},
        "fnc": {"none": {"clean_accuracy": 0.5, "clean_accuracy_ci_low": 0.47, "clean_accuracy_ci_high": 0.53,
                         "n_images": 1000},
                "advp": {**weak, "attack_success_rate": 0.25}, "advp_adaptive": weak, "advp_bpda": weak,
                "advp_worst": {**weak, "robust_accuracy": 0.55, "worst_attack": "advp"}}}})
    _write("metrics/train_baseline.json", {"clean_accuracy": 0.8, "epochs": 6})
    import stages.report as stage

    stage.main(load_params("params.yaml"))
    md = Path("reports/report.md").read_text()
    fnc = _table_with(md, "worst case under a patch (attack)")["fnc"]
    assert fnc["clean drop"] == "30.00 pt (marked)"
    assert fnc["clean (n=1000)"] == "50.00 % [47.0, 53.0]"
    assert fnc["worst case under a patch (attack)"] == "55.00 % (advp: advp)"
    assert fnc["gradient masking"] == "suspected: a"  # adaptive success 5 % against 25 % transferred
    assert "more accurate under the patch than clean" in md and "30.0 pt below the undefended" in md
    checks = _table_with(md, "reference_label")["fnc"]
    assert checks["check"] == "a" and checks["passed"] == "False" and checks["verdict"] == "suspected: a"


def test_imagenet_fnc_rows_are_marked_not_published_and_ifnr_uses_resnet50_stages(tmp_path, monkeypatch):
    """On ImageNet the seeds print none of FNC's numbers (no CIFAR-10 figure is borrowed), and for
    ResNet-50 the IFNR table reads the paper's own stages: bottleneck blocks 3, 7, 13 and 16."""
    _project(tmp_path, monkeypatch, "fnc-imagenet-reduced")
    cell = {"clean_accuracy": 0.7, "robust_accuracy": 0.5, "attack_success_rate": 0.3, "n_images": 999}
    _write("metrics/evaluate.json", {"resnet50": {
        "none": {"none": {"clean_accuracy": 0.76, "n_images": 1000}, "advp": cell},
        "fnc": {"none": {"clean_accuracy": 0.7, "n_images": 1000}, "advp": {**cell, "robust_accuracy": 0.6}}}})
    _write("metrics/train_baseline.json", {"clean_accuracy": 0.76, "epochs": 0})
    folder = Path("analysis/resnet50/feature_norms")
    folder.mkdir(parents=True)
    lines = ["depth,defense,ifnr_mean,n_images"] + [f"{k},{d},{k / 10 + (d == 'fnc')},50"
                                                     for d in ("none", "fnc") for k in range(1, 17)]
    (folder / "ifnr.csv").write_text("\n".join(lines) + "\n")
    import stages.report as stage

    stage.main(load_params("params.yaml"))
    md = Path("reports/report.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    row = next(r for r in rows if r[:2] == ["accuracy under AdvP (transferred)", "fnc"])
    assert row[2:5] == ["not published", "60.00 %", ""]
    ifnr = {r[1]: r for r in rows if r[1] in ("conv2_3", "conv3_4", "conv4_6", "conv5_3")}
    assert [ifnr[s][3] for s in ("conv2_3", "conv3_4", "conv4_6", "conv5_3")] == ["3 of 16", "7 of 16", "13 of 16",
                                                                                 "16 of 16"]
    assert ifnr["conv3_4"][2] == "1.80" and ifnr["conv3_4"][4:6] == ["0.70", "1.70"]
    assert "the same network and dataset" in md


def test_prm_table_reads_the_iou_of_the_pixel_robustness_analysis(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, "prm-cifar10-reduced")
    _write("metrics/evaluate.json", {"resnet20": {
        "none": {"none": {"clean_accuracy": 0.9, "n_images": 1000}, "pgd": {"robust_accuracy": 0.0}},
        "prm": {"none": {"clean_accuracy": 0.8, "n_images": 1000}, "pgd": {"robust_accuracy": 0.125}}}})
    _write("metrics/train_baseline.json", {"clean_accuracy": 0.9, "epochs": 30})
    _write("metrics/rp2.json", {"enabled": False})
    out = Path("analysis/resnet20/pixel_robustness")
    out.mkdir(parents=True)
    (out / "accuracy_vs_k.csv").write_text("defense,which,k,accuracy,n_images,ci_low,ci_high\n"
                                           "none,top,0.25,0.1,100,0.055,0.174\nprm,top,0.25,0.3,100,0.219,0.396\n")
    (out / "prm_iou.csv").write_text("defense,prm_iou,random_set_iou\nprm,0.6123,0.142857\n")
    import stages.report as stage

    stage.main(load_params("params.yaml"))
    md = Path("reports/report.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    header = next(r for r in rows if "IoU of a random set" in r)
    row = dict(zip(header, next(r for r in rows if r[0] == "prm" and len(r) == len(header)), strict=True))
    assert row["clean"] == "80.00 %" and row["PGD"] == "12.50 %"
    k_row = next(r for r in rows if r[0] == "0.25")  # masked PGD's accuracy per k, with its interval
    assert k_row[1:] == ["10.00 [5.5, 17.4]", "30.00 [21.9, 39.6]"]
    assert "on 100 test images, '[a, b]' its 95 % Wilson interval" in md
    assert row["IoU (top gradient pixels, designated set)"] == "0.612" and row["IoU of a random set"] == "0.143"
    assert row["paper"] == "not published"
