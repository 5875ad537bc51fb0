"""Params validation: every bad input stops with one line naming the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, mutate) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


PROFILES = ["params.yaml", *sorted(str(f.relative_to(ROOT)) for f in (ROOT / "params").glob("*.yaml"))]


@pytest.mark.parametrize("profile", PROFILES)
def test_shipped_profiles_are_valid(profile):
    p = load_params(ROOT / profile)
    assert p.fnc.alpha > 0 and 0 < p.patch.area_fraction < 1
    assert p.profile == Path(profile).stem or profile == "params.yaml"  # the MLflow tag names the file
    for name in p.defended:  # every defended model's section is there and valid
        p.defended_config(name)


@pytest.mark.parametrize("profile", [f for f in PROFILES if "smoke" not in f and "full" not in f and f != "params.yaml"])
def test_paper_profiles_state_their_compute_cost_and_how_to_run(profile):
    head = (ROOT / profile).read_text().split("\nprofile:")[0]
    assert "Compute" in head or "Cost" in head
    assert f"cp {profile} params.yaml" in head


def test_fraction_strings_are_budgets():
    p = load_params(ROOT / "params.yaml")
    assert p.patch.step_size == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda p: p["fnc"].update(alpha=-1.0), "fnc.alpha"),
        (lambda p: p["patch"].update(area_fraction=1.5), "patch.area_fraction"),
        (lambda p: p["patch"].update(area_fraction=0), "patch.area_fraction"),
        (lambda p: p["model"].update(name="resnet21"), "choose one of: densenet161, inception_v3"),
        (lambda p: p["evaluate"].update(defenses=["none", "blur"]), "unknown defense 'blur'"),
        (lambda p: p["fnc"].update(alhpa=1.0), "fnc.alhpa: unknown key"),
        (lambda p: p.update(extra_section={}), "extra_section: unknown key"),
        (lambda p: p["train"].update(epochs="many"), "train.epochs"),
        (lambda p: p["data"].pop("root"), "data.root: required key is missing"),
        (lambda p: p["patch"].update(target=10), "patch.target"),
        (lambda p: p["patch"].update(step_size="2/0"), "patch.step_size"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(tmp_path, mutate, expected):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, mutate))
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path):
    write(tmp_path, lambda p: p["fnc"].update(alpha=-1.0))
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"},
                          timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "fnc.alpha" in errors[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_missing_dataset_is_reported_before_any_work(tmp_path):
    write(tmp_path, lambda p: p["data"].update(root=str(tmp_path / "nowhere"), download=False))
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0"},
                          timeout=120)
    assert proc.returncode == 2
    assert "data.root" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_missing_user_checkpoint_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="model.checkpoint: no such file"):
        load_params(write(tmp_path, lambda p: p["model"].update(checkpoint=str(tmp_path / "mine.pt"))))


def test_attack_sections_are_validated_by_their_attack(tmp_path):
    def bad_eps(p):
        p["attacks"] = {"pgd": {"eps": "8/0"}}

    with pytest.raises(ParamsError, match=r"attacks\.pgd\.eps"):
        load_params(write(tmp_path, bad_eps))

    def unknown(p):
        p["attacks"] = {"pgdd": {}}

    with pytest.raises(ParamsError, match="unknown attack 'pgdd'.*pgd"):
        load_params(write(tmp_path, unknown))

    def fraction(p):
        p["attacks"] = {"pgd": {"eps": "8/255", "steps": 20}}

    assert load_params(write(tmp_path, fraction)).attack_params("pgd")["eps"] == pytest.approx(8 / 255)


def test_evaluated_patch_attack_must_be_generated(tmp_path):
    def lavan_not_made(p):
        p["patch"]["attacks"] = ["advp"]
        p["evaluate"]["attacks"] = ["none", "advp", "lavan"]

    with pytest.raises(ParamsError, match="lavan.*patch.attacks"):
        load_params(write(tmp_path, lavan_not_made))
