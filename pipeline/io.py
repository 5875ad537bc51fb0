"""Atomic file output: write to a temporary file beside the target, then rename.

A killed stage never leaves a half-written checkpoint, patch or metrics file:
either the old file (or none) is there, or the complete new one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    """The process's file-creation mask (read from /proc where it can be, so that nothing
    is changed; otherwise set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fileobj)`` on a temporary file, fsync it, rename it to ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give it (``0o666``
    less the umask), not the owner-only ``0o600`` of ``tempfile.mkstemp``, so reports
    and metrics can be read by the group or a web server as any other output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` atomically (tensors and plain containers only, so that
    ``torch.load(weights_only=True)`` can read it back)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


class RefusedFileError(ValueError):
    """``torch.load(weights_only=True)`` refused a file: it holds objects other than tensors
    and plain containers, or is no torch file at all (one-line message naming the file and
    the fix)."""


def refusal_message(path: str | Path, err: BaseException) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused with ``err``.

    Names the file and the global it would have loaded, and says it must be re-saved as a
    state_dict by its owner; torch's own hint to load with ``weights_only=False`` (which
    would run any code the file holds) is left out.
    """
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return (f"{path}: holds objects other than tensors ({found.group(1)}), so torch.load(weights_only=True) "
                "refuses it; its owner must re-save it as a state_dict: torch.save(model.state_dict(), path)")
    return (f"{path}: not a file torch.load(weights_only=True) can read (corrupt, or not written by torch.save); "
            "replace it with an intact copy")


def load_torch(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``.

    Raises:
        RefusedFileError: the file holds pickled objects other than tensors and plain
            containers (code it would run), or is not a torch file (:func:`refusal_message`).
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise RefusedFileError(refusal_message(path, err)) from None


def save_json(obj: Any, path: str | Path) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def image_hwc(image_chw: Any) -> Any:
    """A float image (C, H, W) in [0, 1] (a torch tensor) as a NumPy array for PIL and matplotlib:
    (H, W, 3) for RGB, (H, W) for grey (C = 1), values clamped to [0, 1]."""
    arr = image_chw.detach().cpu().float().clamp(0, 1)
    return arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()


def show_image(ax: Any, image_chw: Any, **kw: Any) -> Any:
    """``ax.imshow`` of a float image (C, H, W) in [0, 1], grey images in grey (not a colour map)."""
    arr = image_hwc(image_chw)
    if arr.ndim == 2:
        kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, **kw}
    return ax.imshow(arr, **kw)


def save_png(image_chw: Any, path: str | Path, upscale: int = 1) -> Path:
    """Save a float image in [0, 1], shape (C, H, W) with C 3 (RGB) or 1 (grey), as an 8-bit PNG.

    ``upscale`` repeats pixels (nearest neighbour) so small patches are visible.
    """
    import io

    import numpy as np
    import torch
    from PIL import Image

    arr = (image_chw.detach().cpu().clamp(0, 1) * 255).round().to(dtype=torch.uint8)
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    if upscale > 1:
        arr = np.repeat(np.repeat(arr, upscale, axis=0), upscale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def figure_png(fig: Any, dpi: int = 120) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG, close it, and write the file atomically."""
    png = figure_png(fig, dpi)
    return atomic_write(path, lambda f: f.write(png))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def empty_dir(path: str | Path) -> Path:
    """``path`` created and emptied of its files (the output folder of a stage that rewrites
    all of them: a rerun leaves no file of the previous one behind); returns it as a Path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.iterdir():
        old.unlink()
    return path
