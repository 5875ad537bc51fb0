"""Loading weights into a registered model: local state dict files (read safely, keys adapted
from the common layouts) and torchvision's published weights.

A state dict may be that of the raw network (``conv1.weight`` ...), of a whole
:class:`~pipeline.models.normalized.Normalized` model (``net.conv1.weight`` ..., plus
``mean`` / ``std``), wrapped by ``nn.DataParallel`` (``module.``) or ``torch.compile``
(``_orig_mod.``), torchvision's official ImageNet weights, or an
akamaster/pytorch_resnet_cifar10 checkpoint for the CIFAR ResNets.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import RefusedFileError, refusal_message

from .registry import ModelInfo, list_models, model_info

__all__ = ["TORCHVISION_PREFIX", "load_state_dict_file", "load_weights", "torchvision_weights",
           "torchvision_weights_file"]


# Prefixes added by wrappers around a model: nn.DataParallel / DistributedDataParallel
# ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


TORCHVISION_PREFIX = "torchvision:"
"""``model.checkpoint`` of the form ``torchvision:<WEIGHTS>`` names torchvision's published
weights of the architecture (e.g. ``torchvision:IMAGENET1K_V1`` for resnet50)."""


def torchvision_weights(name: str, weights: str) -> Any:
    """torchvision's weights enum member ``weights`` of model ``name`` (nothing is downloaded).

    Raises:
        ValueError: ``name`` is not a torchvision model, or has no weights called ``weights``
            (the message lists the ones it has).
    """
    if model_info(name).family != "torchvision":
        raise ValueError(f"{name!r} is not a torchvision model; torchvision: weights exist for "
                         f"{', '.join(n for n in list_models() if model_info(n).family == 'torchvision')}")
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if weights not in enum.__members__:
        raise ValueError(f"torchvision has no weights {weights!r} for {name}; choose one of: "
                         f"{', '.join(enum.__members__)}")
    return enum[weights]


def torchvision_weights_file(name: str, weights: str, download: bool = True) -> Path:
    """The local file of torchvision's published weights ``weights`` of model ``name``.

    Looks in torch hub's cache (``$TORCH_HOME/hub/checkpoints/``, where torchvision's own
    ``weights=`` argument keeps them) and, when the file is not there and ``download``,
    downloads it with :func:`torch.hub.download_url_to_file`, checking the SHA-256 prefix
    in its name as torchvision does.

    Args:
        name: a registered model of the ``torchvision`` family (``resnet50``, ...).
        weights: a member name of its torchvision weights enum, e.g. ``"IMAGENET1K_V1"``.
        download: fetch the file when it is not cached.

    Returns:
        The path of the state dict file (torchvision's naming, e.g. ``resnet50-0676ba61.pth``).

    Raises:
        ValueError: ``name`` has no torchvision weights, ``weights`` is not one of them, or
            the download failed / is not allowed (the message names the file to place).
    """
    import os
    import urllib.parse

    url = torchvision_weights(name, weights).url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
    if path.is_file():
        return path
    if not download:
        raise ValueError(f"torchvision's {name} {weights} weights are not in {path.parent}; they are downloaded "
                         "by train_baseline")
    match = re.search(r"-([a-f0-9]*)\.", path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=True)
    except Exception as exc:  # no network, a proxy, a truncated file
        raise ValueError(f"downloading {url} failed ({_first_line(exc)}); fetch it where there is internet and "
                         f"place it at {path}, or give a local state dict file") from None
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``, safely.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``,
    so only tensors and plain containers are unpickled: a checkpoint holding arbitrary
    Python objects is refused instead of executing code. Accepted layouts:

    * a bare state dict ``{"conv1.weight": tensor, ...}``;
    * a checkpoint dict with the state dict under ``"state_dict"`` or ``"model"``
      (other entries such as ``"epoch"`` are ignored).

    A leading ``"module."`` (``nn.DataParallel`` / DDP) or ``"_orig_mod."``
    (``torch.compile``) is stripped from every key that has it.

    Args:
        path: the checkpoint file.

    Returns:
        ``dict[str, torch.Tensor]`` with all tensors on the CPU, dtypes as saved.

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: the file cannot be read with ``weights_only=True`` (corrupt, not a
            torch file, or containing pickled objects), or holds no mapping of
            parameter names to tensors. The one-line message names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {str(Path.cwd())!r})"
        raise FileNotFoundError(f"weights file {str(path)!r} not found{where}; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:  # what weights_only=True refuses; torch's hint to load it anyway left out
        raise RefusedFileError(refusal_message(path, err)) from None
    except Exception as err:  # RuntimeError (bad zip), EOFError, IndexError, ...
        raise ValueError(
            f"cannot read weights file {str(path)!r} with torch.load(weights_only=True) "
            f"({_first_line(err)}); re-save it with torch.save(model.state_dict(), path)"
        ) from err

    state = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(
            f"weights file {str(path)!r} holds {type(state).__name__}, not a state dict; "
            f"save torch.save(model.state_dict(), path) or a dict with key 'state_dict' or 'model'"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"weights file {str(path)!r} is not a state dict (entry {bad[0]!r} is not a named tensor); "
            f"save torch.save(model.state_dict(), path) or a dict with key 'state_dict' or 'model'"
        )

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _fmt(t: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in t.float().flatten().tolist()) + ")"


def _adapt_keys(state: dict[str, torch.Tensor], net: nn.Module, info: ModelInfo,
                mean: torch.Tensor, std: torch.Tensor, path: Path) -> dict[str, torch.Tensor]:
    """Map a loaded state dict onto the keys of the raw network ``net``."""
    if any(k.startswith("net.") for k in state):
        # A whole Normalized model: check its normalisation agrees with the one asked for.
        for buf_name, wanted in (("mean", mean), ("std", std)):
            saved = state.get(buf_name)
            if saved is not None and (
                saved.numel() != 3
                or not torch.allclose(saved.float().flatten(), wanted.flatten(), rtol=1e-4, atol=1e-6)
            ):
                raise ValueError(
                    f"weights file {str(path)!r} was saved with {buf_name}={_fmt(saved)} but "
                    f"{buf_name}={_fmt(wanted)} was requested; pass the {buf_name} the model was trained with"
                )
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")} | {
            k: v for k, v in state.items() if not k.startswith("net.") and k not in ("mean", "std")
        }
    net_keys = set(net.state_dict())
    if info.family == "cifar_resnet" and "fc.weight" in net_keys and "linear.weight" in state:
        # akamaster/pytorch_resnet_cifar10 names the classifier "linear"; ours is "fc".
        state = {("fc." + k[len("linear."):] if k.startswith("linear.") else k): v for k, v in state.items()}
    if info.name.startswith("densenet"):
        # torchvision's published DenseNet weights name BatchNorm/conv layers "norm.1",
        # "conv.2"; the module names are "norm1", "conv2" (torchvision's own densenet
        # _load_state_dict renames them with this pattern).
        pattern = re.compile(
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {(m.group(1) + m.group(2) if (m := pattern.match(k)) else k): v for k, v in state.items()}
    if not any(k.startswith("AuxLogits.") for k in net_keys):
        # torchvision's ImageNet inception_v3 weights include the auxiliary classifier;
        # our inception_v3 is built with aux_logits=False, so those keys are dropped.
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    return state


def _describe_mismatch(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    shape_diff = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    if shape_diff:
        k = shape_diff[0]
        parts.append(
            f"{len(shape_diff)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} "
            f"vs model {tuple(expected[k].shape)}"
        )
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]!r}")
    return "; ".join(parts) or "load_state_dict failed"



def load_weights(net: nn.Module, info: ModelInfo, num_classes: int, mean: torch.Tensor, std: torch.Tensor,
                 weights: str | Path) -> None:
    """Load the state dict file ``weights`` into the raw network ``net`` of model ``info``
    (``strict=True``, keys adapted as the module docstring says; ``mean``/``std`` the
    normalisation buffers asked for, which a whole saved model's must equal).

    Raises:
        ValueError: the file is unreadable, or does not fit the architecture / ``num_classes``
            (the message names the file and the first mismatch).
        FileNotFoundError: ``weights`` does not exist.
    """
    path = Path(weights)
    state = load_state_dict_file(path)
    state = _adapt_keys(state, net, info, mean, std, path)
    expected = net.state_dict()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"weights file {str(path)!r} does not fit model {info.name!r} with num_classes={num_classes} "
            f"({_describe_mismatch(state, expected)}); pass the architecture and num_classes "
            f"it was trained with"
        ) from err
