"""Two interfaces for every attack, in one registry, selected by name from params.

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

Universal attacks (:class:`UniversalAttack`: the patches of every registered loss, AdvP and
LaVAN among them, and RP2's stickers) learn one perturbation for a set of images
(``fit(model, x, y, seed) -> artifact``, in the ``generate_patches`` and ``attack_rp2``
stages and evaluate's adaptive search) and then put it on any image
(``apply(artifact, x, placements)``). Both kinds are registered with
:func:`register_attack`; :func:`list_attacks` lists one kind.
"""

from __future__ import annotations

import fractions
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from torch import nn

from pipeline.registry import Registry

__all__ = [
    "ATTACKS", "Attack", "AttackParams", "Budget", "UniversalAttack", "attack_params_class", "build_attack",
    "build_universal_attack", "frozen_eval", "is_randomized", "list_attacks", "register_attack",
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


class UniversalAttack(ABC):
    """A universal attack: one perturbation learnt for a whole set of images (:meth:`fit`),
    then put on any image (:meth:`apply`): the patches of :mod:`pipeline.attacks.patch` (AdvP,
    LaVAN and every loss of :mod:`pipeline.attacks.patch_losses`) and RP2's stickers
    (:mod:`pipeline.attacks.rp2`).

    Subclasses set ``Params`` (a typed, picklable settings class: it crosses the Ray boundary)
    and implement :meth:`fit` and :meth:`apply`; register them with :func:`register_attack`,
    in the same registry as the per-image attacks (:func:`list_attacks` ``kind``).

    Args:
        params: an instance of the subclass's ``Params``.
    """

    name: ClassVar[str]
    Params: ClassVar[type]

    def __init__(self, params: Any) -> None:
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__name__}, got {type(params).__name__}")
        self.params = params

    @abstractmethod
    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, device: torch.device | str = "cpu",
            init: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """Learn the perturbation against ``model`` (eval mode, weights frozen for the call).

        Args:
            model: maps float (N, 3, H, W) in [0, 1] to logits.
            x: uint8 (N, 3, H, W), 0-255, the images it is learnt on; y: int64 (N,) their labels.
            seed: seeds every random draw of the optimisation.
            device: where to compute.
            init: a starting perturbation of the artifact's shape, or None (the attack's own start).

        Returns:
            ``(artifact, history)``: the perturbation, float32 on the CPU, and the
            optimisation's per-epoch or per-step record.
        """

    @abstractmethod
    def apply(self, artifact: torch.Tensor, x: torch.Tensor, placements: Any = None) -> torch.Tensor:
        """``x`` (float (N, 3, H, W) in [0, 1]) with the perturbation ``artifact`` on it, at
        ``placements`` where the attack has a location (a patch's
        :class:`~pipeline.attacks.patch.Placements`); float (N, 3, H, W) in [0, 1]."""


ATTACKS: Registry[type[Attack] | type[UniversalAttack]] = Registry("attack", "pipeline.attacks")
"""Both kinds of attack (per-image and universal), found by importing every module of
:mod:`pipeline.attacks`: a new attack is one new module, found without a list to keep; its
import errors are raised."""


def register_attack(name: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator registering an :class:`Attack` or :class:`UniversalAttack` subclass under
    ``name`` (sets ``cls.name``).

    Raises:
        ValueError: the name is taken.
        TypeError: the class is neither kind of attack.
    """

    def decorator(cls: type[Any]) -> type[Any]:
        if not (isinstance(cls, type) and issubclass(cls, (Attack, UniversalAttack))):
            raise TypeError(f"register_attack({name!r}) takes an Attack or UniversalAttack subclass, got {cls!r}")
        ATTACKS.add(name, cls)
        cls.name = name
        return cls

    return decorator


def list_attacks(kind: Literal["per_image", "universal"] = "per_image") -> list[str]:
    """Names of the registered attacks of ``kind``, sorted: the per-image attacks (the cells of
    ``evaluate.attacks``, default) or the universal ones (``patch``, ``rp2``)."""
    base = Attack if kind == "per_image" else UniversalAttack
    return [name for name, cls in ATTACKS.items() if issubclass(cls, base)]


def attack_params_class(name: str) -> type[AttackParams]:
    """The params model of per-image attack ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    return _per_image(name).Params


def _per_image(name: str) -> type[Attack]:
    cls = ATTACKS.get(name)
    if not issubclass(cls, Attack):
        raise ValueError(f"{name!r} is a universal attack; per-image attacks: {', '.join(list_attacks())}")
    return cls


def build_universal_attack(name: str, params: Any, **data: Any) -> UniversalAttack:
    """The universal attack ``name`` with ``params`` (its ``Params``; a dict is validated into
    it) and the data it is built with (RP2's ``mask``).

    Raises:
        ValueError: unknown name, a per-image attack's name, or params that fail validation.
    """
    cls = ATTACKS.get(name)
    if not issubclass(cls, UniversalAttack):
        raise ValueError(f"{name!r} is a per-image attack; universal attacks: {', '.join(list_attacks('universal'))}")
    if isinstance(params, dict):
        params = cls.Params(**params)
    return cls(params, **data)


def build_attack(name: str, params: AttackParams | dict[str, Any] | None = None) -> Attack:
    """The attack ``name`` with ``params`` (a dict is validated by its params model).

    Raises:
        ValueError: unknown name, or params that fail validation.
    """
    cls_params = attack_params_class(name)
    if isinstance(params, dict) or params is None:
        params = cls_params.model_validate(params or {})
    return _per_image(name)(params)
