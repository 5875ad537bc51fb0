"""Dataset sources: find which layout a folder holds and list its images.

Accepted layouts under ``data.root`` (checked in this order):

1. ``train.zip`` / ``test.zip`` archives holding an ImageFolder tree
   (``train/<class>/<file>`` or ``<class>/<file>``), read in place, never
   unpacked to disk (the layout of ``shared/datasets/cifar10-jpeg``);
2. an ImageFolder tree ``train/<class>/*`` and ``test/<class>/*`` (``val/`` is accepted
   for ``test/``: ImageNet's names, ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``);
3. torchvision's ``cifar-10-batches-py`` (the folder itself or ``root/cifar-10-batches-py``).

A dataset may also need a class-list file beside the archives (GTSRB's
``classes.csv``, read by :func:`read_class_names`).

Every problem is raised as :class:`DatasetError` with a one-line message naming
the file and the fix, before any decoding starts.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from pipeline.io import sha256_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """The dataset folder is missing, malformed or corrupt (one-line message)."""


@dataclass
class SplitListing:
    """The images of one split: where to read each one and its label.

    Attributes:
        layout: ``"zip"``, ``"folder"`` or ``"cifar_batches"``.
        source: the archive, the split folder, or the batches folder.
        members: image names inside ``source`` (archive members or relative
            paths), sorted; empty for ``cifar_batches``.
        labels: int64 array (N,), class index of each member.
        classes: class folder names, in label order.
        arrays: for ``cifar_batches`` only, uint8 images (N, 3, 32, 32).
    """

    layout: str
    source: Path
    members: list[str]
    labels: np.ndarray
    classes: list[str]
    arrays: np.ndarray | None = field(default=None, repr=False)


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    """Reject archive member names that could point outside a folder (zip slip)."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise DatasetError(f"{archive}: unsafe member name {name!r}; the archive is malformed, re-create it")
    return p


def _class_order(found: list[str], expected: list[str] | None, where: Path) -> list[str]:
    """Class names in label order: the dataset's canonical order if given."""
    if expected is None:
        return sorted(found)
    if sorted(found) != sorted(expected):
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise DatasetError(
            f"{where}: class folders do not match the dataset's classes "
            f"(missing {missing}, unexpected {extra}); check data.root and data.dataset"
        )
    return list(expected)


def _list_zip(archive: Path, split: str, expected: list[str] | None) -> SplitListing:
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{archive}: not a readable zip archive ({exc}); replace it with an intact copy") from exc
    entries: list[tuple[str, str]] = []
    for name in names:
        p = _safe_member(name, archive)
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parts = p.parts[1:] if p.parts[0] == split else p.parts
        if len(parts) != 2:
            raise DatasetError(
                f"{archive}: member {name!r} is not <class>/<image> or {split}/<class>/<image>; "
                "pack the archive as an ImageFolder tree"
            )
        entries.append((parts[0], name))
    if not entries:
        raise DatasetError(f"{archive}: holds no images; expected {split}/<class>/<image> members")
    classes = _class_order(sorted({c for c, _ in entries}), expected, archive)
    index = {c: i for i, c in enumerate(classes)}
    entries.sort(key=lambda e: e[1])
    return SplitListing(
        layout="zip",
        source=archive,
        members=[n for _, n in entries],
        labels=np.array([index[c] for c, _ in entries], dtype=np.int64),
        classes=classes,
    )


