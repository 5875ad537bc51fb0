"""A model by name: a registered one or the user's own ``module:callable``, built, wrapped in
input normalisation, weights loaded."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .normalized import Normalized
from .registry import MODELS, ModelFactory, ModelInfo
from .weights import load_weights

__all__ = ["build_model", "is_import_path", "resolve_model"]


def is_import_path(name: str) -> bool:
    """Whether ``name`` names the user's own factory (``"package.module:callable"``), not a registry entry."""
    return ":" in name


def resolve_model(name: str) -> tuple[ModelInfo, ModelFactory]:
    """``(info, factory)`` of a registered model, or of ``"package.module:callable"``.

    An import path is imported like ``pkg.module`` and the callable looked up in it (a dotted
    attribute such as ``"nets:Zoo.small"`` is followed); its info has family ``"external"`` and
    ``input_size`` 0 (unknown).

    Raises:
        ValueError: an unknown registry name (the message lists the names), a module that does
            not import, or an attribute that is missing or not callable; one line with the fix.
    """
    if not is_import_path(name):
        return MODELS.get(name)
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {name!r}: write an import path as 'package.module:callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({exc}); install the package or put its "
                         "folder on PYTHONPATH (the Ray workers need it too)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {name!r}: {module_name!r} has no attribute {attr!r}; check the name after ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {name!r}: {attr!r} is not callable; name a class or a function returning an nn.Module")
    return ModelInfo(name=name, input_size=0, family="external"), obj


def _call_factory(factory: ModelFactory, name: str, num_classes: int, in_channels: int,
                  kwargs: Mapping[str, Any]) -> nn.Module:
    """``factory(**kwargs, num_classes=..., in_channels=...)``, each of the two only where the
    factory takes a parameter of that name (or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass what the registry promises
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    call = dict(kwargs)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in call:
            raise ValueError(f"model {name!r}: model.kwargs must not set {key} (it comes from the data)")
        if takes_any or key in params:
            call[key] = value
        elif key == "in_channels" and in_channels != 3:
            raise ValueError(f"model {name!r} takes 3-channel (RGB) images and the data have {in_channels}; "
                             "set data.channels: 3 (grey repeated), or give the factory an in_channels parameter")
    try:
        net = factory(**call)
    except TypeError as exc:
        raise ValueError(f"model {name!r}: calling it with {sorted(call)} failed ({exc}); check model.kwargs") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"model {name!r} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def build_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    weights: str | Path | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> Normalized:
    """Build model ``name`` wrapped in :class:`Normalized`.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet20"``, or the user's own
            factory as ``"package.module:callable"`` (:func:`resolve_model`), called with
            ``kwargs`` plus ``num_classes`` and ``in_channels`` where it takes parameters of
            those names; it returns the raw network, mapping normalised ``(N, C, H, W)``
            images to ``(N, num_classes)`` logits.
        num_classes: number of output logits (>= 1).
        mean: per-channel means of the training data (``C`` values: 3 for RGB, 1 for grey, in
            ``[0, 1]`` units); their number is the network's ``in_channels``.
        std: per-channel standard deviations (``C`` values, > 0).
        weights: optional local file (never downloaded) holding either the state dict
            of the raw network (keys ``conv1.weight`` ...) or of a whole
            :class:`Normalized` model (keys ``net.conv1.weight`` ..., plus ``mean`` /
            ``std``, which must then equal the ``mean`` / ``std`` given here), read with
            :func:`load_state_dict_file` and loaded with ``strict=True``. Also
            accepted: torchvision's official ImageNet state dicts (for inception_v3
            their ``AuxLogits.*`` keys are dropped, as the model is built with
            ``aux_logits=False``) and akamaster/pytorch_resnet_cifar10 checkpoints
            for the CIFAR ResNets (``linear.*`` is renamed ``fc.*``).
        kwargs: more keyword arguments of the factory (``model.kwargs``; for import paths).

    Returns:
        A :class:`Normalized` module (in training mode, the PyTorch default; call
        ``.eval()`` for inference) on the CPU, mapping ``(N, C, H, W)`` images in
        ``[0, 1]`` to ``(N, num_classes)`` logits.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names) or an import path
            that does not resolve, ``num_classes < 1``, bad ``mean`` / ``std``, a factory
            that takes no ``in_channels`` for non-RGB data, or ``weights`` unreadable or
            not matching the architecture / ``num_classes`` (the message names the file).
        FileNotFoundError: ``weights`` does not exist.
    """
    info, factory = resolve_model(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"build_model({name!r}): num_classes must be an int >= 1, got {num_classes!r}")
    model = Normalized(_call_factory(factory, name, num_classes, len(mean), kwargs or {}), mean, std)
    if weights is not None:
        load_weights(model.net, info, num_classes, model.mean, model.std, weights)
    return model
