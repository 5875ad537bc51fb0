"""The losses a universal patch minimises, one registered function per module of this package.

A universal patch attack (:func:`pipeline.attacks.patch.train_universal_patch`) is the same
optimisation for every loss: signed-gradient steps on one patch pasted at random places
(EOT) over a set of training images. What differs between AdvP, LaVAN and any new one is
the loss, so a new patch attack is one file here:

.. code-block:: python

    # pipeline/attacks/patch_losses/my_loss.py
    from pipeline.attacks.patch_losses import register_patch_loss

    @register_patch_loss("my_loss", "one line for the docs and error messages")
    def my_loss(logits, labels, target):
        ...  # scalar, mean over the batch; minimised

plus its name in ``patch.attacks``; ``evaluate.attacks`` then accepts ``my_loss``,
``my_loss_adaptive``, ``my_loss_bpda`` and ``my_loss_worst`` cells. Every module of this
package is imported at the first lookup (no list to keep; an import error is raised, not
swallowed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.registry import Registry

PatchLossFn = Callable[[torch.Tensor, torch.Tensor, "int | None"], torch.Tensor]
"""``loss(logits float (N, K), labels int64 (N,), target class or None) -> scalar tensor``, minimised."""


@dataclass(frozen=True)
class PatchLoss:
    """A registered patch loss: its ``name`` (the key of ``patch.attacks``), a one-line
    ``description`` and the function ``fn`` (:data:`PatchLossFn`)."""

    name: str
    description: str
    fn: PatchLossFn


PATCH_LOSSES: Registry[PatchLoss] = Registry("patch attack", __name__)
"""The patch losses, found by importing every module of this package."""


def register_patch_loss(name: str, description: str) -> Callable[[PatchLossFn], PatchLossFn]:
    """Register the decorated function as the loss of universal patch attack ``name``.

    Raises:
        ValueError: ``name`` is taken, is not a lower-case identifier, or ends in
            ``_adaptive``, ``_bpda`` or ``_worst`` (the suffixes of evaluate's patch cells).
    """
    if not name.isidentifier() or name != name.lower() or name.endswith(("_adaptive", "_bpda", "_worst")):
        raise ValueError(f"patch loss name {name!r}: use a lower-case identifier without _adaptive/_bpda/_worst")

    def register(fn: PatchLossFn) -> PatchLossFn:
        PATCH_LOSSES.add(name, PatchLoss(name, description, fn), same=lambda old, new: old.fn is new.fn)
        return fn

    return register


def patch_losses() -> dict[str, PatchLoss]:
    """Every registered patch loss by name, in name order."""
    return dict(PATCH_LOSSES.items())


def get_patch_loss(name: str) -> PatchLoss:
    """The registered patch loss ``name``.

    Raises:
        ValueError: no loss of that name (the message lists the registered ones).
    """
    return PATCH_LOSSES.get(name)