def _list_folder(folder: Path, expected: list[str] | None) -> SplitListing:
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir())
    if not class_dirs:
        raise DatasetError(f"{folder}: no class folders; expected {folder.name}/<class>/<image>")
    classes = _class_order([d.name for d in class_dirs], expected, folder)
    index = {c: i for i, c in enumerate(classes)}
    entries = sorted(
        (p.relative_to(folder).as_posix(), index[d.name])
        for d in class_dirs
        for p in d.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not entries:
        raise DatasetError(f"{folder}: class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    return SplitListing(
        layout="folder",
        source=folder,
        members=[m for m, _ in entries],
        labels=np.array([y for _, y in entries], dtype=np.int64),
        classes=classes,
    )


CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # arrays, as the original (Python 2) files hold them
    ("numpy._core.multiarray", "_reconstruct"),  # the same, written by NumPy 2
    ("numpy.core.numeric", "_frombuffer"),  # arrays written with pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # bytes written by Python 3 with pickle protocol 2
}
"""The only globals a CIFAR-10 batch file may name: NumPy's array reconstruction. Dicts,
lists, strings and numbers need none."""


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside :data:`CIFAR_PICKLE_GLOBALS`."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only; any other global is refused, so a
    batch file cannot run code (``pickle.load`` would call whatever its ``__reduce__`` names)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if module.startswith("numpy.core."):  # NumPy 2 moved numpy.core to numpy._core (the old name warns)
            module = "numpy._core." + module.removeprefix("numpy.core.")
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:  # NumPy 1.x without numpy._core
            return getattr(importlib.import_module(module.replace("numpy._core.", "numpy.core.")), name)


