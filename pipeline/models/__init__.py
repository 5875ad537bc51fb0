"""Image classifiers selected by name, wrapped so that they take images in ``[0, 1]``.

``build_model("resnet20", num_classes=10, mean=..., std=...)`` returns a
:class:`Normalized` module mapping ``float32`` ``(N, 3, H, W)`` images in ``[0, 1]`` to
``(N, num_classes)`` logits. See :mod:`pipeline.models.registry` for the registry,
:mod:`pipeline.models.build` / :mod:`~pipeline.models.normalized` / :mod:`~pipeline.models.weights`
for building, wrapping and loading weights,
:mod:`pipeline.models.cifar_resnet` for the CIFAR ResNets (He et al. 2016, Section 4.2),
:mod:`pipeline.models.imagenet` for the torchvision models and
:mod:`pipeline.models.traffic_sign` for the traffic-sign CNN (``traffic_cnn``).
"""

from .blocks import fnc_block_types
from .build import build_model
from .normalized import Normalized
from .registry import ModelInfo, list_models, model_info, register_model
from .weights import load_state_dict_file

MODEL_NAMES: tuple[str, ...] = tuple(list_models())
"""Names of the built-in models, sorted (a snapshot taken at import; see list_models)."""

__all__ = [
    "MODEL_NAMES",
    "ModelInfo",
    "Normalized",
    "build_model",
    "fnc_block_types",
    "list_models",
    "load_state_dict_file",
    "model_info",
    "register_model",
]
