"""Model registry: pick an image classifier by name, wrap it with input normalisation.

A factory is registered under a name with :func:`register_model` (in the style of
timm's ``timm/models/_registry.py``) together with its metadata (:class:`ModelInfo`:
input resolution and family). :func:`build_model` turns a config string such as
``"resnet20"`` into a :class:`Normalized` network that takes images in ``[0, 1]``,
optionally loading a local state dict (never downloading anything).

Registered models (see :func:`list_models`; ``pipeline.models.MODEL_NAMES`` is the same, as a tuple):

* ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110`` -- the CIFAR-10
  ResNets of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
  Section 4.2 (family ``"cifar_resnet"``, input 32x32), see
  :mod:`pipeline.models.cifar_resnet`.
* ``resnet50`` (224), ``mobilenet_v2`` (224), ``inception_v3`` (299), ``densenet161`` (224) from torchvision,
  randomly initialised (family ``"torchvision"``), see :mod:`pipeline.models.imagenet`.
* ``traffic_cnn`` -- the 4-layer traffic-sign CNN of BlurNet / RP2 (LISA-CNN: 3 conv + 1
  dense, Eykholt et al., CVPR 2018), family ``"traffic_cnn"``, input exactly 32x32 (no
  global pooling), see :mod:`pipeline.models.traffic_sign`. It has no FNC blocks.

Tensor conventions for every model built here: input ``float32`` of shape
``(N, 3, H, W)`` with values in ``[0, 1]`` (``H = W = model_info(name).input_size``;
the CIFAR ResNets and the torchvision models accept other sizes too, thanks to global
average pooling, but inception_v3 needs at least 75x75); output ``float32`` logits of
shape ``(N, num_classes)``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.io import RefusedFileError, refusal_message

__all__ = [
    "ModelInfo",
    "Normalized",
    "build_model",
    "fnc_block_types",
    "list_models",
    "load_state_dict_file",
    "model_info",
    "register_model",
    "torchvision_weights",
    "torchvision_weights_file",
]

ModelFactory = Callable[[int], nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model.

    Attributes:
        name: registry name, e.g. ``"resnet20"``.
        input_size: side in pixels of the square images the model is meant for
            (32 for the CIFAR ResNets, 224 for resnet50 / mobilenet_v2, 299 for
            inception_v3).
        family: ``"cifar_resnet"``, ``"torchvision"`` or ``"traffic_cnn"``.
    """

    name: str
    input_size: int
    family: str


_REGISTRY: dict[str, tuple[ModelInfo, ModelFactory]] = {}


def register_model(name: str, *, input_size: int, family: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under ``name``.

    The factory has the signature ``f(num_classes: int) -> nn.Module`` and returns the
    raw (un-normalised) network, which maps ``(N, 3, H, W)`` normalised ``float32``
    images to ``(N, num_classes)`` logits. The factory is returned unchanged.

    Args:
        name: registry name (non-empty, unique).
        input_size: intended square input side in pixels (positive int).
        family: model family, e.g. ``"cifar_resnet"``, ``"torchvision"``, ``"traffic_cnn"``.

    Raises:
        ValueError: ``name`` is empty or already registered, or ``input_size`` is not
            a positive int, or ``family`` is empty.

    Example::

        @register_model("resnet20", input_size=32, family="cifar_resnet")
        def resnet20(num_classes: int) -> nn.Module: ...
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_model: name must be a non-empty string, got {name!r}")
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size <= 0:
        raise ValueError(f"register_model({name!r}): input_size must be a positive int, got {input_size!r}")
    if not isinstance(family, str) or not family:
        raise ValueError(f"register_model({name!r}): family must be a non-empty string, got {family!r}")

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered; pick another name")
        _REGISTRY[name] = (ModelInfo(name=name, input_size=input_size, family=family), factory)
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted alphabetically (a new list each call)."""
    return sorted(_REGISTRY)


def _unknown(name: object) -> ValueError:
    return ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")


def model_info(name: str) -> ModelInfo:
    """Metadata (:class:`ModelInfo`) of the registered model ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the allowed names.
    """
    try:
        return _REGISTRY[name][0]
    except (KeyError, TypeError):
        raise _unknown(name) from None


class Normalized(nn.Module):
    """A network preceded by per-channel input normalisation.

    ``forward(x)`` takes images ``x`` of shape ``(N, 3, H, W)``, floating point
    (``float32`` unless the module was cast), values in ``[0, 1]``, computes
    ``(x - mean) / std`` with ``mean`` and ``std`` stored as buffers of shape
    ``(1, 3, 1, 1)`` (so they follow ``.to(device)`` and appear in ``state_dict()``
    as ``mean`` / ``std``), and returns ``self.net`` of that: logits of shape
    ``(N, num_classes)``. The value range is not checked (that would cost a device
    sync); the shape is.

    Keeping normalisation inside the model lets attacks and defences work directly
    in ``[0, 1]`` pixel space (patches are pasted and clipped there).

    Args:
        net: the raw network, kept as attribute ``net``.
        mean: 3 per-channel means (RGB).
        std: 3 per-channel standard deviations (RGB), all > 0.

    Raises:
        ValueError: ``mean`` / ``std`` do not have 3 entries or some ``std <= 0``
            (constructor); ``x`` is not 4-D with 3 channels (forward).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32)
        if mean_t.numel() != 3 or std_t.numel() != 3:
            raise ValueError(
                f"Normalized: mean and std need 3 values (RGB), got {len(mean_t)} and {len(std_t)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"Normalized: std must be > 0, got {std_t.tolist()}")
        self.net = net
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1))
        self.register_buffer("std", std_t.view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images in ``[0, 1]`` -> ``(N, num_classes)`` logits."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Normalized: expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


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
                         f"{', '.join(n for n in list_models() if _REGISTRY[n][0].family == 'torchvision')}")
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


