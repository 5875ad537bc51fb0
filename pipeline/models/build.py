"""A registered model by name: built, wrapped in input normalisation, weights loaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .normalized import Normalized
from .registry import MODELS
from .weights import load_weights

__all__ = ["build_model"]


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
    info, factory = MODELS.get(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"build_model({name!r}): num_classes must be an int >= 1, got {num_classes!r}")
    model = Normalized(factory(num_classes), mean, std)
    if weights is not None:
        load_weights(model.net, info, num_classes, model.mean, model.std, weights)
    return model