def _unpickle(path: Path) -> dict:
    """Read one file of ``cifar-10-batches-py`` without running code from it.

    Keys written as bytes (a file saved by Python 3) are decoded, so ``"data"`` and
    ``b"data"`` both read.

    Raises:
        DatasetError: the file does not unpickle, names anything but NumPy's array
            reconstruction (code a plain ``pickle.load`` would run), or is not a dict.
    """
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DatasetError(f"{path}: refused: it would call {exc}, which a CIFAR-10 batch file never holds (code "
                           "hidden in a pickle); replace the folder with torchvision's cifar-10-batches-py") from None
    except Exception as exc:  # noqa: BLE001 - any other failure means a corrupt file
        raise DatasetError(f"{path}: cannot read this CIFAR batch file ({exc}); re-download it") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: holds {type(obj).__name__!r}, not the dict of a CIFAR-10 batch file; re-download it")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one data or test batch.

    Raises:
        DatasetError: the file is unreadable or refused (:func:`_unpickle`), or lacks ``data``
            as uint8 (N, 3072) or ``labels`` as N integers in 0 to ``num_classes - 1``.
    """
    d = _unpickle(path)
    data, labels = d.get("data"), d.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' is {what}, a CIFAR-10 batch holds uint8 (N, 3072) images; re-download it")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        y = None
    if y is None or y.shape != (len(data),) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise DatasetError(f"{path}: 'labels' is not {len(data)} integers in 0-{num_classes - 1} (one per image of "
                           "'data'); re-download it")
    return data.reshape(-1, 3, 32, 32), y


def _read_class_names(path: Path) -> list[str]:
    """``label_names`` of ``batches.meta``.

    Raises:
        DatasetError: the file is unreadable or refused, or has no non-empty list of names.
    """
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list | tuple) or not names or not all(isinstance(n, str | bytes) for n in names):
        raise DatasetError(f"{path}: no 'label_names' list of class names; re-download cifar-10-batches-py")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _list_cifar_batches(folder: Path, split: str) -> SplitListing:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [f for f in files + ["batches.meta"] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{folder}: missing {missing}; the cifar-10-batches-py folder is incomplete, re-download it")
    classes = _read_class_names(folder / "batches.meta")
    xs, ys = zip(*(_read_batch(folder / f, len(classes)) for f in files), strict=True)
    return SplitListing(
        layout="cifar_batches",
        source=folder,
        members=[],
        labels=np.concatenate(ys),
        classes=classes,
        arrays=np.concatenate(xs),
    )


def split_folder(root: Path, split: str) -> Path:
    """The folder of ``split`` in an ImageFolder tree: ``root/<split>``, or ``root/val`` for
    ``test`` when there is no ``root/test`` (ImageNet's name for its held-out split)."""
    if split == "test" and not (root / "test").is_dir() and (root / "val").is_dir():
        return root / "val"
    return root / split


Layout = Literal["zip", "folder", "cifar_batches"]


@dataclass(frozen=True)
class Source:
    """A dataset folder and the layout it holds, detected once (:func:`find_source`) and handed
    to every reader (:func:`list_split`, :func:`source_checksums`).

    Attributes:
        root: the folder given as ``data.root``.
        layout: ``"zip"``, ``"folder"`` or ``"cifar_batches"``.
    """

    root: Path
    layout: Layout

    @property
    def batches_folder(self) -> Path:
        """For ``cifar_batches``: the folder holding ``data_batch_1`` (``root`` or ``root/cifar-10-batches-py``)."""
        return self.root if (self.root / "data_batch_1").is_file() else self.root / "cifar-10-batches-py"


def find_source(root: Path) -> Source | None:
    """``root`` with its detected layout (:func:`detect_layout`), or None when it holds none."""
    layout = detect_layout(root) if root.is_dir() else None
    return Source(root, layout) if layout is not None else None


def detect_layout(root: Path) -> Layout | None:
    """Which accepted layout ``root`` holds: ``zip``, ``folder``, ``cifar_batches`` or None."""
    if all((root / f"{s}.zip").is_file() for s in SPLITS):
        return "zip"
    if all(split_folder(root, s).is_dir() for s in SPLITS):
        return "folder"
    if (root / "data_batch_1").is_file() or (root / "cifar-10-batches-py").is_dir():
        return "cifar_batches"
    return None


def list_split(source: Source, split: str, expected_classes: list[str] | None = None) -> SplitListing:
    """List the images of ``split`` ("train" or "test") of ``source``.

    Args:
        source: the dataset folder and its layout (:func:`find_source`).
        split: ``"train"`` or ``"test"``.
        expected_classes: the dataset's class names in label order; folder
            names must match them (any order on disk).

    Raises:
        DatasetError: the layout is malformed or corrupt.
    """
    if source.layout == "zip":
        return _list_zip(source.root / f"{split}.zip", split, expected_classes)
    if source.layout == "folder":
        return _list_folder(split_folder(source.root, split), expected_classes)
    return _list_cifar_batches(source.batches_folder, split)


def class_folders(source: Source, split: str = "train") -> list[str]:
    """The sorted class folder names of ``split``, without listing its images one by one: the
    sub-folders of an ImageFolder tree, or the ``<class>`` part of an archive's member names.
    Cheap enough to run whenever the params are read (an ImageNet-size tree has 1,000 folders,
    not 1.3 million files to walk).

    Raises:
        DatasetError: the archive is unreadable, or ``source`` holds CIFAR-10 batch files (no folders).
    """
    if source.layout == "folder":
        return sorted(d.name for d in split_folder(source.root, split).iterdir() if d.is_dir())
    if source.layout != "zip":
        raise DatasetError(f"{source.root}: CIFAR-10 batch files have no class folders")
    archive = source.root / f"{split}.zip"
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{archive}: not a readable zip archive ({exc}); replace it with an intact copy") from exc
    found = set()
    for name in names:
        parts = PurePosixPath(name).parts
        parts = parts[1:] if parts[:1] == (split,) else parts
        if len(parts) == 2 and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
            found.add(parts[0])
    return sorted(found)


NO_SOURCE_HINT = ("expected train.zip + test.zip, train/ + test/ (or val/) class folders, or cifar-10-batches-py "
                  "(or set data.download: true)")
"""What an accepted ``data.root`` holds, for the error when it holds none of it."""


CLASS_CSV_COLUMNS = ("class_id", "folder", "name")
"""Columns a class-list CSV must have (any order; more columns are ignored)."""


def read_class_names(path: Path, folders: list[str] | tuple[str, ...]) -> list[str]:
    """Class names from a class-list CSV (GTSRB's ``classes.csv``), in label order.

    The file is UTF-8 CSV with a header naming at least the columns
    ``class_id,folder,name`` and one row per class: ``class_id`` the label
    (0 to K-1, each once), ``folder`` the class folder inside the archives,
    ``name`` a non-empty display name. Rows may come in any order.

    Args:
        path: the CSV file (``data.root / "classes.csv"``).
        folders: the dataset's class folder names in label order (K entries);
            row ``class_id = i`` must name ``folders[i]``.

    Returns:
        K class names, ``names[i]`` the name of label ``i``.

    Raises:
        DatasetError: the file is missing or unreadable, lacks a column, has a
            row that is not ``int,folder,name``, or its ids / folders do not match
            the K classes of the dataset (one-line message naming the file).
    """
    if not path.is_file():
        raise DatasetError(
            f"{path}: missing; this dataset needs its class list ({','.join(CLASS_CSV_COLUMNS)}, one row a class) "
            "beside train.zip and test.zip"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = list(csv.DictReader(io.StringIO(text)))
        header = csv.DictReader(io.StringIO(text)).fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: not a readable UTF-8 CSV file ({exc}); replace it with an intact copy") from exc
    missing = [c for c in CLASS_CSV_COLUMNS if c not in header]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing} (header {header}); expected a header {','.join(CLASS_CSV_COLUMNS)}"
        )
    k = len(folders)
    names: dict[int, str] = {}
    for line, row in enumerate(rows, start=2):
        cid, folder, name = (row.get(c) for c in CLASS_CSV_COLUMNS)
        try:
            label = int(str(cid).strip())
        except ValueError:
            raise DatasetError(f"{path}: line {line}: class_id {cid!r} is not an integer; fix or replace the file") from None
        if not 0 <= label < k:
            raise DatasetError(f"{path}: line {line}: class_id {label} is outside 0-{k - 1}; this dataset has {k} classes")
        if label in names:
            raise DatasetError(f"{path}: line {line}: class_id {label} appears twice; each class needs one row")
        if (folder or "").strip() != folders[label]:
            raise DatasetError(
                f"{path}: line {line}: class_id {label} names folder {folder!r}, expected {folders[label]!r}; "
                "the file does not describe this dataset"
            )
        if not (name or "").strip():
            raise DatasetError(f"{path}: line {line}: class_id {label} has an empty name; fill in the name")
        names[label] = name.strip()
    if len(names) != k:
        absent = sorted(set(range(k)) - set(names))
        raise DatasetError(f"{path}: {len(names)} classes listed, expected {k} (missing class_id {absent[:5]}...)")
    return [names[i] for i in range(k)]


