"""One interface for every per-image evasion attack, selected by name from params.

An attack is a class with a typed params model (:class:`AttackParams`, pydantic,
unknown keys rejected) and a :meth:`Attack.perturb` method. The threat model
(norm, ``eps``, step size, steps, restarts, target, mask) is data, in the
params; the method is code. In the style of torchattacks' ``Attack`` base and
MadryLab ``robustness``'s attacker: the base class handles what every attack
shares (eval mode, frozen weights, the [0, 1] input check, batching), each
attack's ``perturb`` is a few readable lines.

Conventions for every attack:

* inputs ``x``: float32 (N, C, H, W), pixels in [0, 1]; the model normalises
  inside (:class:`pipeline.models.Normalized`);
* labels ``y``: int64 (N,);
* budgets (``eps``, step sizes) in pixel units of [0, 1] ("8/255" accepted in
  params files);
* output: float32 (N, C, H, W) in [0, 1], same device as ``x``;
* ``target``: a class index for a targeted attack, ``None`` for untargeted.

Universal attacks (AdvP, LaVAN) are trained once in the ``generate_patches``
stage (:mod:`pipeline.attacks.patch`) and pasted at evaluation; they are not
registered here.
"""

from __future__ import annotations

import fractions
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import nn

from pipeline.registry import Registry

__all__ = [
    "ATTACKS", "Attack", "AttackParams", "Budget", "attack_params_class", "build_attack", "frozen_eval", "is_randomized",
    "list_attacks", "register_attack",
]


def parse_fraction(value: Any) -> Any:
    """Read ``"8/255"`` style strings as floats (other values pass through).

    Raises:
        ValueError: a string with a slash that is not a fraction.
    """
    if isinstance(value, str) and "/" in value:
        try:
            return float(fractions.Fraction(value.replace(" ", "")))
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"cannot read {value!r} as a number") from exc
    return value


Budget = Annotated[float, BeforeValidator(parse_fraction)]
"""A float in pixel units of [0, 1] that params files may write as ``"8/255"``."""


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` in eval mode with ``requires_grad=False`` on every
    parameter, both restored on exit (what :meth:`Attack.__call__` does around an
    attack), so that gradients flow to the input only and BatchNorm
    statistics are neither used from the batch nor updated.

    Yields:
        ``model`` itself.
    """
    was_training = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
        model.train(was_training)


def is_randomized(model: nn.Module) -> bool:
    """Whether ``model``'s forward pass is random in its current mode: some submodule has a
    true ``randomized`` attribute (random resizing and padding; PRM re-drawing its designated
    pixels at inference). Attacks average gradients over several draws on such a model
    (expectation over transformation, EOT; Athalye et al., ICML 2018, Section 4.3)."""
    return any(bool(getattr(m, "randomized", False)) for m in model.modules())


class AttackParams(BaseModel):
    """Params every attack accepts (subclasses add their own).

    Attributes:
        n_images: attack only the first ``n_images`` evaluated test images
            (``None``: all); slow attacks (JSMA, C&W, One Pixel) keep this small
            in the default profile.
        batch_size: images per attack call.
        target: target class (targeted attack) or ``None`` (untargeted).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_images: int | None = Field(None, gt=0, description="attack the first n test images (null: all)")
    batch_size: int = Field(250, ge=1, description="images per attack call")
    target: int | None = Field(None, ge=0, description="target class, or null for untargeted")


class Attack(ABC):
    """A per-image evasion attack.

    Subclasses set ``name`` and ``Params`` and implement :meth:`perturb`;
    :meth:`__call__` does the shared checks and model set-up.

    Args:
        params: an instance of the subclass's ``Params``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, params: AttackParams | None = None) -> None:
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__name__}, got {type(self.params).__name__}")

    needs_fit: ClassVar[bool] = False
    """True for attacks that need :meth:`fit` on clean training images before use."""

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-dependent set-up from clean training images (for example masked PGD's
        pixel robustness map); the default does nothing.

        Args:
            model: the attacked model.
            x: float32 (N, C, H, W) in [0, 1]; y: int64 (N,).
        """
        return None  # noqa: B027 - optional hook, a no-op unless overridden

    def fitted_state(self) -> Any:
        """What :meth:`fit` computed, picklable (tensors on the CPU), so that it is
        computed once per model and shared by every test shard; ``None`` by default."""
        return None

    def load_fitted_state(self, state: Any) -> None:
        """Restore what :meth:`fitted_state` returned, instead of calling :meth:`fit` again."""
        return None  # noqa: B027 - optional hook, a no-op unless overridden

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The adversarial images for one batch (see the module conventions).

        Args:
            model: in eval mode, weights frozen.
            x: float32 (N, C, H, W) in [0, 1].
            y: int64 (N,) true labels.
            generator: CPU generator for any randomness (random starts, populations).

        Returns:
            float32 (N, C, H, W) in [0, 1].
        """

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Attack ``x`` in batches of ``params.batch_size``; see :meth:`perturb`.

        Raises:
            ValueError: ``x`` is not 4-D, is outside [0, 1], or ``y`` does not match it.
        """
        if x.ndim != 4 or y.shape != (len(x),):
            raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{self.name}: images must be in [0, 1]; undo any normalisation (models normalise inside)")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        bs = self.params.batch_size
        with frozen_eval(model):
            out = [self.perturb(model, x[s : s + bs], y[s : s + bs], generator).detach() for s in range(0, len(x), bs)]
        return torch.cat(out) if out else x.clone()


ATTACKS: Registry[type[Attack]] = Registry("attack", "pipeline.attacks")
"""The per-image attacks, found by importing every module of :mod:`pipeline.attacks`: a new
attack is one new module, found without a list to keep; its import errors are raised."""


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator registering an :class:`Attack` subclass under ``name`` (sets ``cls.name``).

    Raises:
        ValueError: the name is taken.
    """

    def decorator(cls: type[Attack]) -> type[Attack]:
        ATTACKS.add(name, cls)
        cls.name = name
        return cls

    return decorator


def list_attacks() -> list[str]:
    """Names of the registered per-image attacks, sorted."""
    return ATTACKS.names()


def attack_params_class(name: str) -> type[AttackParams]:
    """The params model of attack ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return ATTACKS.get(name).Params


def build_attack(name: str, params: AttackParams | dict[str, Any] | None = None) -> Attack:
    """The attack ``name`` with ``params`` (a dict is validated by its params model).

    Raises:
        ValueError: unknown name, or params that fail validation.
    """
    cls_params = attack_params_class(name)
    if isinstance(params, dict) or params is None:
        params = cls_params.model_validate(params or {})
    return ATTACKS.get(name)(params)
