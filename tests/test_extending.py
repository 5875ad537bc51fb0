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

from tests import test_analyze_stage

ROOT = Path(__file__).resolve().parents[1]
project = test_analyze_stage.project  # the analysis recipe's tiny project

TOY_LOSS = '''
"""A toy patch loss for the test: twice AdvP's."""

from pipeline.attacks.patch_losses import register_patch_loss
from pipeline.attacks.patch_losses.advp import advp


@register_patch_loss("toy_double", "twice the AdvP loss (a test of the one-file recipe)")
def toy_double(logits, labels, target):
    return 2 * advp(logits, labels, target)
'''


TOY_ATTACK = '''
"""A toy per-image attack for the test: one signed-gradient step (FGSM, written again)."""

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.attacks.base import Attack, AttackParams, Budget, register_attack


class ToySignParams(AttackParams):
    eps: Budget = Field(8 / 255, description="L-inf step, pixel units of [0, 1]")


@register_attack("toy_sign")
class ToySign(Attack):
    Params = ToySignParams

    def perturb(self, model, x, y, generator):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
        return (x + self.params.eps * grad.sign()).clamp(0, 1).detach()
'''


TOY_DEFENSE = '''
"""A toy defense for the test: a learnable input gain with a training penalty pulling it to 0.5."""

import torch
from pydantic import Field
from torch import nn

from pipeline.defenses.base import DefenseParams, add_input_transform, register_defense


class ToyGain(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.weight = weight

    def forward(self, x):
        return (x * self.gain).clamp(0, 1)

    def training_penalty(self):
        return self.weight * (self.gain - 0.5) ** 2


class ToyGainParams(DefenseParams):
    weight: float = Field(1.0, ge=0)

    def trainable(self) -> bool:
        return True


@register_defense("toy_gain", ToyGainParams, "input", source="a test of the one-file recipe")
def apply_toy_gain(model, params):
    return add_input_transform(model, ToyGain(params.weight))
'''


TOY_ANALYSIS = '''
"""A toy analysis for the test: the mean top-1 confidence of each model on the test subset."""

import pandas as pd
import torch

from pipeline.analysis.base import Analysis, register_analysis
from pipeline.io import atomic_write


def compute(model, inputs, cfg):
    with torch.no_grad():
        confidence = model(inputs["x"].float() / 255).softmax(1).amax(1)
    return {"mean_confidence": float(confidence.mean()), "n_images": len(confidence)}


def write(results, out_dir, params, specs, inputs):
    df = pd.DataFrame([{"defense": d, "mean_confidence": r["mean_confidence"], "n_images": r["n_images"]}
                       for d, r in results.items()])
    atomic_write(out_dir / "confidence.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    return {f"{d}.mean_confidence": r["mean_confidence"] for d, r in results.items()}


register_analysis(Analysis("toy_confidence", compute=compute, write=write, source="a test of the recipe"))
'''


def _copy_package(tmp: Path) -> None:
    shutil.copytree(ROOT / "pipeline", tmp / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))


def _smoke_params(tmp: Path, edit) -> None:
    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["data"]["root"] = str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg")
    edit(raw)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))


