"""The prepare stage's work: decode a dataset once into compact uint8 tensors.

Reads ``data.root`` in any layout of :mod:`pipeline.data.sources` (archives are
read in place; for ``data.dataset: imagefolder`` the classes are the folders, the channels
and mean / std come from the images), optionally keeps a deterministic per-class subset, decodes the
images in shards (one task each, fanned out by the caller's ``mapper``, Ray in
the stage), holds ``data.val_per_class`` training images a class out as the
validation split, and writes ``train.pt``, ``val.pt``, ``test.pt`` and ``meta.json`` into the
output folder through a temporary folder beside it, so a failed run leaves nothing behind (not even
the parent folders it created).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data.datasets import DATASETS, decode_image, image_channels
from pipeline.data.sources import (
    NO_SOURCE_HINT,
    SPLITS,
    DatasetError,
    Source,
    SplitListing,
    find_source,
    list_split,
    read_class_names,
    read_members,
    source_checksums,
)
from pipeline.io import save_json, save_torch, sha256_file

log = logging.getLogger(__name__)

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


def decode_shard(shard: tuple[list[str], list[bytes], int | None, int]) -> np.ndarray:
    """Decode one shard: ``(names, encoded bytes, image_size, channels)`` to uint8 (n, C, H, W).

    ``image_size`` None keeps the images as stored; an int resizes and centre-crops each
    to (C, image_size, image_size); ``channels`` 3 is RGB, 1 grey
    (:func:`pipeline.data.datasets.decode_image`).

    Raises:
        ValueError: an image does not decode, or the images differ in size.
    """
    names, blobs, size, channels = shard
    arrays = [decode_image(b, n, size, channels) for n, b in zip(names, blobs, strict=True)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size ({sorted(shapes)[:3]}...); set data.image_size to resize and "
                         "centre-crop them")
    return np.stack(arrays) if arrays else np.zeros((0, channels, 1, 1), np.uint8)


def subset_per_class(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    """Indices of ``per_class`` images of every class, drawn with ``seed``, sorted.

    Deterministic: the same labels, count and seed give the same indices.
    ``per_class=None`` keeps everything. A class with fewer images keeps all.
    """
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.sort(np.concatenate(keep))


def split_validation(
    labels: np.ndarray, keep: np.ndarray, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold ``per_class`` images of every class out of the kept training images.

    Args:
        labels: int (N,) labels of the whole training listing.
        keep: sorted indices into ``labels`` of the training images kept (:func:`subset_per_class`).
        per_class: validation images a class (0: none); a class with fewer kept images gives
            all but one of them.
        seed: seeds the draw (a stream of its own, so the training subset does not shift it).

    Returns:
        ``(train, val)``: disjoint sorted index arrays whose union is ``keep``.
    """
    if per_class <= 0:
        return keep, keep[:0]
    rng = np.random.default_rng([seed, 1])
    val = []
    for c in np.unique(labels[keep]):
        idx = keep[labels[keep] == c]
        val.append(rng.permutation(idx)[: min(per_class, len(idx) - 1)])
    val_idx = np.sort(np.concatenate(val))
    return np.setdiff1d(keep, val_idx), val_idx


def check_source(cfg: DataConfig) -> Source | None:
    """The dataset source under ``data.root`` (its layout detected once), or None when the
    folder holds none yet but the dataset will be downloaded into it; reads no image and
    downloads nothing.

    Raises:
        DatasetError: ``data.root`` is empty, missing or holds no accepted layout,
            and ``data.download`` is false or the dataset cannot be downloaded; the
            message says where to get it.
    """
    if not str(cfg.root).strip():
        raise DatasetError("data.root is empty; set it to the dataset folder (README, Data)")
    root = Path(cfg.root).expanduser()
    source = find_source(root)
    if source is not None:
        return source
    what = "does not exist" if not root.exists() else "holds no accepted dataset layout"
    if cfg.dataset == "imagefolder":
        raise DatasetError(f"data.root {root} {what}; point it at a folder with train/<class>/<image> and "
                           "test/<class>/<image>, or train.zip + test.zip holding them")
    info = DATASETS[cfg.dataset]
    if not info.downloadable:
        raise DatasetError(f"data.root {root} {what}; {cfg.dataset} cannot be downloaded automatically: {info.source_hint}")
    if not cfg.download:
        raise DatasetError(
            f"data.root {root} {what}; point it at a folder with train.zip + test.zip, "
            "train/ + test/ class folders, or cifar-10-batches-py, or set data.download: true"
        )
    return None