def build_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    weights: str | Path | None = None,
) -> Normalized:
    """Build the registered model ``name`` wrapped in :class:`Normalized`.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet20"``.
        num_classes: number of output logits (>= 1).
        mean: 3 per-channel means of the training data (RGB, in ``[0, 1]`` units).
        std: 3 per-channel standard deviations (RGB, > 0).
        weights: optional local file (never downloaded) holding either the state dict
            of the raw network (keys ``conv1.weight`` ...) or of a whole
            :class:`Normalized` model (keys ``net.conv1.weight`` ..., plus ``mean`` /
            ``std``, which must then equal the ``mean`` / ``std`` given here), read with
            :func:`load_state_dict_file` and loaded with ``strict=True``. Also
            accepted: torchvision's official ImageNet state dicts (for inception_v3
            their ``AuxLogits.*`` keys are dropped, as the model is built with
            ``aux_logits=False``) and akamaster/pytorch_resnet_cifar10 checkpoints
            for the CIFAR ResNets (``linear.*`` is renamed ``fc.*``).

    Returns:
        A :class:`Normalized` module (in training mode, the PyTorch default; call
        ``.eval()`` for inference) on the CPU with ``float32`` parameters, mapping
        ``(N, 3, H, W)`` images in ``[0, 1]`` to ``(N, num_classes)`` logits.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names),
            ``num_classes < 1``, bad ``mean`` / ``std``, or ``weights`` unreadable or
            not matching the architecture / ``num_classes`` (the message names the file).
        FileNotFoundError: ``weights`` does not exist.
    """
    if name not in _REGISTRY:
        raise _unknown(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"build_model({name!r}): num_classes must be an int >= 1, got {num_classes!r}")
    info, factory = _REGISTRY[name]
    model = Normalized(factory(num_classes), mean, std)
    if weights is not None:
        path = Path(weights)
        state = load_state_dict_file(path)
        state = _adapt_keys(state, model.net, info, model.mean, model.std, path)
        expected = model.net.state_dict()
        try:
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"weights file {str(path)!r} does not fit model {name!r} with num_classes={num_classes} "
                f"({_describe_mismatch(state, expected)}); pass the architecture and num_classes "
                f"it was trained with"
            ) from err
    return model


def fnc_block_types() -> tuple[type[nn.Module], ...]:
    """Module classes counted as "cascaded blocks" for feature norm clipping.

    Feature norm clipping (Yu et al., "Defending against Universal Adversarial
    Patches by Clipping Feature Norms", ICCV 2021) is inserted after each instance of
    these classes: the CIFAR :class:`pipeline.models.cifar_resnet.BasicBlock`,
    torchvision's ``resnet.BasicBlock`` and ``resnet.Bottleneck``,
    ``mobilenetv2.InvertedResidual`` and ``inception.InceptionA`` ... ``InceptionE``.
    The plain ``traffic_cnn`` has none of these (no cascaded blocks), so FNC's generic
    insertion finds nothing in it and says so.
    """
    from torchvision.models import inception, mobilenetv2, resnet

    from .cifar_resnet import BasicBlock

    return (
        BasicBlock,
        resnet.BasicBlock,
        resnet.Bottleneck,
        mobilenetv2.InvertedResidual,
        inception.InceptionA,
        inception.InceptionB,
        inception.InceptionC,
        inception.InceptionD,
        inception.InceptionE,
    )
