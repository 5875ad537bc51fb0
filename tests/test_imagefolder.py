"""A researcher's own data and model, by params alone: any ImageFolder (``data.dataset:
imagefolder``: classes from the folders, grey or RGB, mean / std computed at prepare) and a model
defined outside ``pipeline/`` (``model.name: "module:callable"``), with FNC inserted after its
blocks; unit tests, then the smoke profile's whole DAG on generated grey 28x28 digits-like images
with the model of this module."""

from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from pipeline.config import DataConfig, ParamsError, TrainConfig, load_params
from pipeline.data import horizontal_flip, load_tensors
from pipeline.data.prepare import prepare_dataset
from pipeline.defenses.fnc import fnc_modules, insert_fnc
from pipeline.models import build_model, find_blocks

CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The generated dataset's class folders; their sorted order is the label order."""


# --------------------------------------------------------------------------- the user's model


class Block(nn.Module):
    """conv 3x3 - BN - ReLU, the unit the tiny network stacks (not a registered block type)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tiny_net(num_classes: int, in_channels: int, width: int = 8) -> nn.Module:
    """A network outside the registry: two ``nn.Sequential`` stages of two blocks each, then a
    linear classifier; ``(N, in_channels, H, W)`` -> ``(N, num_classes)``."""
    return nn.Sequential(
        nn.Sequential(Block(in_channels, width), Block(width, width)),
        nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


USER_MODEL = f"{__name__}:tiny_net"


# --------------------------------------------------------------------------- generated data


def _images(n_per_class: int, seed: int, side: int = 28) -> dict[str, list[np.ndarray]]:
    """Grey ``side`` x ``side`` images, ``n_per_class`` a class: class ``c`` is a sine grating of
    its own orientation (``c mod 5`` x 36 degrees) and period (6 px for ``c < 5``, 3.5 px else),
    at a random phase, under fresh noise; low contrast (amplitude 20 of 255, noise 20), so that
    the model of this module learns them in a few epochs and PGD at 8/255 still fools it."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:side, 0:side]
    out = {}
    for c, name in enumerate(CLASSES):
        theta, period = np.pi * (c % 5) / 5, 6.0 if c < 5 else 3.5
        imgs = []
        for _ in range(n_per_class):
            wave = np.sin(2 * np.pi * (cols * np.cos(theta) + rows * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi))
            img = 128 + 20 * wave + rng.normal(0, 20, (side, side))
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        out[name] = imgs
    return out


