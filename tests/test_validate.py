"""A bad params.yaml never costs finished work: ``dvc repro`` stops at the ``validate``
stage, before DVC deletes any stage's outputs, with one line naming the key."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import validate as validate_mod
from pipeline.config import ParamsError

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"
GUARDED = ("models", "patches", "metrics", "data/prepared")


def _smoke_params() -> dict:
    params = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    params["data"]["root"] = str(SHARED_CIFAR)
    return params


def _write(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.mark.skipif(not (SHARED_CIFAR / "train.zip").is_file(), reason="the shared CIFAR-10 archives")
def test_the_command_accepts_the_smoke_profile_and_writes_the_stamp(tmp_path, capsys):
    path = _write(tmp_path / "params.yaml", _smoke_params())
    stamp = tmp_path / "validate" / "params.ok"
    assert validate_mod.main([str(path), "--stamp", str(stamp)]) == 0
    assert stamp.read_text() == validate_mod.STAMP_TEXT


def test_the_stamp_does_not_depend_on_the_values(tmp_path):
    """Downstream stages depend on the stamp: its bytes must be the same for any valid file."""
    params = _smoke_params()
    params["data"]["root"] = str(tmp_path)
    params["data"]["download"] = True  # CIFAR-10 may be downloaded: valid without data on disk
    stamps = []
    for alpha in (1.0, 1.2):
        params["fnc"]["alpha"] = alpha
        path = _write(tmp_path / f"p{alpha}.yaml", params)
        stamp = tmp_path / f"s{alpha}"
        assert validate_mod.main([str(path), "--stamp", str(stamp)]) == 0
        stamps.append(stamp.read_bytes())
    assert stamps[0] == stamps[1]


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["data"].update(root=""), "data.root is empty"),
    (lambda p: p["data"].update(root="/nonexistent/cifar"), "/nonexistent/cifar does not exist"),
    (lambda p: p["rp2"].update(enabled=True, true_class=3, victims="/nonexistent/rp2"), "rp2.victims"),
])
def test_paths_on_disk_are_checked(tmp_path, capsys, edit, needle):
    params = _smoke_params()
    edit(params)
    path = _write(tmp_path / "params.yaml", params)
    with pytest.raises(ParamsError, match=needle):
        validate_mod.validate(path)
    assert validate_mod.main([str(path), "--stamp", str(tmp_path / "stamp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: validate:") and needle in err[0]
    assert not (tmp_path / "stamp").exists()


def _digest(work: Path) -> dict[str, str]:
    out = {}
    for folder in GUARDED:
        for f in sorted((work / folder).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(work))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def _set(path: str, value):
    def edit(p: dict) -> None:
        *parents, key = path.split(".")
        node = p
        for k in parents:
            node = node.setdefault(k, {})
        node[key] = value
    return edit


BAD_PARAMS = [  # (what, edit of the params dict or None for a text edit, text appended, what the error names)
    ("unknown top-level key", _set("bogus_key", 1), None, "bogus_key"),
    ("unknown nested key", _set("train.epochz", 3), None, "train.epochz"),
    ("wrong type", _set("train.epochs", "many"), None, "train.epochs"),
    ("negative fnc.alpha", _set("fnc.alpha", -1), None, "fnc.alpha"),
    ("patch.area_fraction 1.5", _set("patch.area_fraction", 1.5), None, "patch.area_fraction"),
    ("unknown model", _set("model.name", "resnet999"), None, "model.name"),
    ("empty data.root", _set("data.root", ""), None, "data.root"),
    ("YAML syntax error", None, "bad: [1, 2\n", "line"),
    ("unknown attack", lambda p: p["evaluate"]["attacks"].append("nope"), None, "nope"),
    ("defended name without a section", lambda p: p["defended"].append("foo"), None, "'foo'"),
]


@pytest.mark.parametrize("what, edit, text, needle", [b for b in BAD_PARAMS if b[1] is not None],
                         ids=[b[0] for b in BAD_PARAMS if b[1] is not None])
def test_each_bad_param_is_one_line_naming_it(tmp_path, capsys, what, edit, text, needle):
    """What validate says of each bad edit of the smoke profile: one line naming the key, exit 2,
    no stamp (the command dvc.yaml's validate stage runs)."""
    params = _smoke_params()
    edit(params)
    path = _write(tmp_path / "params.yaml", params)
    assert validate_mod.main([str(path), "--stamp", str(tmp_path / "stamp")]) == 2, what
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: validate:") and needle in err[0], (what, err)
    assert not (tmp_path / "stamp").exists()


IN_DVC = ("unknown nested key", "YAML syntax error", "defended name without a section")
"""The bad params also run through ``dvc repro`` (the rest are checked in-process above: CI time)."""


@pytest.mark.e2e
def test_bad_params_stop_dvc_repro_before_any_output_is_touched(smoke_project, tmp_path):
    work = tmp_path / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True)
    env = {**smoke_project["env"], "PYTHONPATH": str(work)}
    good = (work / "params.yaml").read_text()
    before = _digest(work)
    assert len(before) > 10, "the smoke project has outputs to guard"
    for what, edit, text, needle in (b for b in BAD_PARAMS if b[0] in IN_DVC):
        if edit is not None:
            params = yaml.safe_load(good)
            edit(params)
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        else:
            (work / "params.yaml").write_text(good + text)
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{what}: dvc repro accepted it:\n{log[-2000:]}"
        assert "Running stage 'validate'" in log or edit is None, f"{what}: another stage ran first:\n{log[-2000:]}"
        assert not [s for s in ("prepare", "train_baseline", "generate_patches", "evaluate")
                    if f"Running stage '{s}'" in log], f"{what}: a later stage ran:\n{log[-2000:]}"
        if edit is not None:  # our one line; a YAML syntax error is DVC's own message (file, line, column)
            ours = [line for line in log.splitlines() if line.startswith("error: validate:")]
            assert len(ours) == 1 and needle in ours[0], f"{what}: no one-line error naming {needle}:\n{log[-2000:]}"
        else:
            assert "params.yaml" in log and needle in log, log[-2000:]
        assert _digest(work) == before, f"{what}: outputs changed"
    # the params fixed: validate's stamp comes back with the same bytes and nothing else reruns
    (work / "params.yaml").write_text(good)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-2000:]
    ran = [line for line in log.splitlines() if line.startswith("Running stage")]
    assert ran in ([], ["Running stage 'validate':"]), log
    assert _digest(work) == before
