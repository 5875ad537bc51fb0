"""Prepared datasets: what the prepare stage writes and every later stage reads.

Two storage modes, chosen by the prepare stage from the decoded size:

* ``tensor`` (CIFAR-10 and other small sets): ``<split>.pt`` holds
  ``{"x": uint8 (N, C, H, W), "y": int64 (N,)}``; CIFAR-10 takes 184 MB.
* ``lazy`` (ImageNet-size folders): ``<split>_index.json`` lists the source
  members and labels; :class:`LazyImageDataset` decodes one image at a time
  from the archive or folder, so the set is never decoded whole.

Known datasets (:data:`DATASETS`, chosen by ``data.dataset``): ``cifar10``,
``gtsrb`` (43 traffic-sign classes at 32x32, Stallkamp et al., IJCNN 2011, read
from ``train.zip`` / ``test.zip`` + ``classes.csv``) and ``imagenet`` (ILSVRC-2012,
Russakovsky et al., IJCV 2015: a local ``train/<wnid>/`` + ``val/<wnid>/`` tree, images
resized and centre-cropped to ``data.image_size`` when decoded). ``data.dataset: imagefolder``
is any other ImageFolder tree: its classes, channels and mean / std come from the data
(:mod:`pipeline.data.prepare`), and every later stage reads them from the prepared ``meta.json``
(:func:`horizontal_flip`, :func:`dataset_name`), never from :data:`DATASETS`.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.models import ResNet50_Weights

from pipeline.io import load_torch

GTSRB_CLASSES: tuple[str, ...] = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 t",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 t prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 t",
)
"""The 43 GTSRB class names in ClassId order (Stallkamp et al., IJCNN 2011; the same
names as ``classes.csv`` of ``shared/datasets/gtsrb-32``). Class 14 is the stop sign."""

GTSRB_STOP = 14
"""GTSRB ClassId of the stop sign (the RP2 victim class)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Constants of a dataset.

    Attributes:
        classes: class names in label order (built in; for a dataset with a
            ``classes_file`` the names actually written to ``meta.json`` are read
            from that file, which must describe the same number of classes).
        mean: per-channel (RGB) mean of the training images, pixel values in
            [0, 1] (used by the models' input normalisation).
        std: per-channel (RGB) standard deviation of the training images, [0, 1] units.
        image_size: side in pixels of the (square) images.
        folders: class folder names on disk in label order, when they differ
            from ``classes`` (GTSRB: ``00000`` ... ``00042``); ``None``: the
            folders are named like the classes.
        classes_file: name of a CSV file under ``data.root`` (columns
            ``class_id,folder,name``) that must be present and gives the class
            names; ``None``: no such file.
        downloadable: ``data.download: true`` can fetch it with torchvision.
        source_hint: where to get the data when it cannot be downloaded (one line).
        horizontal_flip: whether a left-right mirror keeps every label valid (True
            for CIFAR-10; False for traffic signs, where it turns "keep left" into
            "keep right", so training must not use flip augmentation).
        folders_sorted: the class folders are the source's own names (ImageNet's
            WordNet ids ``n01440764`` ...), any names, as many as ``classes``; label ``i``
            is the ``i``-th folder in sorted order (the ImageFolder convention, which is
            the label order of torchvision's ImageNet weights).
    """

    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    folders: tuple[str, ...] | None = None
    classes_file: str | None = None
    downloadable: bool = False
    source_hint: str = ""
    horizontal_flip: bool = True
    folders_sorted: bool = False

    @property
    def folder_names(self) -> tuple[str, ...]:
        """Class folder names on disk, in label order (``folders`` or ``classes``)."""
        return self.folders if self.folders is not None else self.classes

    @property
    def num_classes(self) -> int:
        """Number of classes (the models' number of logits)."""
        return len(self.classes)


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        image_size=32,
        downloadable=True,
    ),
    # GTSRB at 32x32 (the layout of shared/datasets/gtsrb-32: train.zip / test.zip with
    # train/<00000..00042>/*.png, plus classes.csv). mean / std: computed here over all
    # 39,209 training images of that set (every pixel, population std), in [0, 1] units;
    # the values often quoted for 32x32 GTSRB, (0.3403, 0.3121, 0.3214) / (0.2724,
    # 0.2608, 0.2669), differ by < 0.004.
    "gtsrb": DatasetInfo(
        classes=GTSRB_CLASSES,
        mean=(0.3398, 0.3117, 0.3210),
        std=(0.2755, 0.2647, 0.2712),
        image_size=32,
        folders=tuple(f"{i:05d}" for i in range(len(GTSRB_CLASSES))),
        classes_file="classes.csv",
        downloadable=False,
        source_hint=(
            "torchvision's GTSRB is the variable-size original, not this layout; point data.root at a folder "
            "with train.zip, test.zip and classes.csv, such as shared/datasets/gtsrb-32 (whole images scaled "
            "to 32x32 by hergerr/traffic-sign-recognition, see that folder's README)"
        ),
        horizontal_flip=False,
    ),
    # ILSVRC-2012 (Russakovsky et al., IJCV 2015): 1,000 classes, 1.28M training and 50,000
    # validation images of varying size; mean / std the ones torchvision's ImageNet weights
    # were trained with. The class names are torchvision's (label order = sorted wnids).
    "imagenet": DatasetInfo(
        classes=tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        image_size=224,
        downloadable=False,
        source_hint=(
            "ImageNet has no automatic download (its licence needs a login at image-net.org); point data.root at "
            "a folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (the validation images sorted into class "
            "folders, e.g. by torchvision.datasets.ImageNet or the usual valprep.sh)"
        ),
        folders_sorted=True,
    ),
}


GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
"""PIL image modes with one channel of colour (``LA``: grey plus alpha)."""


def image_channels(blob: bytes, name: str = "<image>") -> int:
    """1 for a grayscale image (PIL modes :data:`GRAYSCALE_MODES`), else 3; reads only the header.

    Raises:
        ValueError: the bytes are not a decodable image (message names ``name``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            return 1 if im.mode in GRAYSCALE_MODES else 3
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise ValueError(f"{name}: not a decodable image; replace the file") from None


def decode_image(blob: bytes, name: str = "<image>", size: int | None = None, channels: int = 3) -> np.ndarray:
    """Decode PNG/JPEG bytes to a uint8 array (C, H, W): RGB (``channels`` 3) or grey (1).

    Args:
        blob: the encoded file.
        name: its name, for error messages.
        channels: 3 converts to RGB (a grey image repeated), 1 to PIL's luminance
            ``L = 0.299 R + 0.587 G + 0.114 B`` (ITU-R 601-2).
        size: None keeps the image as it is; otherwise the standard ImageNet evaluation
            view, with torchvision's own ``Resize(round(size / 0.875))`` + ``CenterCrop(size)``
            (the transform of torchvision's ImageNet weights): the shorter side resized to
            ``round(size / 0.875)`` pixels (256 for 224) with antialiased bilinear
            interpolation, then the central ``size`` x ``size`` square: (3, size, size).

    Raises:
        ValueError: the bytes are not a decodable image (message names ``name``).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob)) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None:
                im = _resize_center_crop(im, size)
            arr = np.asarray(im, dtype=np.uint8)
            if arr.ndim == 2:
                arr = arr[:, :, None]
    except UnidentifiedImageError:  # its message names the in-memory buffer (<_io.BytesIO object at 0x...>)
        raise ValueError(f"{name}: not a decodable image (unknown format or damaged header); replace the file") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{name}: not a decodable image ({exc}); replace the file") from exc
    return arr.transpose(2, 0, 1).copy()


def _resize_center_crop(im: Any, size: int) -> Any:
    """PIL image -> torchvision's ``Resize(round(size / 0.875))`` then ``CenterCrop(size)``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    im = F.resize(im, round(size / 0.875), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(im, [size, size])


class TensorImageDataset(Dataset):
    """Images held in memory as uint8.

    Args:
        x: uint8 tensor (N, C, H, W), pixel values 0-255.
        y: int64 tensor (N,), class indices.
        transform: optional callable on one uint8 (C, H, W) tensor (for example
            a ``torchvision.transforms.v2`` pipeline), returning uint8 (C, H, W).

    Items are ``(uint8 (C, H, W), int64 scalar)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Any = None) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.y[i]


class LazyImageDataset(Dataset):
    """Images decoded one at a time from their source, for sets too large to hold.

    Args:
        index: the ``<split>_index.json`` content written by the prepare stage
            (``layout`` "zip" or "folder", ``source`` path, ``members``, ``labels``, and
            ``image_size``: the side every image is resized and centre-cropped to when
            decoded, see :func:`decode_image`; absent or null: as stored).
        transform: callable on uint8 (3, H, W) giving a fixed-size uint8 (3, S, S)
            (for example ``v2.Compose([v2.Resize(256), v2.CenterCrop(224)])``);
            required for batching images of different sizes.
    """

    def __init__(self, index: dict[str, Any], transform: Any = None) -> None:
        self.layout = index["layout"]
        self.source = Path(index["source"])
        self.members = list(index["members"])
        self.y = torch.tensor(index["labels"], dtype=torch.int64)
        self.size = index.get("image_size")
        self.channels = index.get("channels", 3)
        self.transform = transform
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.members)

    def _read(self, name: str) -> bytes:
        if self.layout == "zip":
            if self._zip is None:  # opened per worker process, on first use
                self._zip = zipfile.ZipFile(self.source)
            return self._zip.read(name)
        return (self.source / name).read_bytes()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.members[i]
        img = torch.from_numpy(decode_image(self._read(name), f"{self.source}: {name}", self.size,
                                                self.channels))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.y[i]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_zip"] = None
        return state


