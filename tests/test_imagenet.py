"""ImageNet as a dataset entry: a local ``train/<wnid>/`` + ``val/<wnid>/`` tree of images of
varying size, decoded to ``data.image_size`` with the standard resize and centre crop,
labelled by the sorted folder names; torchvision's published weights as ``model.checkpoint``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pipeline.config import DataConfig, ModelConfig
from pipeline.data import DatasetError, LazyImageDataset, load_split
from pipeline.data.datasets import DATASETS, decode_image
from pipeline.data.prepare import prepare_dataset
from pipeline.models import build_model
from pipeline.models.weights import torchvision_weights_file

N_CLASSES = 1000


def make_imagenet(root: Path, n_classes: int = N_CLASSES) -> list[str]:
    """A tree of ``n_classes`` wnid-like folders, one training and one validation image each,
    of varying size; every image is filled with its class index (red) and split (green)."""
    wnids = [f"n{9_000_000 - 7 * i:08d}" for i in range(n_classes)]  # created out of sorted order
    for i, wnid in enumerate(wnids):
        for split, green in (("train", 10), ("val", 20)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            w, h = 20 + i % 7, 14 + i % 5
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 0], arr[..., 1] = i % 256, green
            Image.fromarray(arr).save(folder / f"{wnid}_{i}.png")
    return sorted(wnids)


def png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet(root)


def test_prepare_resizes_crops_and_labels_by_sorted_folders(imagenet_root, tmp_path):
    root, sorted_wnids = imagenet_root
    meta = prepare_dataset(DataConfig(dataset="imagenet", root=str(root), image_size=12, num_shards=3),
                           tmp_path / "out", seed=0)
    assert meta["image_shape"] == [3, 12, 12] and meta["image_size"] == 12 and meta["mode"] == "tensor"
    assert meta["classes"] == list(DATASETS["imagenet"].classes) and meta["classes"][0] == "tench"
    for split, green in (("train", 10), ("test", 20)):  # test is read from val/
        ds = load_split(tmp_path / "out", split)
        x, y = ds.x, ds.y
        assert x.shape == (N_CLASSES, 3, 12, 12) and x.dtype == torch.uint8
        assert (x[:, 1] == green).all()
        # label i is the i-th folder in sorted order; the folder's images carry its creation index
        created = {w: i for i, w in enumerate(f"n{9_000_000 - 7 * i:08d}" for i in range(N_CLASSES))}
        expected_red = torch.tensor([created[sorted_wnids[label]] % 256 for label in y.tolist()], dtype=torch.uint8)
        assert torch.equal(x[:, 0, 6, 6], expected_red)


def test_resize_keeps_the_centre_of_wide_and_tall_images():
    for h, w in ((50, 100), (100, 50)):
        arr = np.zeros((h, w, 3), np.uint8)
        c = min(h, w)
        top, left = (h - c) // 2, (w - c) // 2
        arr[top:top + c, left:left + c] = 255  # the central square is white, the margins black
        out = decode_image(png_bytes(arr), size=16)
        assert out.shape == (3, 16, 16)
        # the crop is the central 16/18 of the resized square: white up to interpolated edges
        assert out[:, 1:-1, 1:-1].min() > 200 and out.mean() > 240
    square = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert decode_image(png_bytes(square)).shape == (3, 64, 64)  # no size: as stored


def test_lazy_mode_decodes_to_the_same_size(imagenet_root, tmp_path):
    root, _ = imagenet_root
    prepare_dataset(DataConfig(dataset="imagenet", root=str(root), image_size=12, lazy_threshold_mb=0.01),
                    tmp_path / "out", seed=0)
    ds = load_split(tmp_path / "out", "train")
    assert isinstance(ds, LazyImageDataset) and len(ds) == N_CLASSES
    x, y = ds[3]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and int(y) == 3


def test_missing_class_folders_and_size_are_reported(tmp_path):
    make_imagenet(tmp_path / "small", n_classes=5)
    with pytest.raises(DatasetError, match="5 class folders, imagenet has 1000"):
        prepare_dataset(DataConfig(dataset="imagenet", root=str(tmp_path / "small"), image_size=12),
                        tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValidationError, match="set data.image_size"):
        DataConfig(dataset="imagenet", root=str(tmp_path))
    with pytest.raises(DatasetError, match="cannot be downloaded automatically"):
        prepare_dataset(DataConfig(dataset="imagenet", root=str(tmp_path / "none"), image_size=12, download=True),
                        tmp_path / "out", seed=0)


def test_torchvision_weights_are_read_from_the_hub_cache(tmp_path, monkeypatch):
    """``torchvision:<WEIGHTS>`` resolves to the file torchvision itself caches; with the file
    there nothing is downloaded (a random state dict stands in for the published weights)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # torch.hub.get_dir() is $TORCH_HOME/hub
    with pytest.raises(ValueError, match="not in"):
        torchvision_weights_file("mobilenet_v2", "IMAGENET1K_V1", download=False)
    ModelConfig(name="mobilenet_v2", checkpoint="torchvision:IMAGENET1K_V1")  # valid before the download
    with pytest.raises(ValidationError, match="choose one of: IMAGENET1K_V1"):
        ModelConfig(name="mobilenet_v2", checkpoint="torchvision:IMAGENET1K_V9")
    with pytest.raises(ValidationError, match="not a torchvision model"):
        ModelConfig(name="resnet20", checkpoint="torchvision:IMAGENET1K_V1")
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None)
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"  # torchvision's file name
    cached.parent.mkdir(parents=True)
    torch.save(net.state_dict(), cached)
    path = torchvision_weights_file("mobilenet_v2", "IMAGENET1K_V1")
    assert path == cached
    info = DATASETS["imagenet"]
    model = build_model("mobilenet_v2", info.num_classes, info.mean, info.std, weights=path)
    assert torch.equal(model.net.classifier[1].weight, net.classifier[1].weight)