def resolve_source(cfg: DataConfig) -> Source:
    """The source to read (:func:`check_source`), downloading with torchvision when allowed and needed.

    Only CIFAR-10 can be downloaded (torchvision's ``CIFAR10``); GTSRB at 32x32
    has no download in this layout (see ``DATASETS["gtsrb"].source_hint``).

    Raises:
        DatasetError: nothing usable under ``data.root`` and ``data.download`` is
            false, or the dataset cannot be downloaded; the message says where
            to get it.
    """
    source = check_source(cfg)
    if source is not None:
        return source
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root).expanduser()
    log.info("downloading CIFAR-10 into %s (torchvision)", root)
    for train in (True, False):
        CIFAR10(str(root), train=train, download=True)
    source = find_source(root)
    if source is None:
        raise DatasetError(f"data.root {root}: the download finished but left no dataset; {NO_SOURCE_HINT}")
    return source


def class_names(cfg: DataConfig, root: Path) -> list[str]:
    """The class names of ``cfg.dataset`` in label order, as written to ``meta.json``.

    For a dataset with a class-list file (GTSRB: ``root/classes.csv``) the names
    are read from it (:func:`pipeline.data.sources.read_class_names`); otherwise
    the built-in names of :data:`pipeline.data.datasets.DATASETS`.

    Raises:
        DatasetError: the class-list file is missing, corrupt or describes other classes.
    """
    info = DATASETS[cfg.dataset]
    if info.classes_file is None:
        return list(info.classes)
    return read_class_names(root / info.classes_file, info.folder_names)