def read_members(listing: SplitListing, indices: np.ndarray) -> list[bytes]:
    """Raw encoded bytes of the selected images, in the order of ``indices``."""
    names = [listing.members[i] for i in indices]
    if listing.layout == "zip":
        try:
            with zipfile.ZipFile(listing.source) as zf:
                return [zf.read(n) for n in names]
        except (zipfile.BadZipFile, OSError, KeyError) as exc:
            raise DatasetError(f"{listing.source}: cannot read members ({exc}); replace the archive") from exc
    return [(listing.source / n).read_bytes() for n in names]


def source_checksums(source: Source) -> dict[str, str]:
    """SHA-256 of the source files the layout reads (archives or batch files).

    For an ImageFolder tree, one digest per split over the sorted relative paths and
    sizes of its files: reading every image of an ImageNet-size tree would take hours, so an
    image rewritten at the same size is not noticed (archives are hashed whole).
    """
    root, out = source.root, {}
    if source.layout == "zip":
        for s in SPLITS:
            out[f"{s}.zip"] = sha256_file(root / f"{s}.zip")
    elif source.layout == "cifar_batches":
        for f in sorted(source.batches_folder.iterdir()):
            if f.is_file():
                out[f.name] = sha256_file(f)
    elif source.layout == "folder":
        for s in SPLITS:
            folder = split_folder(root, s)
            h = hashlib.sha256()
            for p in sorted(folder.rglob("*")):
                if p.is_file():
                    h.update(p.relative_to(folder).as_posix().encode())
                    h.update(str(p.stat().st_size).encode())
            out[s] = h.hexdigest()
    return out
