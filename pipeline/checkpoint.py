"""Self-describing model checkpoints, the format every stage writes and reads.

A checkpoint is a dict of plain values and tensors (so ``torch.load`` with
``weights_only=True`` reads it):

    {"arch": "resnet20", "num_classes": 10, "mean": [...], "std": [...],
     "state_dict": {...},                      # of the Normalized model
     "defenses": [{"name": "fnc", "alpha": 1.0, "eps": 1e-6}, ...]}

so a defended model is rebuilt from its file alone: the registered
architecture (or the user's ``"package.module:callable"``, with ``"kwargs"``), its weights,
then each defense re-inserted in order. The number of ``mean`` values is the input channels.

In memory (never in a file), a spec may instead carry the network itself,
``{"module": <nn.Module>, "state_dict": None, "defenses": [...]}``: a model that is
no registered architecture (:func:`pipeline.api.evaluate_model`), sent to the Ray
tasks through the object store (cloudpickle) and rebuilt by :func:`build_from_spec`
as a copy with the defenses inserted.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import load_torch, save_torch
from pipeline.models import build_model


def model_spec(
    arch: str,
    num_classes: int,
    mean: list[float],
    std: list[float],
    state_dict: dict[str, torch.Tensor] | None,
    defenses: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A checkpoint dict (see module docstring); tensors are moved to the CPU. ``arch`` is a
    registered name or ``"package.module:callable"``; ``kwargs`` (``model.kwargs``, plain values)
    is stored only when not empty, so the checkpoints of registered models keep their keys."""
    spec = {
        "arch": arch,
        "num_classes": int(num_classes),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "state_dict": None if state_dict is None else {k: v.detach().cpu() for k, v in state_dict.items()},
        "defenses": list(defenses or []),
    }
    if kwargs:
        spec["kwargs"] = dict(kwargs)
    return spec


def apply_defenses(model: nn.Module, defenses: list[dict[str, Any]]) -> nn.Module:
    """Apply each defense of a checkpoint's ``defenses`` list to ``model``, in order
    (:func:`pipeline.defenses.base.apply_defense_list`).

    Returns:
        The defended model (``model`` modified in place, or a wrapper).

    Raises:
        ValueError: an unknown defense name, bad params, or a defense that does not fit.
    """
    from pipeline.defenses.base import apply_defense_list

    return apply_defense_list(model, defenses)


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The model a checkpoint dict describes, in eval mode, on the CPU.

    The defenses are applied before the weights are loaded, so weights that belong to
    a defense (learned BlurNet kernels) load too. A spec with a ``module`` (in memory
    only) builds a deep copy of that module instead of a registered architecture, so
    inserting defenses never changes the module the spec holds.

    Raises:
        ValueError: unknown architecture or defense, or weights that do not fit.
    """
    if spec.get("module") is not None:
        model = copy.deepcopy(spec["module"]).cpu()
    else:
        model = build_model(spec["arch"], spec["num_classes"], spec["mean"], spec["std"], kwargs=spec.get("kwargs"))
    model = apply_defenses(model, spec.get("defenses", []))
    if spec.get("state_dict") is not None:
        model.load_state_dict(spec["state_dict"], strict=True)
    return model.eval()


def save_checkpoint(spec: dict[str, Any], path: str | Path) -> Path:
    """Write a checkpoint dict atomically.

    Raises:
        ValueError: the spec holds a ``module`` (in memory only: files hold plain values and tensors).
    """
    if spec.get("module") is not None:
        raise ValueError(f"{path}: a spec holding a module object cannot be saved; save its state_dict with an arch")
    return save_torch(spec, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file (run the stage that writes it).
        pipeline.io.RefusedFileError: the file holds objects other than tensors (its owner must
            re-save it as a state_dict) or is not a torch file; one line naming the file.
        ValueError: the file is not a checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint missing; run the stage that writes it (dvc repro)")
    spec = load_torch(path)
    if not isinstance(spec, dict) or "arch" not in spec or "state_dict" not in spec:
        raise ValueError(f"{path}: not a pipeline checkpoint (expected keys arch, state_dict, ...)")
    return spec
