"""Dataset preparation from every accepted layout, deterministic subsets, bad input."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import DatasetError, LazyImageDataset, load_meta, load_split, load_tensors, load_validation
from pipeline.data.prepare import prepare_dataset, split_validation, subset_per_class

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 4, "test": 2}


def fake_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = PER_CLASS[split] * 10
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), np.repeat(np.arange(10), PER_CLASS[split])


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.transpose(1, 2, 0)).save(buf, format="PNG")  # lossless: pixels survive exactly
    return buf.getvalue()


def make_zip(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        x, y = fake_images(split)
        with zipfile.ZipFile(root / f"{split}.zip", "w", zipfile.ZIP_STORED) as zf:
            for i, (img, label) in enumerate(zip(x, y, strict=True)):
                zf.writestr(f"{split}/{CLASSES[label]}/{i:04d}.png", png(img))
    return root


def make_folder(root: Path) -> Path:
    for split in ("train", "test"):
        x, y = fake_images(split)
        for i, (img, label) in enumerate(zip(x, y, strict=True)):
            d = root / split / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:04d}.png").write_bytes(png(img))
    return root


def make_batches(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = fake_images("train")
    parts = np.array_split(np.arange(len(x)), 5)
    for k, idx in enumerate(parts, start=1):
        with (folder / f"data_batch_{k}").open("wb") as f:
            pickle.dump({"data": x[idx].reshape(len(idx), -1), "labels": y[idx].tolist()}, f)
    xt, yt = fake_images("test")
    with (folder / "test_batch").open("wb") as f:
        pickle.dump({"data": xt.reshape(len(xt), -1), "labels": yt.tolist()}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), num_shards=3, **{"val_per_class": 0, **kw})


def sorted_pairs(x: torch.Tensor, y: torch.Tensor) -> list:
    return sorted((int(label), img.numpy().tobytes()) for img, label in zip(x, y, strict=True))


@pytest.mark.parametrize("make", [make_zip, make_folder, make_batches])
def test_every_layout_gives_the_same_pixels(tmp_path, make):
    root = make(tmp_path / "src")
    meta = prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert meta["classes"] == CLASSES and meta["mode"] == "tensor"
    assert meta["splits"]["train"]["n_images"] == 40 and meta["splits"]["test"]["per_class"]["dog"] == 2
    assert meta["source"]["sha256"]
    for split in ("train", "test"):
        x, y = load_tensors(tmp_path / "out", split)
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
        ex, ey = fake_images(split)
        assert sorted_pairs(x, y) == sorted_pairs(torch.from_numpy(ex), torch.from_numpy(ey))


def test_subsets_are_per_class_and_deterministic(tmp_path):
    root = make_zip(tmp_path / "src")
    a = prepare_dataset(cfg(root, train_per_class=3, test_per_class=1), tmp_path / "a", seed=7)
    prepare_dataset(cfg(root, train_per_class=3, test_per_class=1), tmp_path / "b", seed=7)
    assert set(a["splits"]["train"]["per_class"].values()) == {3}
    assert torch.equal(load_tensors(tmp_path / "a", "train")[0], load_tensors(tmp_path / "b", "train")[0])
    labels = np.repeat(np.arange(3), 10)
    assert not np.array_equal(subset_per_class(labels, 4, 0), subset_per_class(labels, 4, 1))


def test_the_validation_split_is_held_out_of_the_training_images(tmp_path):
    root = make_zip(tmp_path / "src")
    meta = prepare_dataset(cfg(root, val_per_class=2), tmp_path / "out", seed=0)
    assert meta["splits"]["val"]["per_class"] == dict.fromkeys(CLASSES, 2)
    assert meta["splits"]["train"]["n_images"] == 40 - 2 * len(CLASSES)
    x_tr, y_tr = load_tensors(tmp_path / "out", "train")
    x_val, y_val = load_validation(tmp_path / "out")
    # disjoint, and together exactly the training images of the source
    assert not {img.numpy().tobytes() for img in x_tr} & {img.numpy().tobytes() for img in x_val}
    ex, ey = fake_images("train")
    assert sorted_pairs(torch.cat([x_tr, x_val]), torch.cat([y_tr, y_val])) == \
        sorted_pairs(torch.from_numpy(ex), torch.from_numpy(ey))
    # the test split is untouched and the draw is deterministic
    assert meta["splits"]["test"]["n_images"] == len(fake_images("test")[1])
    again = prepare_dataset(cfg(root, val_per_class=2), tmp_path / "again", seed=0)
    assert again["splits"] == meta["splits"]
    assert torch.equal(load_validation(tmp_path / "again")[0], x_val)


def test_no_validation_split_is_a_one_line_error(tmp_path):
    root = make_zip(tmp_path / "src")
    prepare_dataset(cfg(root, val_per_class=0), tmp_path / "out", seed=0)
    with pytest.raises(DatasetError, match="val_per_class"):
        load_validation(tmp_path / "out")
    with pytest.raises(ValueError, match="val_per_class"):
        cfg(root, train_per_class=3, val_per_class=3)


def test_split_validation_keeps_one_training_image_of_a_small_class():
    labels = np.array([0] * 5 + [1] * 2)
    train, val = split_validation(labels, np.arange(7), 3, seed=0)
    assert sorted(np.concatenate([train, val])) == list(range(7))
    assert (labels[val] == 0).sum() == 3 and (labels[val] == 1).sum() == 1


def test_ray_style_mapper_is_used_for_decoding(tmp_path):
    root = make_zip(tmp_path / "src")
    calls = []

    def mapper(fn, items):
        calls.append(len(items))
        return [fn(i) for i in items]

    prepare_dataset(cfg(root), tmp_path / "out", seed=0, mapper=mapper)
    assert calls == [3, 3]  # num_shards tasks per split


def test_large_sets_are_indexed_not_decoded(tmp_path):
    root = make_zip(tmp_path / "src")
    meta = prepare_dataset(cfg(root, lazy_threshold_mb=0.01), tmp_path / "out", seed=0)
    assert meta["mode"] == "lazy"
    assert not (tmp_path / "out" / "train.pt").exists()
    ds = load_split(tmp_path / "out", "train")
    assert isinstance(ds, LazyImageDataset) and len(ds) == 40
    eager_root = tmp_path / "eager"
    prepare_dataset(cfg(root), eager_root, seed=0)
    x, y = load_tensors(eager_root, "train")
    img, label = ds[5]
    assert torch.equal(img, x[5]) and int(label) == int(y[5])


def test_missing_root_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="data.root .* does not exist.*data.download"):
        prepare_dataset(cfg(tmp_path / "nowhere"), tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_corrupt_archive_is_reported(tmp_path):
    root = make_zip(tmp_path / "src")
    (root / "train.zip").write_bytes(b"this is not a zip file")
    with pytest.raises(DatasetError, match="train.zip: not a readable zip archive"):
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("member", ["test/dog/broken.png", "train/airplane/000.png"])  # the second: read first
def test_undecodable_image_leaves_no_output(tmp_path, member):
    root = make_zip(tmp_path / "src")
    archive = root / f"{member.split('/')[0]}.zip"
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(member, b"not a png")
    out = tmp_path / "data" / "prepared" / "cifar10"
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(cfg(root), out, seed=0)
    message = str(exc.value)
    assert message.startswith(f"{archive}: {member}: not a decodable image") and "replace the file" in message
    assert "BytesIO" not in message and "\n" not in message
    assert not (tmp_path / "data").exists()  # neither output nor the folders made for it


def test_a_failed_prepare_keeps_the_folders_it_did_not_make(tmp_path):
    root = make_zip(tmp_path / "src")
    with zipfile.ZipFile(root / "test.zip", "a") as zf:
        zf.writestr("test/dog/broken.png", b"not a png")
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError):
        prepare_dataset(cfg(root), tmp_path / "data" / "prepared" / "cifar10", seed=0)
    assert {p.name for p in tmp_path.iterdir()} == {"data", "src"}
    assert list((tmp_path / "data").iterdir()) == []


def test_an_undecodable_image_is_named_when_read_lazily(tmp_path):
    root = make_zip(tmp_path / "src")
    prepare_dataset(cfg(root, lazy_threshold_mb=0.01), tmp_path / "out", seed=0)
    ds = load_split(tmp_path / "out", "train")
    with zipfile.ZipFile(root / "train.zip", "w") as zf:  # the archive replaced after prepare
        for name in ds.members:
            zf.writestr(name, b"not a png")
    with pytest.raises(ValueError) as exc:
        ds[0]
    assert str(exc.value).startswith(f"{root / 'train.zip'}: {ds.members[0]}: not a decodable image")
    assert "BytesIO" not in str(exc.value)


class _WritesAFile:
    """Unpickled by plain ``pickle.load``, it creates ``path`` (code run from a data folder)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_batch_file_that_would_run_code_is_refused(tmp_path):
    root = make_batches(tmp_path / "src")
    marker = tmp_path / "ran"
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    x, y = fake_images("train")
    batch.write_bytes(pickle.dumps({"data": x[:8].reshape(8, -1), "labels": y[:8].tolist(), "x": _WritesAFile(marker)},
                                   protocol=2))
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    message = str(exc.value)
    assert message.startswith(f"{batch}: refused") and ".open," in message and "\n" not in message
    assert not marker.exists() and not (tmp_path / "out").exists()
    with batch.open("rb") as f:  # the check: a plain pickle.load would have run it
        pickle.load(f).pop("x").close()
    assert marker.exists()


