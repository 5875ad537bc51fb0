"""One interface for all defenses: a registry of named, typed, composable defenses.

A defense either changes the network (a module inserted or replaced, possibly with
trainable weights: FNC, BlurNet) or transforms the input before it (input blur).
Each is registered with :func:`register_defense` under a name, with a pydantic
``Params`` model (unknown keys rejected) and an ``apply(model, params)`` function that
modifies the :class:`pipeline.models.Normalized` network in place (network defenses)
or returns a wrapper (input defenses). A checkpoint lists the defenses it was made
with, in order, as ``[{"name": ..., **params}, ...]``
(:func:`pipeline.checkpoint.build_from_spec` applies them before loading the weights,
so trained defense weights load too), so defenses compose: FNC on top of BlurNet is
``[{"name": "blurnet", ...}, {"name": "fnc", ...}]``.

Errors: an unknown name, bad params or a defense that does not fit the model (for
example FNC on a network without residual blocks) raise ``ValueError`` with one line
naming the problem, before any training or evaluation starts
(:func:`check_defenses`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from pipeline.registry import Registry

__all__ = [
    "DEFENSES",
    "DefenseInfo",
    "add_input_transform",
    "DefenseParams",
    "apply_defense_list",
    "check_defenses",
    "defense_info",
    "list_defenses",
    "needs_training",
    "parse_defense",
    "register_defense",
]


class DefenseParams(BaseModel):
    """Base of every defense's params (frozen, unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def trainable(self) -> bool:
        """True when a model with this defense must be trained (the default: False)."""
        return False


@dataclass(frozen=True)
class DefenseInfo:
    """A registered defense.

    Attributes:
        name: registry name (``"fnc"``, ``"blurnet"``, ``"input_blur"``).
        params: its pydantic params class.
        apply: ``apply(model, params) -> model``; network defenses modify ``model`` in
            place and return it, input defenses return a wrapper around it.
        kind: ``"network"`` or ``"input"``.
        source: the paper and section it implements.
        bpda: its modules have a BPDA switch (``set_bpda(on)``: identity backward through a
            step that masks gradients, Athalye et al., ICML 2018, Section 4.1), which the
            ``<attack>_bpda`` patch cells turn on (:func:`set_bpda`).
    """

    name: str
    params: type[DefenseParams]
    apply: Callable[[nn.Module, Any], nn.Module]
    kind: Literal["network", "input"]
    source: str
    bpda: bool = False


DEFENSES: Registry[DefenseInfo] = Registry("defense", "pipeline.defenses")
"""The defenses, found by importing every module of :mod:`pipeline.defenses`: a new defense is
one new module, found without a list to keep."""


def register_defense(
    name: str, params: type[DefenseParams], kind: Literal["network", "input"], source: str, bpda: bool = False
) -> Callable[[Callable[[nn.Module, Any], nn.Module]], Callable[[nn.Module, Any], nn.Module]]:
    """Decorator registering ``apply(model, params)`` as defense ``name`` (``bpda``: its modules
    have a ``set_bpda(on)`` switch, :class:`DefenseInfo`).

    Raises:
        ValueError: ``name`` already registered or ``kind`` unknown.
    """
    if kind not in ("network", "input"):
        raise ValueError(f"defense kind must be 'network' or 'input', got {kind!r}")

    def wrap(apply: Callable[[nn.Module, Any], nn.Module]) -> Callable[[nn.Module, Any], nn.Module]:
        DEFENSES.add(name, DefenseInfo(name, params, apply, kind, source, bpda))
        return apply

    return wrap


class TrainingHook(Protocol):
    """A change to how a model is trained, made by a defense from its key of the ``train``
    section (``train.adversarial``: Madry et al.'s adversarial training). The trainer calls it
    and imports no defense."""

    def training_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
        """The batch a training step learns from, float (B, C, H, W) in [0, 1] (the clean ``x`` by default)."""

    def metric_names(self) -> list[str]:
        """The keys :meth:`epoch_metrics` returns."""

    def epoch_metrics(self, model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], batch_size: int,
                      device: torch.device | str, seed: int, epoch: int) -> dict[str, float]:
        """Metrics after an epoch on the held-out ``test`` images (uint8, int64), e.g. robust accuracy."""


TRAINING_HOOKS: Registry[Callable[[Any], TrainingHook]] = Registry(
    "training hook", "pipeline.defenses", ordered=True)
"""Factories of :class:`TrainingHook` by the ``train`` section's key they read."""


def register_training_hook(key: str) -> Callable[[Callable[[Any], TrainingHook]], Callable[[Any], TrainingHook]]:
    """Register a factory of :class:`TrainingHook` for the ``train`` section's key ``key``: the
    trainer builds ``factory(train[key])`` whenever that key is set.

    Raises:
        ValueError: ``key`` is already registered.
    """
    return TRAINING_HOOKS.decorator(key, same=lambda old, new: old is new)


