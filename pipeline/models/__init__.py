"""Image classifiers selected by name, wrapped so that they take images in ``[0, 1]``.

``build_model("resnet20", num_classes=10, mean=..., std=...)`` returns a
:class:`Normalized` module mapping ``float32`` ``(N, C, H, W)`` images in ``[0, 1]`` to
``(N, num_classes)`` logits. See :mod:`pipeline.models.registry` for the registry,
:mod:`pipeline.models.build` / :mod:`~pipeline.models.normalized` / :mod:`~pipeline.models.weights`
for building (a registered name, or the user's own ``"package.module:callable"``), wrapping
and loading weights, :mod:`pipeline.models.blocks` for the blocks feature-level defenses act on,
:mod:`pipeline.models.cifar_resnet` for the CIFAR ResNets (He et al. 2016, Section 4.2),
:mod:`pipeline.models.imagenet` for the torchvision models and
:mod:`pipeline.models.traffic_sign` for the traffic-sign CNN (``traffic_cnn``).
"""

from .blocks import find_blocks, fnc_block_types
from .build import build_model, is_import_path, resolve_model
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
    "find_blocks",
    "fnc_block_types",
    "is_import_path",
    "list_models",
    "load_state_dict_file",
    "model_info",
    "register_model",
    "resolve_model",
]