def original_format_batches(root: Path) -> Path:
    """``cifar-10-batches-py`` as the CIFAR-10 site ships it: bytes keys (read back with
    ``encoding="bytes"``), pickle protocol 2, uint8 (N, 3072) rows, a ``batches.meta`` of bytes names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = fake_images("train")
    for k, idx in enumerate(np.array_split(np.arange(len(x)), 5), start=1):
        batch = {b"batch_label": f"training batch {k} of 5".encode(), b"labels": y[idx].tolist(),
                 b"data": x[idx].reshape(len(idx), -1), b"filenames": [f"{i}.png".encode() for i in idx]}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=2))
    xt, yt = fake_images("test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": xt.reshape(len(xt), -1), b"labels": yt.tolist()},
                                                     protocol=2))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


@pytest.mark.parametrize("protocol", [2, 5])
def test_well_formed_batch_files_still_read(tmp_path, protocol):
    root = original_format_batches(tmp_path / "src")
    if protocol == 5:  # re-saved by a recent Python: arrays by NumPy's _frombuffer
        for f in (root / "cifar-10-batches-py").iterdir():
            f.write_bytes(pickle.dumps(pickle.loads(f.read_bytes()), protocol=5))
    meta = prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert meta["classes"] == CLASSES
    for split in ("train", "test"):
        x, y = load_tensors(tmp_path / "out", split)
        ex, ey = fake_images(split)
        assert sorted_pairs(x, y) == sorted_pairs(torch.from_numpy(ex), torch.from_numpy(ey))


@pytest.mark.parametrize("content, complaint", [
    ({"data": 5, "labels": [1]}, "'data' is int, a CIFAR-10 batch holds uint8 (N, 3072)"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [1, 2]}, "'data' is float32 (2, 3072)"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, "'labels' is not 2 integers in 0-9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 10]}, "'labels' is not 2 integers in 0-9"),
    ({"labels": [1]}, "'data' is NoneType"),
    ([1, 2, 3], "holds 'list', not the dict"),
])
def test_a_batch_of_the_wrong_structure_is_one_line_naming_the_file(tmp_path, content, complaint):
    root = make_batches(tmp_path / "src")
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(DatasetError) as exc:
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert str(exc.value).startswith(f"{batch}: ") and complaint in str(exc.value) and "\n" not in str(exc.value)


def test_a_corrupt_batch_file_is_one_line(tmp_path):
    root = make_batches(tmp_path / "src")
    meta = root / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError, match=f"^{re.escape(str(meta))}: cannot read this CIFAR batch file .*re-download it$"):
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)


def test_zip_slip_member_is_refused(tmp_path):
    root = make_zip(tmp_path / "src")
    with zipfile.ZipFile(root / "train.zip", "a") as zf:
        zf.writestr("../../evil/dog/x.png", png(fake_images("train")[0][0]))
    with pytest.raises(DatasetError, match="unsafe member name"):
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)


def test_wrong_class_folders_are_reported(tmp_path):
    root = tmp_path / "src"
    for split in ("train", "test"):
        (root / split / "cats").mkdir(parents=True)
        (root / split / "cats" / "0.png").write_bytes(png(fake_images("train")[0][0]))
    with pytest.raises(DatasetError, match="class folders do not match"):
        prepare_dataset(cfg(root), tmp_path / "out", seed=0)


def test_meta_is_written_last_and_loadable(tmp_path):
    root = make_folder(tmp_path / "src")
    prepare_dataset(cfg(root), tmp_path / "out", seed=0)
    assert load_meta(tmp_path / "out")["source"]["layout"] == "folder"


@pytest.mark.parametrize("make", [make_zip, make_folder, make_batches])
def test_the_layout_is_detected_once_and_handed_to_every_reader(tmp_path, monkeypatch, make):
    from pipeline.data import prepare as prepare_module
    from pipeline.data import sources

    detections = []
    real = sources.detect_layout
    monkeypatch.setattr(sources, "detect_layout", lambda root: detections.append(root) or real(root))
    root = make(tmp_path / "src")
    source = prepare_module.resolve_source(cfg(root))  # what the stage does before starting Ray
    meta = prepare_dataset(cfg(root), tmp_path / "out", seed=0, source=source)
    assert len(detections) == 1 and meta["source"]["layout"] == source.layout
    assert meta["splits"]["train"]["n_images"] > 0 and meta["source"]["sha256"]