def make_imagefolder(root: Path, n_train: int = 60, n_test: int = 20, as_zip: bool = True) -> Path:
    """``root/train.zip`` + ``test.zip`` (or ``train/`` + ``test/`` folders) of grey PNGs in
    ``<split>/<class>/<i>.png``, the documented ImageFolder layout."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        data = _images(n, seed)
        if as_zip:
            with zipfile.ZipFile(root / f"{split}.zip", "w") as zf:
                for name, imgs in data.items():
                    for i, img in enumerate(imgs):
                        buf = io.BytesIO()
                        Image.fromarray(img, mode="L").save(buf, format="PNG")
                        zf.writestr(f"{split}/{name}/{i}.png", buf.getvalue())
        else:
            for name, imgs in data.items():
                (root / split / name).mkdir(parents=True, exist_ok=True)
                for i, img in enumerate(imgs):
                    Image.fromarray(img, mode="L").save(root / split / name / f"{i}.png")
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), val_per_class=kw.pop("val_per_class", 5), num_shards=2,
                      **kw)


# --------------------------------------------------------------------------- prepare


def test_an_imagefolder_takes_its_classes_channels_and_statistics_from_the_data(tmp_path):
    root = make_imagefolder(tmp_path / "strokes", n_train=12, n_test=4, as_zip=False)
    meta = prepare_dataset(_cfg(root), tmp_path / "out", seed=0)
    assert meta["classes"] == sorted(CLASSES)
    assert (meta["dataset"], meta["name"], meta["channels"]) == ("imagefolder", "strokes", 1)
    assert meta["image_shape"] == [1, 28, 28]
    assert meta["horizontal_flip"] is False  # a mirror may change a class the project does not know
    x, y = load_tensors(tmp_path / "out", "train")
    assert x.shape[1:] == (1, 28, 28) and len(x) == 10 * (12 - 5)
    pixels = x.double() / 255  # the statistics of the training split actually kept
    assert meta["mean"] == pytest.approx([float(pixels.mean())], abs=1e-6)
    assert meta["std"] == pytest.approx([float(pixels.std(unbiased=False))], abs=1e-6)
    # the labels follow the sorted folder names: label 0 is "eight"
    eights = {img.tobytes() for img in _images(12, 0)["eight"]}
    assert all(img[0].numpy().tobytes() in eights for img in x[y == 0])


def test_data_classes_fixes_the_order_and_channels_3_repeats_the_grey(tmp_path):
    root = make_imagefolder(tmp_path / "strokes", n_train=8, n_test=2)
    meta = prepare_dataset(_cfg(root, classes=list(CLASSES), channels=3, mean=[0.5] * 3, std=[0.25] * 3),
                           tmp_path / "out", seed=0)
    assert meta["classes"] == list(CLASSES) and meta["channels"] == 3
    assert (meta["mean"], meta["std"]) == ([0.5] * 3, [0.25] * 3)
    x, y = load_tensors(tmp_path / "out", "test")
    assert x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    # the members come in name order (test/eight/... first), labelled in data.classes' order
    assert int(y[0]) == CLASSES.index("eight") and int(y[-1]) == CLASSES.index("zero")


def test_classes_that_are_not_the_folders_stop_prepare_in_one_line(tmp_path):
    from pipeline.data import DatasetError

    root = make_imagefolder(tmp_path / "strokes", n_train=3, n_test=1)
    with pytest.raises(DatasetError, match=r"class folders do not match .*missing \['ten'\]"):
        prepare_dataset(_cfg(root, classes=[*CLASSES, "ten"], val_per_class=1), tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("data", "match"), [
    ({"dataset": "cifar10", "classes": ["a", "b"]}, "data.classes is for data.dataset: imagefolder"),
    ({"dataset": "imagefolder", "mean": [0.5]}, "give both data.mean and data.std"),
    ({"dataset": "imagefolder", "channels": 1, "mean": [0.5] * 3, "std": [0.2] * 3}, "data.channels is 1"),
    ({"dataset": "imagefolder", "classes": ["a", "a"]}, "lists a name twice"),
])
def test_bad_imagefolder_keys_are_one_line_errors(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(root=str(tmp_path), **data)


@pytest.mark.parametrize("as_zip", [True, False])
def test_the_patch_target_by_class_name_becomes_its_index(tmp_path, as_zip):
    root = make_imagefolder(tmp_path / "strokes", n_train=3, n_test=1, as_zip=as_zip)
    raw = yaml.safe_load(Path("params/smoke.yaml").read_text())
    raw["data"] = {"dataset": "imagefolder", "root": str(root), "val_per_class": 1}
    raw["patch"]["target"] = "three"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    assert load_params(tmp_path / "p.yaml").patch.target == sorted(CLASSES).index("three")
    raw["patch"]["target"] = "eleven"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="'eleven' is not a class of imagefolder"):
        load_params(tmp_path / "p.yaml")
    raw["patch"]["target"] = 10  # an index out of range, now that the folders are known
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match="patch.target 10 is not a class"):
        load_params(tmp_path / "p.yaml")


def test_train_augment_sets_the_flip_and_the_crop():
    meta = {"dataset": "imagefolder", "horizontal_flip": False}
    assert horizontal_flip(meta) is False and horizontal_flip({"dataset": "cifar10"}) is True
    on = TrainConfig(augment={"horizontal_flip": True}).augment
    assert horizontal_flip(meta, on) is True
    from pipeline.checkpoint import model_spec
    from pipeline.train import Trainer

    x = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    y = torch.arange(8) % 2
    spec = model_spec(USER_MODEL, 2, [0.5], [0.25], None)
    plain = Trainer(spec, (x, y), (x, y), TrainConfig(epochs=2, augment={"crop_padding": 0}), seed=0,
                    horizontal_flip=False)
    assert all(torch.equal(plain.train_set[i][0], x[i]) for i in range(8))  # no crop, no flip: the images
    cropped = Trainer(spec, (x, y), (x, y), TrainConfig(epochs=2, augment={"crop_padding": 4}), seed=0,
                      horizontal_flip=False)
    assert not all(torch.equal(cropped.train_set[i][0], x[i]) for i in range(8))


# --------------------------------------------------------------------------- the user's model


def test_a_model_by_import_path_is_built_with_the_datas_channels():
    model = build_model(USER_MODEL, 10, [0.5], [0.25], kwargs={"width": 4}).eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert model.net[0][0].conv.weight.shape == (4, 1, 3, 3)  # in_channels 1, width from model.kwargs
    with pytest.raises(ValueError, match="expected images of shape \\(N, 1, H, W\\)"):
        model(torch.rand(2, 3, 28, 28))


@pytest.mark.parametrize(("name", "match"), [
    ("tests.no_such_module:net", "cannot import 'tests.no_such_module'"),
    (f"{__name__}:no_such_net", "has no attribute 'no_such_net'"),
    (f"{__name__}:CLASSES", "is not callable"),
])
def test_an_import_path_that_does_not_resolve_is_one_line(name, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, 10, [0.5], [0.25])
    raw = {"data": {"root": "x"}, "model": {"name": name}}
    with pytest.raises(Exception, match=match):
        from pipeline.config import Params

        Params.model_validate(raw)


def test_an_rgb_only_model_on_grey_data_names_the_fix():
    with pytest.raises(ValueError, match="takes 3-channel .* set data.channels: 3"):
        build_model("resnet50", 10, [0.5], [0.25])
    assert build_model("resnet20", 10, [0.5], [0.25]).eval()(torch.rand(1, 1, 28, 28)).shape == (1, 10)


def test_fnc_goes_after_the_blocks_of_an_unregistered_model():
    model = build_model(USER_MODEL, 10, [0.5], [0.25]).eval()
    names = [n for n, _ in find_blocks(model)]
    assert names == ["net.0.0", "net.0.1", "net.1.0", "net.1.1"]  # the blocks inside the Sequential stages
    x = torch.rand(4, 1, 28, 28)
    before = model(x)
    assert insert_fnc(model, alpha=1e9) == names and len(fnc_modules(model)) == 4
    assert torch.allclose(model(x), before, atol=1e-5)  # a huge alpha clips nothing
    tight = build_model(USER_MODEL, 10, [0.5], [0.25]).eval()
    tight.load_state_dict(model.state_dict(), strict=False)
    insert_fnc(tight, alpha=0.1, block_types=["Block"])  # by class name: the same four
    assert len(fnc_modules(tight)) == 4 and not torch.allclose(tight(x), before, atol=1e-3)
    with pytest.raises(ValueError, match="no block of \\['Nothing'\\]"):
        insert_fnc(build_model(USER_MODEL, 10, [0.5], [0.25]), 1.0, block_types=["Nothing"])


def test_fnc_block_types_travel_in_the_checkpoint_and_only_when_set():
    from pipeline.checkpoint import build_from_spec, model_spec
    from pipeline.config import FNCConfig

    entries = FNCConfig(block_types=["Block"]).as_defended().insert_after
    assert entries == [{"name": "fnc", "alpha": 1.0, "eps": 1e-6, "block_types": ["Block"]}]
    model = build_from_spec(model_spec(USER_MODEL, 10, [0.5], [0.25], None, defenses=entries))
    assert len(fnc_modules(model)) == 4
    # the registered models' entries keep their keys (the checkpoints of earlier runs are unchanged)
    assert FNCConfig().as_defended().insert_after == [{"name": "fnc", "alpha": 1.0, "eps": 1e-6}]


# --------------------------------------------------------------------------- the whole DAG


@pytest.fixture(scope="module")
def imagefolder_project(tmp_path_factory, ray_head):
    """``params/smoke.yaml`` with ``data.dataset: imagefolder`` on generated grey 28x28 images
    (folder ``strokes``), the model of this module by import path, FNC inserted after its blocks,
    the patch target by class name, and smaller counts (CI time); ``dvc repro`` of the whole DAG."""
    from tests.conftest import _copy_project, _repro, git, joined, stage_env

    work = tmp_path_factory.mktemp("imagefolder") / "project"
    work.mkdir()
    _copy_project(work)
    root = make_imagefolder(tmp_path_factory.mktemp("data") / "strokes", n_train=60, n_test=20)
    params = yaml.safe_load((work / "params" / "smoke.yaml").read_text())
    params["profile"] = "imagefolder-smoke"
    params["data"] = {"dataset": "imagefolder", "root": str(root), "val_per_class": 10, "num_shards": 2}
    params["model"] = {"name": USER_MODEL, "kwargs": {"width": 8}, "checkpoint": None}
    params["train"].update(epochs=6, batch_size=32, lr=0.1)
    params["patch"].update(target="three", epochs=2, seeds=[0])
    params["fnc_tradeoff"]["test_images"] = 50
    for attack, section in params["attacks"].items():
        section["n_images"] = min(section["n_images"], 20 if attack in ("fgsm", "pgd", "mask_fgsm", "masked_pgd",
                                                                        "autoattack") else 5)
    analysis = params["analysis"]
    analysis.update(images=40, fit_images=100, landscape_images=20, gradcam_images=20, restarts=2,
                    distances=[0, 4, 8], block=4)
    analysis["masking"].update(images=32, noise_draws=4, eot_samples=2)
    params["mlflow"]["experiment"] = "imagefolder-smoke"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "imagefolder")
    env = joined(stage_env(work), ray_head)
    log = _repro(work, env)
    yield {"dir": work, "params": params, "log": log, "root": root}


@pytest.mark.e2e
def test_every_stage_runs_on_an_imagefolder_with_the_users_model(imagefolder_project):
    import subprocess
    import sys

    work = imagefolder_project["dir"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=work, capture_output=True, text=True,
                            env=joined_env(work))
    assert "up to date" in status.stdout, status.stdout + status.stderr
    name = USER_MODEL
    meta = json.loads((work / "data/prepared/imagefolder/meta.json").read_text())
    assert (meta["name"], meta["channels"], meta["classes"]) == ("strokes", 1, sorted(CLASSES))
    assert len(meta["mean"]) == len(meta["std"]) == 1
    ev = json.loads((work / "metrics/evaluate.json").read_text())[name]
    clean = ev["none"]["none"]["clean_accuracy"]
    assert clean > 0.5, f"the user's model did not learn the generated classes: {clean}"
    assert ev["none"]["pgd"]["robust_accuracy"] < ev["none"]["pgd"]["clean_accuracy"]  # the attack attacks
    assert ev["none"]["advp"]["n_images"] == 200 - 20  # the target class 'three' left out of the patch cells
    from pipeline.checkpoint import build_from_spec, load_checkpoint

    fnc = build_from_spec(load_checkpoint(work / "models" / name / "fnc.pt"))
    assert len(fnc_modules(fnc)) == 4  # after each of the user's four blocks


@pytest.mark.e2e
def test_the_report_names_the_dataset_its_classes_and_the_real_patch_area(imagefolder_project):
    report = (imagefolder_project["dir"] / "reports" / "report.md").read_text()
    assert f"({USER_MODEL} on strokes)" in report
    assert "Data: strokes (imagefolder), 10 classes (0 eight, 1 five, 2 four, 3 nine" in report
    assert "grey 28x28 images" in report
    # 10 % of 28 x 28 is 78.4 px; the side rounds down to 8, which covers 64 px: 8.2 %
    assert "8x8 px, 8.2 % of the 28x28 image (patch.area_fraction 10 %, the side rounded down)" in report


@pytest.mark.e2e
def test_mlflow_names_the_dataset_by_its_folder(imagefolder_project):
    db = imagefolder_project["dir"] / "mlflow-test.db"
    with sqlite3.connect(db) as con:
        tags = con.execute("SELECT r.name, t.value FROM tags t JOIN runs r ON r.run_uuid = t.run_uuid "
                           "WHERE t.key = 'dataset'").fetchall()
    assert tags and {v for _, v in tags} == {"strokes"}, tags


def joined_env(work: Path) -> dict[str, str]:
    """An environment for ``dvc status`` in ``work`` (no Ray needed)."""
    from tests.conftest import stage_env

    return stage_env(work)

