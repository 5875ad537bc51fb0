"""Extending the library is one new file: the recipes of docs/architecture.md, exercised.

Each test copies the ``pipeline`` package into a temporary folder, adds the one file the
recipe names, and runs the library from that copy in a fresh interpreter (so the new
module is found by the package's own discovery, as it would be in a user's checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TOY_LOSS = '''
"""A toy patch loss for the test: twice AdvP's."""

from pipeline.attacks.patch_losses import register_patch_loss
from pipeline.attacks.patch_losses.advp import advp


@register_patch_loss("toy_double", "twice the AdvP loss (a test of the one-file recipe)")
def toy_double(logits, labels, target):
    return 2 * advp(logits, labels, target)
'''


def _run(tmp: Path, script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_patch_loss_is_one_file(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pipeline" / "attacks" / "patch_losses" / "toy_double.py").write_text(TOY_LOSS)
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["root"] = str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg")
    raw["patch"]["attacks"] = ["advp", "toy_double"]
    raw["evaluate"]["attacks"] = ["none", "advp", "toy_double", "toy_double_adaptive"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    got = _run(tmp_path, """
        import json, torch
        import pipeline
        from pipeline.config import load_params
        from pipeline.attacks.patch import PatchTrainingConfig, train_universal_patch

        assert pipeline.__file__.startswith(HERE), pipeline.__file__  # the copy, with the new file
        params = load_params("params.yaml")
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                    torch.nn.Linear(4, 10))
        x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 5, (16,))
        runs = {a: train_universal_patch(model, x, y, PatchTrainingConfig(side=6, attack=a, epochs=3, batch_size=8,
                                                                          decay_epochs=()), seed=1)
                for a in ("advp", "toy_double")}
        print(json.dumps({"attacks": params.patch.attacks, "cells": params.evaluate.attacks,
                          "same_patch": bool(torch.equal(runs["advp"][0], runs["toy_double"][0])),
                          "moved": float((runs["advp"][0]).abs().sum()),
                          "history": {a: h for a, (_, h) in runs.items()}}))
    """.replace("HERE", repr(str(tmp_path))))
    assert got["attacks"] == ["advp", "toy_double"] and "toy_double_adaptive" in got["cells"]
    # signed-gradient steps: twice the loss has the same signs, so the same patch; the loss it reports is doubled
    assert got["same_patch"] and got["moved"] > 0
    for a, b in zip(got["history"]["advp"], got["history"]["toy_double"], strict=True):
        assert b == pytest.approx(2 * a, rel=1e-5)


def test_without_the_file_the_loss_is_unknown_with_the_fix_named(tmp_path):
    from pipeline.config import ParamsError, load_params

    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["root"] = str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg")
    raw["patch"]["attacks"] = ["advp", "toy_double"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    try:
        load_params(tmp_path / "params.yaml")
    except ParamsError as exc:
        assert "toy_double" in str(exc) and "pipeline/attacks/patch_losses" in str(exc)
    else:
        raise AssertionError("an unregistered patch loss was accepted")
