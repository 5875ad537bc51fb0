"""The Python API (:mod:`pipeline.api`): ``pipeline.evaluate_model`` and ``pipeline.train_patch``.

The README's example runs as written on a tiny CNN trained here on generated images; the
API's numbers are the evaluate stage's (``metrics/evaluate.json``) and its patches
generate_patches' for the same inputs, on the tiny prepared project of
:mod:`tests.test_adaptive_patches`; an in-memory model travels through a real Ray instance
to the same numbers; bad input stops before any work with one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

import pipeline
from pipeline.config import ParamsError, load_params
from tests import test_adaptive_patches as adaptive
from tests.helpers import serial_map

ROOT = Path(__file__).resolve().parents[1]
project = adaptive.project  # a tiny prepared CIFAR-10 project: a baseline, an FNC model, one advp patch
K = 4


class TinyCNN(nn.Module):
    """32x32 RGB in [0, 1] -> K logits; normalises inside, as the API asks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.25)


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, 32, 32) noise images whose class is a small shift of one colour channel's
    mean (K = 4: red, green, blue up, or all down); int64 (n,) labels."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = 0.5 + 0.15 * torch.randn(n, 3, 32, 32, generator=gen)
    shift = torch.zeros(n, 3)
    colour = torch.nonzero(y < 3).flatten()
    shift[colour, y[colour]] = 0.12
    shift[y == 3] = -0.12
    x = (x + shift[:, :, None, None]).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