def _run(tmp: Path, script: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_patch_loss_is_one_file(tmp_path):
    _copy_package(tmp_path)
    (tmp_path / "pipeline" / "attacks" / "patch_losses" / "toy_double.py").write_text(TOY_LOSS)

    def edit(raw):
        raw["patch"]["attacks"] = ["advp", "toy_double"]
        raw["evaluate"]["attacks"] = ["none", "advp", "toy_double", "toy_double_adaptive"]

    _smoke_params(tmp_path, edit)
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


def test_a_new_per_image_attack_is_one_file(tmp_path):
    _copy_package(tmp_path)
    (tmp_path / "pipeline" / "attacks" / "toy_sign.py").write_text(TOY_ATTACK)

    def edit(raw):
        raw["attacks"]["toy_sign"] = {"eps": "8/255", "n_images": 20}
        raw["evaluate"]["attacks"] = ["none", "advp", "toy_sign"]

    _smoke_params(tmp_path, edit)
    got = _run(tmp_path, """
        import json, torch
        import pipeline
        from pipeline.attacks.base import build_attack
        from pipeline.checkpoint import model_spec
        from pipeline.config import load_params
        from pipeline.evaluation import attack_shard
        from pipeline.models import build_model

        assert pipeline.__file__.startswith(HERE), pipeline.__file__
        params = load_params("params.yaml")
        torch.manual_seed(0)
        model = build_model("resnet20", 10, [0.5] * 3, [0.25] * 3)
        spec = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, model.state_dict())
        x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 10, (20,))
        # evaluate's code path for a per-image cell, once with the new attack and once with FGSM at its eps
        toy = attack_shard(spec, "toy_sign", params.attack_params("toy_sign"), x, y, seed=0)
        ref = attack_shard(spec, "fgsm", {"eps": params.attack_params("toy_sign")["eps"]}, x, y, seed=0)
        eps = params.attack_params("toy_sign")["eps"]
        xf = x.float() / 255
        images = [build_attack(a, p)(model, xf, y) for a, p in (("toy_sign", {"eps": eps}), ("fgsm", {"eps": eps}))]
        print(json.dumps({"cells": params.evaluate.attacks, "params": params.attack_params("toy_sign"),
                          "same_as_fgsm": bool(torch.equal(*images)) and bool(torch.equal(toy["pred_adv"],
                                                                                          ref["pred_adv"])),
                          "linf": toy["sizes"]["linf"].max().item()}))
    """.replace("HERE", repr(str(tmp_path))))
    assert got["cells"] == ["none", "advp", "toy_sign"] and got["params"]["n_images"] == 20
    # the same images as FGSM's (image for image, so the same predictions), every one moved by eps
    assert got["same_as_fgsm"] and got["linf"] == pytest.approx(8 / 255, abs=1e-6)


def test_a_new_defense_with_a_training_penalty_is_one_file(tmp_path):
    _copy_package(tmp_path)
    (tmp_path / "pipeline" / "defenses" / "toy_gain.py").write_text(TOY_DEFENSE)

    def edit(raw):
        raw["defended"] = ["fnc", "toy"]
        raw["toy"] = {"init": "scratch", "defenses": [{"name": "toy_gain", "weight": 100.0}], "train": {"epochs": 1}}
        raw["evaluate"]["defenses"] = ["none", "fnc", "toy"]

    _smoke_params(tmp_path, edit)
    got = _run(tmp_path, """
        import json, torch
        import pipeline
        from pipeline.checkpoint import model_spec
        from pipeline.config import TrainConfig, load_params
        from pipeline.train import Trainer

        assert pipeline.__file__.startswith(HERE), pipeline.__file__
        params = load_params("params.yaml")
        cfg = TrainConfig.model_validate({**params.train.model_dump(), "epochs": 1, "batch_size": 8, "lr": 0.05})
        torch.manual_seed(0)
        x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
        y = torch.randint(0, 10, (64,))
        out = {}
        for weight in (0.0, 2.0):  # the trainer adds the defense's penalty: it pulls the gain to 0.5
            spec = model_spec("resnet20", 10, [0.5] * 3, [0.25] * 3, None, [{"name": "toy_gain", "weight": weight}])
            trainer = Trainer(spec, (x, y), (x[:16], y[:16]), cfg, seed=0)
            row = trainer.run_epoch(0)
            out[str(weight)] = {"penalty": row["train_penalty"], "gain": float(trainer.model.input_transform.gain)}
        print(json.dumps({"defenses": params.defended_config("toy").defenses, **out}))
    """.replace("HERE", repr(str(tmp_path))))
    assert got["defenses"] == [{"name": "toy_gain", "weight": 100.0}]
    assert got["0.0"]["penalty"] == 0 and got["2.0"]["penalty"] > 0
    assert abs(got["2.0"]["gain"] - 0.5) < abs(got["0.0"]["gain"] - 0.5)


def test_a_new_analysis_is_one_file(project, tmp_path):
    """``project``: prepared data, a baseline, an FNC model and params.yaml in ``tmp_path`` (tests/test_analyze_stage.py)."""
    from pipeline.analysis.outputs import default_inputs
    from pipeline.checkpoint import build_from_spec, load_checkpoint
    from pipeline.config import load_params

    _copy_package(tmp_path)
    (tmp_path / "pipeline" / "analysis" / "toy_confidence.py").write_text(TOY_ANALYSIS)
    (tmp_path / "stages").symlink_to(ROOT / "stages")
    _run(tmp_path, """
        import json
        import pipeline
        import stages.analyze as stage
        from pipeline.config import load_params

        assert pipeline.__file__.startswith(HERE), pipeline.__file__
        stage.init_ray = lambda: None
        stage.ray_map = lambda fn, items, **_: [fn(i) for i in items]
        stage.main(load_params("params.yaml"), "toy_confidence")
        print(json.dumps({}))
    """.replace("HERE", repr(str(tmp_path))))
    import pandas as pd

    out = pd.read_csv(tmp_path / "analysis" / "resnet20" / "toy_confidence" / "confidence.csv")
    params = load_params(tmp_path / "params.yaml")
    inputs = default_inputs(params)  # the test subset the stage gave the analysis, recomputed here
    assert list(out["defense"]) == params.analysis.defenses and (out["n_images"] == len(inputs["x"])).all()
    import torch

    model = build_from_spec(load_checkpoint(tmp_path / "models" / "resnet20" / "baseline.pt")).eval()
    with torch.no_grad():
        want = float(model(inputs["x"].float() / 255).softmax(1).amax(1).mean())
    assert out.set_index("defense").loc["none", "mean_confidence"] == pytest.approx(want, rel=1e-5)
    assert project["dir"] == tmp_path


def test_without_the_file_the_loss_is_unknown_with_the_fix_named(tmp_path):
    from pipeline.config import ParamsError, load_params

    _smoke_params(tmp_path, lambda raw: raw["patch"].update(attacks=["advp", "toy_double"]))
    try:
        load_params(tmp_path / "params.yaml")
    except ParamsError as exc:
        assert "toy_double" in str(exc) and "pipeline/attacks/patch_losses" in str(exc)
    else:
        raise AssertionError("an unregistered patch loss was accepted")
