"""The module classes that feature-level defenses count as a network's cascaded blocks."""

from __future__ import annotations

from torch import nn

__all__ = ["fnc_block_types"]


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