def training_hooks(train_cfg: Any) -> list[TrainingHook]:
    """The hooks the ``train`` section ``train_cfg`` (a :class:`pipeline.config.TrainConfig`) asks
    for: one per registered key it sets (not None, not empty), in registration order."""
    return [factory(getattr(train_cfg, key)) for key, factory in TRAINING_HOOKS.items()
            if getattr(train_cfg, key, None)]


def set_bpda(model: nn.Module, on: bool) -> int:
    """Switch BPDA on or off in every module of ``model`` that has a ``set_bpda`` hook (FNC's
    clipping: identity backward, forward unchanged); returns how many were switched."""
    modules = [m for m in model.modules() if callable(getattr(m, "set_bpda", None))]
    for m in modules:
        m.set_bpda(on)
    return len(modules)


def has_bpda(defenses: list[dict[str, Any] | str]) -> bool:
    """Whether a checkpoint's ``defenses`` list has a defense with a BPDA switch (:class:`DefenseInfo`)."""
    names = [d.get("name") if isinstance(d, dict) else d for d in defenses]
    return any(n in DEFENSES and DEFENSES.get(n).bpda for n in names)


def penalty_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that add a term to its training loss: those with a
    ``training_penalty()`` method (a defense's hook, e.g. BlurNet's L-inf and TV penalties)."""
    return [m for m in model.modules() if callable(getattr(m, "training_penalty", None))]


def training_penalty(model: nn.Module) -> torch.Tensor:
    """The training-loss term of ``model``'s defenses: the sum of ``training_penalty()`` (a
    scalar tensor each) over :func:`penalty_modules`, in module order; 0 (a CPU scalar)
    without any. The trainer adds it to the loss after every forward pass, so a defense with
    a training penalty is one module defining the method, and the trainer imports no defense."""
    modules = penalty_modules(model)
    if not modules:
        return torch.zeros(())
    return sum((m.training_penalty() for m in modules[1:]), modules[0].training_penalty())


def _pre_transform(module: nn.Module, args: tuple) -> tuple:
    return (module.input_transform(args[0]), *args[1:])


def add_input_transform(model: nn.Module, transform: nn.Module) -> nn.Module:
    """Run ``transform`` on the input before ``model`` (a child ``input_transform`` and a
    forward pre-hook), so the state dict keys do not change (transforms keep no
    persistent state). Returns ``model``.

    Raises:
        ValueError: the model already has an input transform (one per model).
    """
    if hasattr(model, "input_transform"):
        raise ValueError(f"the model already has an input transform ({type(model.input_transform).__name__}); "
                         "use one input defense per model")
    model.add_module("input_transform", transform)
    model.register_forward_pre_hook(_pre_transform)
    return model


def list_defenses() -> list[str]:
    """Registered defense names, sorted."""
    return DEFENSES.names()


def defense_info(name: str) -> DefenseInfo:
    """The registered defense ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    return DEFENSES.get(name)


def parse_defense(entry: dict[str, Any]) -> tuple[DefenseInfo, DefenseParams]:
    """``{"name": ..., **params}`` -> (info, validated params).

    Raises:
        ValueError: no ``name``, an unknown name, or params its schema rejects
            (one line: ``defense <name>.<key>: <problem>``).
    """
    if "name" not in entry:
        raise ValueError(f"a defense entry needs a 'name', got {entry}")
    info = defense_info(entry["name"])
    try:
        params = info.params.model_validate({k: v for k, v in entry.items() if k != "name"})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = "".join(f".{p}" for p in first["loc"])
        raise ValueError(f"defense {info.name}{loc}: {first['msg'].removeprefix('Value error, ')} "
                         f"(got {first.get('input')!r})") from None
    return info, params


def apply_defense_list(model: nn.Module, defenses: list[dict[str, Any]]) -> nn.Module:
    """Apply each ``{"name": ..., **params}`` of ``defenses`` in order.

    Args:
        model: the network (images in [0, 1] -> logits); network defenses modify it in place.
        defenses: checkpoint-style entries.

    Returns:
        The defended model (``model`` itself, or an input-transform wrapper around it).

    Raises:
        ValueError: see :func:`parse_defense`, or the defense does not fit the model.
    """
    for entry in defenses:
        info, params = parse_defense(entry)
        model = info.apply(model, params)
    return model


def check_defenses(
    model_factory: Callable[[], nn.Module], defenses: list[dict[str, Any]], input_shape: tuple[int, int, int]
) -> None:
    """Fail early: apply ``defenses`` to a fresh model from ``model_factory`` and run one
    zero image of ``input_shape`` (C, H, W) through it, then discard it.

    Raises:
        ValueError: as :func:`apply_defense_list`, or the defended model rejects the
            input size (for example a blur kernel larger than a feature map).
    """
    import torch

    model = apply_defense_list(model_factory(), defenses).eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))


def needs_training(defenses: list[dict[str, Any]]) -> bool:
    """True when any defense of the list has trainable parts (its params' ``trainable()``)."""
    return any(parse_defense(entry)[1].trainable() for entry in defenses)
