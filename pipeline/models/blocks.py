"""The modules that feature-level defenses count as a network's cascaded blocks."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["find_blocks", "fnc_block_types"]


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


def find_blocks(model: nn.Module, block_types: Iterable[type | str] | None = None) -> list[tuple[str, nn.Module]]:
    """The cascaded blocks of ``model``, ``(qualified name, module)`` in ``named_modules`` order.

    Which modules are blocks:

    * ``block_types`` given: every instance of those classes, each a class or a class name
      (``"BasicBlock"``, or qualified ``"mypackage.nets.Block"``): ``fnc.block_types`` for an
      architecture the registry does not know;
    * otherwise the instances of :func:`fnc_block_types` (the registered architectures' blocks);
    * and when the model has none of those, the default rule for other architectures: every
      child of an ``nn.Sequential`` that has children of its own and is not itself an
      ``nn.Sequential`` (a residual block, a conv-BN-ReLU group inside a stage), so a network
      built as stages of blocks gets the clipping after each block, as Yu et al. (ICCV 2021,
      Section 4) insert it after each of ResNet's residual blocks.

    Blocks nested inside another block are kept too (as ``named_modules`` lists them).

    Args:
        model: any network (``nn.Module``).
        block_types: classes or class names; None: the rule above.

    Returns:
        ``[(name, module), ...]``, possibly empty.
    """
    if block_types is not None:
        wanted = list(block_types)
        types = tuple(t for t in wanted if isinstance(t, type))
        names = {t for t in wanted if isinstance(t, str)}
        return [(n, m) for n, m in model.named_modules()
                if (types and isinstance(m, types)) or type(m).__name__ in names
                or f"{type(m).__module__}.{type(m).__qualname__}" in names]
    known = fnc_block_types()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, known)]
    if found:
        return found
    inside = {id(c) for m in model.modules() if isinstance(m, nn.Sequential) for c in m.children()
              if not isinstance(c, nn.Sequential) and next(c.children(), None) is not None}
    return [(n, m) for n, m in model.named_modules() if id(m) in inside]