@pytest.fixture(scope="module")
def trained() -> dict:
    """A TinyCNN trained to high clean accuracy on generated images, with its train and test sets."""
    torch.manual_seed(0)
    x_train, y_train = _images(256, 0)
    x_test, y_test = _images(48, 1)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xf = x_train.float() / 255
    for _ in range(40):
        for s in range(0, len(xf), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xf[s:s + 64]), y_train[s:s + 64]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_test.float() / 255).argmax(1) == y_test).float().mean())
    assert acc >= 0.9, f"the tiny CNN did not learn the generated task ({acc:.2f})"
    return {"model": model, "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@pytest.fixture()
def serial(monkeypatch):
    """Every fan-out of the API in this process (the matrix's and :func:`pipeline.cached.cached_map`'s)."""
    from pipeline import cached, matrix

    for module in (matrix, cached):
        monkeypatch.setattr(module, "init_ray", lambda: None)
        monkeypatch.setattr(module, "ray_map", serial_map)


def readme_example() -> str:
    """The code block of the README's section "Python API"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(trained, serial, capsys):
    code = readme_example()
    assert code.count("\n") == 5 and code.startswith("import pipeline\n")
    scope = {k: trained[k] for k in ("model", "x_train", "y_train", "x_test", "y_test")}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example, as written
    df, patches = scope["df"], scope["patches"]
    assert patches.shape == (3, 3, 10, 10) and patches.dtype == torch.float32  # 3 seeds, 10 % of 32 x 32
    assert 0 <= float(patches.min()) and float(patches.max()) <= 1
    assert list(zip(df["defense"], df["attack"], strict=True)) == [
        (d, a) for d in ("none", "input_blur") for a in ("none", "advp", "occlusion", "pgd")]
    clean = df.set_index(["defense", "attack"])["clean_accuracy"]
    assert clean[("none", "none")] >= 0.9
    assert "robust_accuracy" in capsys.readouterr().out


def test_an_attack_lowers_the_accuracy_of_the_undefended_model(trained, serial):
    df = pipeline.evaluate_model(trained["model"], trained["x_test"].float() / 255, trained["y_test"],
                                 attacks={"none": None, "fgsm": {"eps": 16 / 255}, "pgd": {"eps": 16 / 255, "steps": 10}})
    row = df.set_index("attack")
    assert row.loc["none", "clean_accuracy"] >= 0.9
    for attack in ("fgsm", "pgd"):
        assert row.loc[attack, "clean_accuracy"] == row.loc["none", "clean_accuracy"]
        assert row.loc[attack, "robust_accuracy"] < row.loc[attack, "clean_accuracy"] - 0.3
    assert row.loc["pgd", "linf"] <= 16 / 255 + 1e-6
    assert set(df["model"]) == {"TinyCNN"}


def _stage_inputs(attacks: list[str]) -> tuple[dict, dict]:
    """The project's params.yaml with ``attacks`` evaluated, and the keyword arguments of
    ``evaluate_model`` for the same evaluation (its sections as in the file)."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["evaluate"].update(attacks=attacks, placements=2, num_shards=2)
    raw["attacks"]["pgd"].update(steps=2)
    raw["attacks"]["fgsm"]["n_images"] = 7
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    kwargs = {"attacks": {a: raw["attacks"].get(a) for a in attacks},
              "evaluate": {k: v for k, v in raw["evaluate"].items() if k not in ("attacks", "defenses")},
              "patch": raw["patch"], "seed": raw["seed"], "resources": raw["resources"]}
    return raw, kwargs


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_evaluate_model_gives_the_evaluate_stages_numbers(project):
    """The stage on its files, the API on the same model, test tensors and patch in memory: the
    same rows, columns and numbers (the FNC model of the project is the baseline with FNC at
    alpha 0.5 inserted, no adjustment)."""
    from pipeline.checkpoint import build_from_spec, load_checkpoint
    from pipeline.data import load_tensors
    from pipeline.io import load_torch

    attacks = ["none", "advp", "occlusion", "fgsm", "pgd"]
    _, kwargs = _stage_inputs(attacks)
    project["stage"].main(load_params("params.yaml"))
    want = json.loads(Path("metrics/evaluate.json").read_text())["resnet20"]
    csv = pd.read_csv("plots/evaluate.csv")

    model = build_from_spec(load_checkpoint("models/resnet20/baseline.pt"))
    x, y = load_tensors("data/prepared/cifar10", "test")
    patch = load_torch("patches/resnet20/advp/seed_0.pt")
    df = pipeline.evaluate_model(model, x, y, defenses=["none", {"name": "fnc", "alpha": 0.5}],
                                 patches={"advp": patch[None]}, **kwargs)
    assert list(df.columns) == list(csv.columns)
    assert [(r.defense, r.attack) for r in df.itertuples()] == [(d, a) for d, row in want.items() for a in row]
    assert list(want["fnc"]) == [*attacks, "per_image_worst"]  # the worst case over fgsm and pgd too
    for r in df.to_dict("records"):
        cell = want[r["defense"]][r["attack"]]
        got = {k: r[k] for k in cell}
        assert all(_same(got[k], cell[k]) for k in cell), (r["defense"], r["attack"], got, cell)
        assert all(pd.isna(r[k]) for k in r if k not in cell and k not in ("model", "defense", "attack"))


def test_train_patch_gives_generate_patches_patch(project):
    import stages.generate_patches as stage
    from pipeline.checkpoint import build_from_spec, load_checkpoint
    from pipeline.data import load_tensors
    from pipeline.io import load_torch

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["patch"].update(seeds=[0, 1], epochs=2, decay_epochs=[1], train_images=20, target=3)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    stage.main(load_params("params.yaml"))
    model = build_from_spec(load_checkpoint("models/resnet20/baseline.pt"))
    x, y = load_tensors("data/prepared/cifar10", "train")
    patch = {k: v for k, v in raw["patch"].items() if k != "attacks"}
    got = pipeline.train_patch(model, x, y, attack="advp", seed=raw["seed"], **patch)
    assert got.shape == (2, 3, 10, 10)
    for i, s in enumerate((0, 1)):
        assert torch.equal(got[i], load_torch(f"patches/resnet20/advp/seed_{s}.pt"))
    assert not torch.equal(got[0], got[1])


def test_an_in_memory_model_travels_through_ray(trained, ray_local):
    """Through a real Ray instance (the model inside the specs in the object store), the numbers
    of the in-process run."""
    from pipeline import cached, matrix

    args = (trained["model"], trained["x_test"][:16], trained["y_test"][:16])
    kwargs = {"attacks": {"none": None, "occlusion": None, "fgsm": {"eps": 16 / 255}}, "defenses": ["none", "lgs"],
              "patch": {"target": 0, "seeds": [0]}, "evaluate": {"num_shards": 2}}
    remote = pipeline.evaluate_model(*args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        for module in (matrix, cached):
            mp.setattr(module, "ray_map", serial_map)
        local = pipeline.evaluate_model(*args, **kwargs)
    pd.testing.assert_frame_equal(remote, local)


def test_grey_images(serial):
    """A one-channel model: patches, occlusion noise and attacks of its one channel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, y = _images(24, 2)
    x, y = x[:, :1], y % 3
    patches = pipeline.train_patch(model, x, y, target=0, seeds=[0], epochs=1)
    assert patches.shape == (1, 1, 10, 10)
    df = pipeline.evaluate_model(model, x, y, attacks=["none", "advp", "occlusion", "fgsm"], patches={"advp": patches},
                                 defenses=["none", "input_blur"], patch={"target": 0})
    assert len(df) == 8 and df["robust_accuracy"].notna().sum() == 6


def _no_work(*_, **__):
    raise AssertionError("work started before the input was checked")


@pytest.mark.parametrize(("call", "error", "needle"), [
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, evaluate={"test_images": 0}), ParamsError,
     "evaluate_model: evaluate.test_images: Input should be greater than 0"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, evaluate={"test_image": 5}), ParamsError,
     "evaluate.test_image: unknown key"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["none", "pdg"]), ParamsError, "unknown attack 'pdg'"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks={"none": None, "pgd": {"eps": -1}}), ParamsError,
     "attacks.pgd"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["none", "advp"], patch={"target": 0}), ValueError,
     "attack 'advp' pastes trained patches: pass patches="),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["none", "advp"], patches={"advp": torch.rand(1, 3, 9, 9)},
                                             patch={"seeds": [0], "target": 0}), ValueError, "expected (S, 3, 10, 10)"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["advp"], patches={"advp": torch.rand(3, 10, 10)},
                                             patch={"target": 0}), ValueError, "need the clean cell 'none'"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["none", "advp_adaptive"], patch={"target": None}),
     ValueError,
     "adaptive patches are searched on training images"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, defenses=["none", "prm"]), ValueError,
     "defense 'prm' needs training; build it with the DAG"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, defenses=["none", "fnc"], fnc={"adjustment": "bn_recalibration"}),
     ValueError, "adjustment 'bn_recalibration' needs training images"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, defenses=["none", "fnc"]), ValueError, "TinyCNN has no block"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, defenses=["none", "nope"]), ParamsError, "unknown defense 'nope'"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["none", "masked_pgd"]), ValueError,
     "pass fit_data=(x_train, y_train)"),
    (lambda m, x, y: pipeline.evaluate_model(m, x.float(), y), ValueError, "float images must be in [0, 1]"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y[:-1]), ValueError, "y: integer labels of shape"),
    (lambda m, x, y: pipeline.evaluate_model(m, x[0], y), ValueError, "images of shape (N, C, H, W)"),
    (lambda m, x, y: pipeline.evaluate_model(m, x[:, :1], y), ValueError, "model: failed on one image of shape (1, 32, 32)"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y + K), ValueError, "is not a class of the model (4 logits)"),
    (lambda m, x, y: pipeline.evaluate_model(m.state_dict(), x, y), TypeError, "model: a torch.nn.Module"),
    (lambda m, x, y: pipeline.evaluate_model(m, x, y, attacks=["none", "occlusion"]), ParamsError,
     "patch.target 5 is not a class of the model (4 logits)"),
    (lambda m, x, y: pipeline.train_patch(m, x, y, area_fraction=1.5, target=0), ParamsError,
     "train_patch: patch.area_fraction: Input should be less than 1"),
    (lambda m, x, y: pipeline.train_patch(m, x, y, attack="advpp", target=0), ParamsError, "unknown patch attack 'advpp'"),
    (lambda m, x, y: pipeline.train_patch(m, x, y, attacks=["advp"]), ValueError, "pass attack='advp'"),
])
def test_bad_input_is_one_line_before_any_work(trained, monkeypatch, call, error, needle):
    from pipeline import cached, matrix

    monkeypatch.setattr(cached, "ray_map", _no_work)
    monkeypatch.setattr(matrix, "ray_map", _no_work)
    with pytest.raises(error) as exc:
        call(trained["model"], trained["x_test"][:8], trained["y_test"][:8])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_import_pipeline_stays_cheap_and_the_api_is_reexported():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, pipeline; print('torch' in sys.modules, "
                          "pipeline.evaluate_model.__module__, pipeline.train_patch.__module__)"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert out == ["False", "pipeline.api", "pipeline.api"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pipeline.nothing  # noqa: B018