def prepare_dataset(cfg: DataConfig, out_dir: str | Path, seed: int, mapper: Mapper | None = None,
                    source: Source | None = None) -> dict:
    """Decode ``cfg``'s dataset into ``out_dir``; return the meta dict written.

    Args:
        cfg: the ``data`` section of the params.
        out_dir: output folder (replaced as a whole when done).
        seed: seed of the per-class subsets.
        mapper: ``mapper(fn, items) -> [fn(i) for i in items]``, e.g. a Ray
            fan-out; the default runs in this process.
        source: ``data.root`` as :func:`resolve_source` found it (the stage resolves it
            before starting Ray); None: resolved here.

    Returns:
        The meta dict (also written to ``out_dir/meta.json``): dataset (kind) and name (the
        kind, or an ImageFolder's folder name), classes (label order; for GTSRB the names in
        ``classes.csv``; for ``imagefolder`` ``data.classes`` or the sorted folder names),
        channels (1 or 3), mean / std (one per channel, [0, 1] units: the known dataset's, or
        ``data.mean`` / ``data.std``, or computed on the kept training split by
        :func:`channel_mean_std`), horizontal_flip (the dataset's default augmentation), per-split
        counts and per-class counts, image shape (C, H, W), storage mode, source layout and
        checksums (of the archives and, for GTSRB, ``classes.csv``).

    Raises:
        DatasetError: missing, malformed or corrupt source or class-list file
            (before any decoding).
    """
    mapper = mapper or (lambda fn, items: [fn(i) for i in items])
    source = source if source is not None else resolve_source(cfg)
    root = source.root
    if source.layout == "cifar_batches" and cfg.dataset != "cifar10":
        raise DatasetError(f"data.root {root} holds CIFAR-10 batch files, not {cfg.dataset}; check data.root")
    info = DATASETS.get(cfg.dataset)  # None: an ImageFolder whose classes are its folders
    if info is None:
        train = list_split(source, "train", cfg.classes)
        listings = {"train": train, "test": list_split(source, "test", train.classes)}
        names = list(train.classes)
    else:
        names = class_names(cfg, root)
        expected = None if info.folders_sorted else list(info.folder_names)
        listings = {s: list_split(source, s, expected) for s in SPLITS}
        if info.folders_sorted:
            _check_sorted_folders(listings, info.num_classes, cfg.dataset, root)
    per_class = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    keep = {s: subset_per_class(listings[s].labels, per_class[s], seed) for s in SPLITS}
    keep["train"], keep["val"] = split_validation(listings["train"].labels, keep["train"], cfg.val_per_class, seed)
    listings["val"] = listings["train"]  # the validation split is held out of the training images

    channels = _channels(cfg, listings["train"], keep["train"])
    mode, shape = _storage_mode(listings["train"], np.concatenate([keep["train"], keep["val"]]), len(keep["test"]),
                                cfg.lazy_threshold_mb, cfg.image_size, channels)
    if info is None and mode == "lazy" and cfg.mean is None:  # stats would stay unknown
        raise DatasetError(f"{root}: too large to hold decoded (data.lazy_threshold_mb), so its mean / std cannot be "
                           "computed at prepare; give data.mean and data.std (one value a channel, in [0, 1])")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    created = [p for p in tmp.parents if not p.exists()]  # e.g. data/prepared/: removed again on failure
    tmp.mkdir(parents=True)
    # per-channel (mean, std): the known dataset's, data.mean / data.std, or computed on the decoded training split
    stats = ((list(info.mean), list(info.std)) if info is not None else
             (list(cfg.mean), list(cfg.std)) if cfg.mean is not None else None)
    try:
        counts = {}
        for s in (*SPLITS, "val"):
            listing, idx = listings[s], keep[s]
            y = listing.labels[idx]
            if mode == "lazy":
                save_json(
                    {
                        "layout": listing.layout,
                        "source": str(listing.source.resolve()),
                        "members": [listing.members[i] for i in idx],
                        "labels": y.tolist(),
                        "image_size": cfg.image_size,
                        "channels": channels,
                    },
                    tmp / f"{s}_index.json",
                )
            else:
                x = (_decode_split(listing, idx, cfg.num_shards, mapper, cfg.image_size, channels) if len(idx)
                     else np.zeros((0, *shape), np.uint8))
                if s == "train" and stats is None:
                    stats = channel_mean_std(x)
                save_torch({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp / f"{s}.pt")
            counts[s] = {
                "n_images": int(len(idx)),
                "per_class": {names[c]: int((y == c).sum()) for c in range(len(names))},
            }
        meta = {
            "dataset": cfg.dataset,
            "name": cfg.dataset if info is not None else _folder_name(root),
            "classes": names,
            "channels": channels,
            "mean": stats[0],
            "std": stats[1],
            "horizontal_flip": info.horizontal_flip if info is not None else False,
            "image_shape": list(shape),
            "mode": mode,
            "splits": counts,
            "source": {
                "layout": listings["train"].layout,
                "root": str(root),
                "sha256": _checksums(source, info.classes_file if info is not None else None),
            },
            "subset": {"train_per_class": cfg.train_per_class, "test_per_class": cfg.test_per_class,
                       "val_per_class": cfg.val_per_class, "seed": seed},
            "image_size": cfg.image_size,
        }
        save_json(meta, tmp / "meta.json")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # nearest first; only the folders this call made, and only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return meta


def channel_mean_std(x: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation of uint8 images (N, C, H, W), in
    [0, 1] units, accumulated in float64 a ``chunk`` of images at a time (CIFAR-10's training
    set would take 1.2 GB as float64 whole); rounded to 6 decimals.

    Raises:
        DatasetError: no images, or a channel with zero spread (every pixel the same value:
            normalising would divide by zero; give data.mean and data.std).
    """
    if len(x) == 0:
        raise DatasetError("no training images to compute data.mean / data.std on; give them in the params")
    total = np.zeros(x.shape[1])
    squares = np.zeros(x.shape[1])
    for s in range(0, len(x), chunk):
        part = x[s : s + chunk].astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    if (std <= 0).any():
        raise DatasetError("a channel of the training images has no spread (every pixel the same); give data.mean "
                           "and data.std")
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


def _folder_name(root: Path) -> str:
    """An ImageFolder dataset's name: its folder's (``data/mnist`` -> ``mnist``)."""
    return root.resolve().name or "imagefolder"


def _channels(cfg: DataConfig, train: SplitListing, idx: np.ndarray) -> int:
    """``data.channels``, or for an ImageFolder without it what its first kept training image is
    (1 for grey, 3 otherwise); 3 for the known datasets."""
    if cfg.dataset != "imagefolder":
        return 3
    if cfg.channels is not None:
        return cfg.channels
    if train.arrays is not None or not len(idx):
        return 3
    first = train.members[idx[0]]
    try:
        return image_channels(read_members(train, idx[:1])[0], first)
    except ValueError as exc:
        raise DatasetError(f"{train.source}: {exc}") from None


def _checksums(source: Source, classes_file: str | None) -> dict[str, str]:
    """:func:`source_checksums` plus the class-list file's SHA-256 when the dataset has one."""
    out = source_checksums(source)
    if classes_file is not None:
        out[classes_file] = sha256_file(source.root / classes_file)
    return out


def _storage_mode(
    train: SplitListing, train_idx: np.ndarray, n_test: int, threshold_mb: float, size: int | None = None,
    channels: int = 3,
) -> tuple[str, tuple[int, ...]]:
    """``("tensor" | "lazy", (C, H, W))`` from the first image's size (after the resize to
    ``size``, if any, and the conversion to ``channels``) and the image count."""
    if train.arrays is not None:
        return "tensor", tuple(train.arrays.shape[1:])
    try:
        first = decode_image(read_members(train, train_idx[:1])[0], train.members[train_idx[0]], size, channels)
    except ValueError as exc:
        raise DatasetError(f"{train.source}: {exc}") from None
    decoded_mb = (len(train_idx) + n_test) * first.size / 2**20
    return ("lazy" if decoded_mb > threshold_mb else "tensor"), tuple(first.shape)


def _check_sorted_folders(listings: dict[str, SplitListing], num_classes: int, dataset: str, root: Path) -> None:
    """A dataset labelled by sorted folder names (ImageNet) needs all its classes, the same in both splits.

    Raises:
        DatasetError: a split has another number of class folders, or the splits' folders differ.
    """
    for listing in listings.values():
        if len(listing.classes) != num_classes:
            raise DatasetError(
                f"{listing.source}: {len(listing.classes)} class folders, {dataset} has {num_classes}; labels follow "
                "the sorted folder names, so every class folder must be there (use data.train_per_class / "
                f"test_per_class for a smaller set); check data.root {root}")
    train, test = (listings[s].classes for s in SPLITS)
    if train != test:
        diff = sorted(set(train) ^ set(test))
        raise DatasetError(f"{root}: the train and test class folders differ (e.g. {diff[:3]}); they must be the same")


def _decode_split(
    listing: SplitListing, idx: np.ndarray, num_shards: int, mapper: Mapper, size: int | None = None,
    channels: int = 3,
) -> np.ndarray:
    if listing.arrays is not None:
        if size is not None and listing.arrays.shape[-1] != size:
            raise DatasetError(f"{listing.source}: data.image_size {size} needs decoded images; CIFAR-10 batch files "
                               f"are {listing.arrays.shape[-1]}x{listing.arrays.shape[-1]}: set data.image_size: null")
        return np.ascontiguousarray(listing.arrays[idx])
    shards = [s for s in np.array_split(idx, num_shards) if len(s)]
    items = [([listing.members[i] for i in s], read_members(listing, s), size, channels) for s in shards]
    try:
        parts = mapper(decode_shard, items)
    except Exception as exc:  # a Ray task error wraps the original ValueError
        raise DatasetError(f"{listing.source}: {_root_message(exc)}") from exc
    return np.concatenate(parts)


def _root_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return str(cause).strip().splitlines()[-1]
