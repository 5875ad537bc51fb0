"""GTSRB as a second dataset: chosen by ``data.dataset: gtsrb``, names from ``classes.csv``.

The real-data test reads the shared 32x32 archives in place (a 2 + 1 images a class
subset) and is skipped when they are absent; the error tests use a tiny fake set.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, Params
from pipeline.data import DATASETS, DatasetError, load_meta, load_tensors
from pipeline.data.prepare import prepare_dataset

SHARED_GTSRB = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "gtsrb-32"
K = 43
FOLDERS = [f"{i:05d}" for i in range(K)]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("class_id", "folder", "name")) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def fake_gtsrb(root: Path) -> Path:
    """One 32x32 image a class per split, in the shared layout, and a classes.csv."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        with zipfile.ZipFile(root / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf:
            for c in FOLDERS:
                zf.writestr(f"{split}/{c}/00000_00000.png", png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    write_csv(root / "classes.csv", [[str(i), FOLDERS[i], f"sign {i}"] for i in range(K)])
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="gtsrb", root=str(root), num_shards=2, **{"val_per_class": 0, **kw})


def test_dataset_description():
    info = DATASETS["gtsrb"]
    assert info.num_classes == K and info.classes[14] == "Stop" and info.image_size == 32
    assert info.folder_names == tuple(FOLDERS) and info.classes_file == "classes.csv"
    assert not info.downloadable and not info.horizontal_flip
    assert all(0 < v < 1 for v in info.mean + info.std)
    assert DATASETS["cifar10"].folder_names == DATASETS["cifar10"].classes and DATASETS["cifar10"].horizontal_flip


@pytest.mark.skipif(not (SHARED_GTSRB / "train.zip").is_file(), reason=f"{SHARED_GTSRB} not found")
def test_prepare_real_gtsrb_subset(tmp_path):
    meta = prepare_dataset(cfg(SHARED_GTSRB, train_per_class=2, test_per_class=1), tmp_path / "out", seed=0)
    with (SHARED_GTSRB / "classes.csv").open(newline="") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    assert meta["dataset"] == "gtsrb" and meta["classes"] == names and len(names) == K
    assert meta["classes"][14] == "Stop" and meta["mode"] == "tensor" and meta["image_shape"] == [3, 32, 32]
    assert set(meta["splits"]["train"]["per_class"].values()) == {2} and meta["splits"]["test"]["n_images"] == K
    assert "classes.csv" in meta["source"]["sha256"] and meta["mean"] == list(DATASETS["gtsrb"].mean)
    x, y = load_tensors(tmp_path / "out", "train")
    assert x.dtype == torch.uint8 and x.shape == (2 * K, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(torch.bincount(y, minlength=K), torch.full((K,), 2))
    assert load_meta(tmp_path / "out")["classes"] == names


def test_prepare_fake_gtsrb_uses_csv_names(tmp_path):
    root = fake_gtsrb(tmp_path / "src")
    meta = prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert meta["classes"] == [f"sign {i}" for i in range(K)]
    assert meta["splits"]["test"]["per_class"]["sign 42"] == 1
    x, y = load_tensors(tmp_path / "out", "test")
    assert x.shape == (K, 3, 32, 32) and y.tolist() == list(range(K))


def _rows() -> list[list[str]]:
    return [[str(i), FOLDERS[i], f"sign {i}"] for i in range(K)]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.unlink(), "classes.csv: missing"),
        (lambda p: write_csv(p, _rows(), header=("id", "folder", "name")), r"missing column\(s\) \['class_id'\]"),
        (lambda p: write_csv(p, _rows()[:-1]), "42 classes listed, expected 43"),
        (lambda p: write_csv(p, _rows()[:5] + [["x", "00005", "a"]] + _rows()[6:]), "class_id 'x' is not an integer"),
        (lambda p: write_csv(p, _rows() + [["3", "00003", "again"]]), "class_id 3 appears twice"),
        (lambda p: write_csv(p, _rows()[:1] + [["1", "00007", "b"]] + _rows()[2:]), "names folder '00007'"),
        (lambda p: write_csv(p, _rows() + [["43", "00043", "extra"]]), "outside 0-42"),
        (lambda p: write_csv(p, _rows()[:1] + [["1", "00001", " "]] + _rows()[2:]), "empty name"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00garbage\x00"), "not a readable UTF-8 CSV"),
    ],
)
def test_bad_classes_csv_is_reported(tmp_path, corrupt, message):
    root = fake_gtsrb(tmp_path / "src")
    corrupt(root / "classes.csv")
    with pytest.raises(DatasetError, match=message) as exc:
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_no_download_for_gtsrb(tmp_path):
    for download in (True, False):
        with pytest.raises(DatasetError, match="gtsrb cannot be downloaded automatically.*gtsrb-32"):
            prepare_dataset(cfg(tmp_path / "nowhere", download=download), tmp_path / "out", seed=0)


def test_cifar_class_folders_are_not_gtsrb(tmp_path):
    root = fake_gtsrb(tmp_path / "src")
    with pytest.raises(DatasetError, match="class folders do not match"):
        prepare_dataset(DataConfig(dataset="cifar10", root=str(root)), tmp_path / "out", seed=0)


def test_params_target_range_follows_the_dataset():
    assert Params(data={"dataset": "gtsrb", "root": "x"}, patch={"target": 42}).patch.target == 42
    with pytest.raises(ValueError, match="not a class of gtsrb"):
        Params(data={"dataset": "gtsrb", "root": "x"}, patch={"target": 43})
    with pytest.raises(ValueError, match="not a class of cifar10"):
        Params(data={"dataset": "cifar10", "root": "x"}, patch={"target": 10})