def load_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """The ``meta.json`` the prepare stage wrote (classes, counts, checksums, mode).

    Raises:
        FileNotFoundError: the folder was not prepared (run the prepare stage).
    """
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `dvc repro prepare` first")
    return json.loads(path.read_text())


def horizontal_flip(meta: dict[str, Any], augment: Any = None) -> bool:
    """Whether training flips images left-right: ``train.augment.horizontal_flip`` when set
    (``augment`` a :class:`pipeline.config.AugmentConfig` or None), else the prepared dataset's
    default (``meta["horizontal_flip"]``: True for cifar10 and imagenet; False for gtsrb, where a
    mirror turns "keep left" into "keep right", and for imagefolder, whose classes are unknown)."""
    if augment is not None and augment.horizontal_flip is not None:
        return bool(augment.horizontal_flip)
    if "horizontal_flip" in meta:
        return bool(meta["horizontal_flip"])
    return DATASETS[meta["dataset"]].horizontal_flip  # prepared before the key existed


def dataset_name(meta: dict[str, Any]) -> str:
    """The dataset's name in reports and MLflow tags: the known dataset's (``cifar10``), or an
    ImageFolder's folder name (``meta["name"]``)."""
    return str(meta.get("name") or meta["dataset"])


def load_split(prepared_dir: str | Path, split: str, transform: Any = None) -> Dataset:
    """The prepared ``split`` ("train", "val" or "test") as a dataset of uint8 images.

    Returns:
        :class:`TensorImageDataset` (mode ``tensor``) or :class:`LazyImageDataset`
        (mode ``lazy``); items are ``(uint8 (C, H, W), int64)``.
    """
    prepared_dir = Path(prepared_dir)
    meta = load_meta(prepared_dir)
    if meta["mode"] == "lazy":
        index = json.loads((prepared_dir / f"{split}_index.json").read_text())
        return LazyImageDataset(index, transform)
    blob = load_torch(prepared_dir / f"{split}.pt")
    return TensorImageDataset(blob["x"], blob["y"], transform)


def load_tensors(prepared_dir: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x uint8 (N, C, H, W), y int64 (N,))`` of a split stored in ``tensor`` mode.

    Raises:
        DatasetError: the split was prepared lazily (too large to hold in memory).
    """
    from pipeline.data.sources import DatasetError

    ds = load_split(prepared_dir, split)
    if not isinstance(ds, TensorImageDataset):
        raise DatasetError(
            f"{prepared_dir}: {split} was prepared lazily (larger than data.lazy_threshold_mb); this stage needs "
            "it in memory: raise data.lazy_threshold_mb or use per-class subsets"
        )
    return ds.x, ds.y


def load_validation(prepared_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split, ``(x uint8 (N, C, H, W), y int64 (N,))``: training images held out
    by prepare (``data.val_per_class`` a class) for every selection and calibration, so that no
    value is chosen by looking at test images.

    Raises:
        DatasetError: the folder has no validation split (``data.val_per_class`` 0, or prepared
            before the split existed), or it was prepared lazily.
    """
    from pipeline.data.sources import DatasetError

    meta = load_meta(prepared_dir)
    if not meta["splits"].get("val", {}).get("n_images"):
        raise DatasetError(f"{prepared_dir}: no validation split; set data.val_per_class > 0 and rerun prepare "
                           "(dvc repro prepare)")
    return load_tensors(prepared_dir, "val")


def load_training_subset(prepared_dir: str | Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training images picked at random with ``seed`` (the first ``n`` of the permutation
    ``torch.randperm(N, generator seeded with seed)``, the order every seeded subset of the
    project is a prefix of): ``(x uint8 (n, C, H, W), y int64 (n,))``, contiguous. Used by
    attacks and analyses that fit on data (masked PGD's pixel robustness map), never on test
    images. ``n`` larger than the split gives the whole split, permuted.

    Raises:
        FileNotFoundError: the folder holds no prepared training split (run prepare).
    """
    return seeded_subset(*load_tensors(prepared_dir, "train"), n, seed)


def seeded_subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of ``x`` (N, ...) and ``y`` (N,) in the order ``torch.randperm(N)`` seeded
    with ``seed`` gives (all N, permuted, when ``n >= N``); contiguous copies. The draw of
    :func:`load_training_subset`, for images already in memory (:func:`pipeline.api.evaluate_model`)."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx].contiguous(), y[idx].contiguous()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images 0-255 to float32 in [0, 1] (same shape, same device)."""
    return x.to(torch.float32).div_(255.0)
