"""Model registry: pick an image classifier by name, wrap it with input normalisation.

A factory is registered under a name with :func:`register_model` (in the style of
timm's ``timm/models/_registry.py``) together with its metadata (:class:`ModelInfo`:
input resolution and family), in a :class:`pipeline.registry.Registry` filled by importing
every module of :mod:`pipeline.models`. :func:`pipeline.models.build.build_model` turns a
config string such as ``"resnet20"`` into a :class:`~pipeline.models.normalized.Normalized`
network that takes images in ``[0, 1]``, optionally loading a local state dict
(:mod:`pipeline.models.weights`; never downloading anything).

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

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pipeline.registry import Registry

__all__ = ["MODELS", "ModelFactory", "ModelInfo", "list_models", "model_info", "register_model"]

ModelFactory = Callable[..., nn.Module]
"""``f(num_classes, in_channels=3) -> nn.Module`` (``in_channels`` optional: a factory without it
takes RGB images only)."""


@dataclass(frozen=True)
class ModelInfo:
    """Metadata of a registered model.

    Attributes:
        name: registry name, e.g. ``"resnet20"``.
        input_size: side in pixels of the square images the model is meant for
            (32 for the CIFAR ResNets, 224 for resnet50 / mobilenet_v2, 299 for
            inception_v3).
        family: ``"cifar_resnet"``, ``"torchvision"`` or ``"traffic_cnn"``; ``"external"`` for
            the user's own ``module:callable`` (:func:`pipeline.models.build.resolve_model`,
            ``input_size`` 0: unknown).
    """

    name: str
    input_size: int
    family: str


MODELS: Registry[tuple[ModelInfo, ModelFactory]] = Registry("model", "pipeline.models")
"""``name -> (info, factory)``, found by importing every module of :mod:`pipeline.models`."""


def register_model(name: str, *, input_size: int, family: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under ``name``.

    The factory has the signature ``f(num_classes: int, in_channels: int = 3) -> nn.Module``
    (``in_channels`` may be left out, for RGB-only networks) and returns the raw
    (un-normalised) network, which maps ``(N, in_channels, H, W)`` normalised ``float32``
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
        MODELS.add(name, (ModelInfo(name=name, input_size=input_size, family=family), factory))
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted alphabetically (a new list each call)."""
    return MODELS.names()


def model_info(name: str) -> ModelInfo:
    """Metadata (:class:`ModelInfo`) of the registered model ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the allowed names.
    """
    return MODELS.get(name)[0]

