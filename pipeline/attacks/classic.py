"""The classic per-image attacks the reproduced papers compare with, taken from
the Adversarial Robustness Toolbox (ART, ``adversarial-robustness-toolbox``
1.20) and put behind the project's :class:`~pipeline.attacks.base.Attack`
interface. Nothing here re-implements an attack: each class wraps the model in
ART's ``PyTorchClassifier`` and calls the ART attack.

Registered names (:func:`pipeline.attacks.base.build_attack`):

* ``deepfool`` -- ``art.attacks.evasion.DeepFool``; Moosavi-Dezfooli, Fawzi and
  Frossard, "DeepFool: a simple and accurate method to fool deep neural
  networks", CVPR 2016 (minimal L2 perturbation, untargeted only);
* ``jsma`` -- ``art.attacks.evasion.SaliencyMapMethod``; Papernot et al., "The
  Limitations of Deep Learning in Adversarial Settings", EuroS&P 2016 (L0,
  targeted by nature);
* ``cw_l2`` -- ``art.attacks.evasion.CarliniL2Method``; Carlini and Wagner,
  "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017;
* ``one_pixel`` -- ``art.attacks.evasion.PixelAttack``; Su, Vargas and Sakurai,
  "One Pixel Attack for Fooling Deep Neural Networks", IEEE TEVC 2019.
* ``square`` -- ``art.attacks.evasion.SquareAttack``; Andriushchenko et al.,
  "Square Attack: a query-efficient black-box adversarial attack via random
  search", ECCV 2020 (score-based, no gradients; L-inf or L2, untargeted).

Conventions (those of :mod:`pipeline.attacks.base`): ``x`` float32
(N, C, H, W) in [0, 1], ``y`` int64 (N,) true labels, output float32
(N, C, H, W) in [0, 1] on ``x``'s device. ART runs on float32 numpy copies;
the ART classifier has ``clip_values=(0, 1)`` and no preprocessing, because
the project's models normalise inside (:class:`pipeline.models.Normalized`).

What the wrappers add to ART, and why:

* **Untargeted runs leave already-misclassified images unchanged.** Only the
  images the model classifies correctly are sent to ART. (ART's DeepFool moves
  every image off its *predicted* class, which for a misclassified image can be
  the true class; skipping them keeps "robust accuracy <= clean accuracy" and
  saves time.) Targeted runs attack every image, and so do runs on a randomised
  model (random resizing and padding, PRM): there the clean prediction is one
  random draw, and an image it happens to misclassify is still classified
  correctly by most other draws, so leaving it unperturbed would count it as
  robust wherever later draws get it right.
* **Model outputs.** DeepFool and C&W see the logits (both papers define them
  on logits, ``Z`` in Carlini and Wagner). JSMA and One Pixel see softmax
  probabilities (computed in float64 so that confident predictions do not
  saturate at 1.0): Su et al. minimise the probability of the true class, and
  Papernot et al.'s saliency map uses the softmax output ``F``; with softmax
  outputs the paper's pair criterion (``alpha > 0``, ``beta < 0``, maximise
  ``-alpha * beta`` where ``beta = -alpha`` because probabilities sum to 1)
  reduces to ART's "two features of largest target gradient".
* **Randomness comes from the ``generator``** passed to :meth:`Attack.perturb`:
  the JSMA target of an untargeted run is drawn there (ART's own choice uses
  numpy's global state); One Pixel's differential evolution uses numpy's
  global random state, which is seeded from the generator for the call and
  restored afterwards.
* **One ART classifier per (model, input shape, output kind)**, built on the
  first batch and reused for the next ones (cached on the attack instance,
  keyed by ``id(model)`` and checked by identity).

ART is imported lazily: the attacks register (and their params validate)
without it; calling one without ART installed raises :class:`ImportError`
with the install command.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from pipeline.attacks.base import Attack, AttackParams, Budget, is_randomized, register_attack

__all__ = ["CarliniL2", "CarliniL2Params", "DeepFool", "DeepFoolParams", "JSMA", "JSMAParams", "OnePixel",
           "OnePixelParams", "Square", "SquareParams"]

ART_INSTALL = "pip install adversarial-robustness-toolbox==1.20.1"


def _import_art() -> Any:
    """The ``art`` package, or a clear ImportError."""
    try:
        import art
        import art.attacks.evasion
        import art.estimators.classification
    except ImportError as exc:  # pragma: no cover - ART is in the project's environment
        raise ImportError(f"the classic attacks (deepfool, jsma, cw_l2, one_pixel) need ART: {ART_INSTALL}") from exc
    return art


class _Probabilities(nn.Module):
    """``softmax(model(x))`` in float64, (N, K); for the attacks defined on probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] -> float64 probabilities (N, K)."""
        return torch.softmax(self.model(x).double(), dim=1)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return fallback


@contextlib.contextmanager
def _numpy_seeded(generator: torch.Generator) -> Iterator[None]:
    """Seed numpy's global random state from ``generator`` for the block, then restore it."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class _ARTAttack(Attack):
    """Shared plumbing of the ART-backed attacks: the cached ART classifier, the
    numpy round trip, the untargeted "attack only what is correct" rule.

    Subclasses set ``outputs`` and implement :meth:`generate`.
    """

    outputs: ClassVar[Literal["logits", "probabilities"]] = "logits"
    max_cached: ClassVar[int] = 4

    def __init__(self, params: AttackParams | None = None) -> None:
        super().__init__(params)
        self._classifiers: dict[tuple[Any, ...], tuple[nn.Module, Any]] = {}

    def art_classifier(self, model: nn.Module, x: torch.Tensor, nb_classes: int) -> Any:
        """The ART ``PyTorchClassifier`` around ``model`` for images shaped like ``x``
        (built once per model, input shape and output kind, then reused).

        Args:
            model: maps float32 (N, C, H, W) in [0, 1] to logits (N, K).
            x: a batch, float32 (N, C, H, W); only its shape and device are used.
            nb_classes: K.
        """
        art = _import_art()
        key = (id(model), tuple(x.shape[1:]), self.outputs, nb_classes)
        hit = self._classifiers.get(key)
        if hit is not None and hit[0] is model:
            return hit[1]
        device = _model_device(model, x.device)
        wrapped = _Probabilities(model) if self.outputs == "probabilities" else model
        kwargs: dict[str, Any] = dict(
            model=wrapped, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=nb_classes,
            clip_values=(0.0, 1.0), preprocessing=None, channels_first=True,
        )
        if device.type == "cuda":
            with torch.cuda.device(device):  # ART uses the current CUDA device
                clf = art.estimators.classification.PyTorchClassifier(device_type="gpu", **kwargs)
        else:
            clf = art.estimators.classification.PyTorchClassifier(device_type="cpu", **kwargs)
        self._classifiers[key] = (model, clf)
        while len(self._classifiers) > self.max_cached:  # the cache holds its models alive: keep it small
            del self._classifiers[next(iter(self._classifiers))]
        return clf

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Run the ART attack on one batch (see the module conventions).

        Args:
            model: in eval mode, weights frozen; logits (N, K) of images in [0, 1].
            x: float32 (N, C, H, W) in [0, 1].
            y: int64 (N,) true labels.
            generator: CPU generator for the attack's randomness.

        Returns:
            float32 (N, C, H, W) in [0, 1], on ``x``'s device; untargeted: images
            the model already misclassifies are returned unchanged, except on a
            randomised model (:func:`~pipeline.attacks.base.is_randomized`), where
            every image is attacked (one clean draw's mistake is not the model's).

        Raises:
            ValueError: ``params.target`` is not a class of the model.
            ImportError: ART is not installed.
        """
        if len(x) == 0:
            return x.clone()
        target = self.params.target
        with torch.no_grad():
            logits = model(x)
        nb_classes = int(logits.shape[1])
        if target is not None and target >= nb_classes:
            raise ValueError(f"{self.name}: target {target} is not a class of a {nb_classes}-class model")
        clf = self.art_classifier(model, x, nb_classes)
        out = x.detach().to(torch.float32).clone()
        # a randomised model's misclassification of the clean image is one draw's luck: attack every image
        attack_all = target is not None or is_randomized(model)
        todo = torch.ones(len(x), dtype=torch.bool, device=x.device) if attack_all else logits.argmax(1) == y
        if not bool(todo.any()):
            return out
        idx = todo.nonzero().flatten()
        x_np = np.ascontiguousarray(out[idx].cpu().numpy(), dtype=np.float32)
        y_np = y[idx].cpu().numpy().astype(np.int64)
        adv = np.asarray(self.generate(clf, x_np, y_np, generator), dtype=np.float32)
        out[idx] = torch.from_numpy(np.clip(adv, 0.0, 1.0)).to(out.device)
        return out

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """The ART call: adversarial float32 (n, C, H, W) for float32 ``x`` (n, C, H, W)
        in [0, 1] and int64 true labels ``y`` (n,)."""
        raise NotImplementedError


def _no_target(params: AttackParams, name: str) -> None:
    if params.target is not None:
        raise ValueError(f"{name} is untargeted only; remove target")


class DeepFoolParams(AttackParams):
    """DeepFool settings (ART ``DeepFool``); defaults of the authors' code
    (Moosavi-Dezfooli et al. 2016: overshoot 0.02, at most 50 iterations, the
    10 top classes).

    Attributes:
        max_iter: iterations of the linearise-and-step loop (>= 1).
        epsilon: overshoot ``eta``: the total perturbation is scaled by ``1 + eta``
            to cross the boundary (>= 0).
        nb_grads: number of top predicted classes whose boundaries are
            considered (>= 1; all classes if >= K).
    """

    max_iter: int = Field(50, ge=1, description="DeepFool iterations")
    epsilon: float = Field(0.02, ge=0, le=1, description="overshoot")
    nb_grads: int = Field(10, ge=1, description="top classes whose boundaries are considered")

    @model_validator(mode="after")
    def _untargeted(self) -> DeepFoolParams:
        _no_target(self, "deepfool")
        return self


@register_attack("deepfool")
class DeepFool(_ARTAttack):
    """DeepFool (Moosavi-Dezfooli et al., CVPR 2016): the iterated minimal L2
    step to the nearest linearised class boundary, then an overshoot; ART's
    ``art.attacks.evasion.DeepFool``. Untargeted, unbounded (it reports how
    far the boundary is rather than respecting a budget); ART clips every step
    to [0, 1]. Works on the logits.

    ``perturb``: float32 (N, C, H, W) in [0, 1] -> same; correctly classified
    images are moved off their class (ART starts from the predicted class).
    """

    Params = DeepFoolParams

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """ART ``DeepFool.generate`` (``y`` unused: the images sent are correctly classified)."""
        art = _import_art()
        p = self.params
        attack = art.attacks.evasion.DeepFool(
            classifier, max_iter=p.max_iter, epsilon=p.epsilon, nb_grads=p.nb_grads, batch_size=len(x), verbose=False,
        )
        return attack.generate(x)


class JSMAParams(AttackParams):
    """JSMA settings (ART ``SaliencyMapMethod``); defaults of Papernot et al.
    2016 (Section V: ``theta = +1``, i.e. features are set to their maximum,
    and at most ``Upsilon = 14.5%`` of the features changed).

    Attributes:
        theta: change applied to each selected feature per step, in [0, 1]
            pixel units (non-zero, ``|theta| <= 1``; negative decreases features).
        gamma: maximum fraction of the C x H x W features that may be changed,
            in (0, 1].
        target: target class; ``None`` (untargeted): a target is drawn per image
            uniformly among the classes other than the true one (from the
            attack's generator).
    """

    theta: float = Field(1.0, ge=-1, le=1, description="change per selected feature per step (non-zero)")
    gamma: float = Field(0.145, gt=0, le=1, description="maximum fraction of features changed")

    @model_validator(mode="after")
    def _theta_nonzero(self) -> JSMAParams:
        if self.theta == 0:
            raise ValueError("jsma: theta must be non-zero (the change applied to each selected feature)")
        return self


@register_attack("jsma")
class JSMA(_ARTAttack):
    """Jacobian-based Saliency Map Attack (Papernot et al., EuroS&P 2016), an L0
    attack: repeatedly pick the two features whose increase (``theta > 0``) most
    raises the target class probability and change them by ``theta``, until
    the target class is predicted or ``gamma`` of the features are used; ART's
    ``art.attacks.evasion.SaliencyMapMethod`` on the softmax probabilities.

    JSMA is targeted in ART. With ``target=None`` this wrapper draws, per
    image, a target uniformly among the K - 1 classes other than the true label
    (ART's own untargeted mode draws among the classes other than the
    *predicted* one with numpy's global state, which is not reproducible here).

    ``perturb``: float32 (N, C, H, W) in [0, 1] -> same.
    """

    Params = JSMAParams
    outputs = "probabilities"

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """ART ``SaliencyMapMethod.generate`` with the targets described above."""
        art = _import_art()
        p, k = self.params, classifier.nb_classes
        if p.target is not None:
            targets = np.full(len(x), p.target, dtype=np.int64)
        else:
            shift = torch.randint(1, k, (len(x),), generator=generator).numpy()
            targets = (y + shift) % k
        attack = art.attacks.evasion.SaliencyMapMethod(
            classifier, theta=p.theta, gamma=p.gamma, batch_size=len(x), verbose=False,
        )
        return attack.generate(x, y=targets)


class CarliniL2Params(AttackParams):
    """Carlini & Wagner L2 settings (ART ``CarliniL2Method``).

    Defaults follow Carlini and Wagner 2017 (Section VI: confidence ``kappa = 0``,
    learning rate 0.01, 9 binary-search steps, initial ``c = 1e-3``) except
    ``max_iter``: the paper runs up to 10,000 Adam steps, ART runs gradient
    steps with a line search (each up to ``max_halving`` / ``max_doubling``
    extra forward passes), so 100 is the practical default here.

    Attributes:
        confidence: ``kappa``, the logit margin required of the adversarial (>= 0).
        learning_rate: initial step of ART's line-searched descent (> 0).
        binary_search_steps: rounds of the binary search on ``c`` (>= 1).
        max_iter: optimisation steps per round (>= 1).
        initial_const: the first ``c`` (> 0).
        max_halving, max_doubling: line search limits (>= 1).
        target: target class (targeted attack, ``f`` of the paper on the
            target) or ``None`` (untargeted: away from the true label).
    """

    confidence: float = Field(0.0, ge=0, description="kappa, logit margin of the adversarial")
    learning_rate: float = Field(0.01, gt=0, description="initial learning rate")
    binary_search_steps: int = Field(9, ge=1, description="binary search steps on the constant c")
    max_iter: int = Field(100, ge=1, description="optimisation steps per binary search step")
    initial_const: float = Field(1e-3, gt=0, description="initial constant c")
    max_halving: int = Field(5, ge=1, description="line search halvings")
    max_doubling: int = Field(5, ge=1, description="line search doublings")


@register_attack("cw_l2")
class CarliniL2(_ARTAttack):
    """Carlini & Wagner's L2 attack (IEEE S&P 2017): minimise
    ``||delta||_2^2 + c * f(x + delta)`` in tanh space, with a binary search on
    ``c``; ART's ``art.attacks.evasion.CarliniL2Method`` on the logits (ART uses
    a line search instead of the paper's Adam). Images for which no
    adversarial is found are returned unchanged (ART's behaviour).

    ``perturb``: float32 (N, C, H, W) in [0, 1] -> same.
    """

    Params = CarliniL2Params

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """ART ``CarliniL2Method.generate`` (labels: the target, or the true labels)."""
        art = _import_art()
        p = self.params
        attack = art.attacks.evasion.CarliniL2Method(
            classifier, confidence=p.confidence, targeted=p.target is not None, learning_rate=p.learning_rate,
            binary_search_steps=p.binary_search_steps, max_iter=p.max_iter, initial_const=p.initial_const,
            max_halving=p.max_halving, max_doubling=p.max_doubling, batch_size=len(x), verbose=False,
        )
        labels = np.full(len(x), p.target, dtype=np.int64) if p.target is not None else y
        return attack.generate(x, y=labels)


class OnePixelParams(AttackParams):
    """One Pixel attack settings (ART ``PixelAttack``); defaults of Su et al. 2019
    (one pixel, differential evolution, 100 iterations; ART fixes the population
    at 400 candidates, the paper's size, and uses no crossover, as the paper).

    Attributes:
        pixels: number of pixels changed (ART's ``th``), >= 1; ``None`` runs ART's
            search for the fewest pixels (a binary search over 1..127, slow).
        es: evolution strategy: 1 differential evolution (the paper's), 0 CMA-ES
            (needs the ``cma`` package; not reproducible, ART does not seed it).
        max_iter: generations of the evolution strategy (>= 1).
        target: target class (maximise its probability) or ``None`` (minimise
            the true class's probability).
    """

    pixels: int | None = Field(1, ge=1, description="pixels changed (null: search the fewest)")
    es: Literal[0, 1] = Field(1, description="1 differential evolution (paper), 0 CMA-ES")
    max_iter: int = Field(100, ge=1, description="generations of the evolution strategy")


@register_attack("one_pixel")
class OnePixel(_ARTAttack):
    """One Pixel attack (Su et al., IEEE TEVC 2019; generalised to a few pixels by
    Vargas et al. 2019): an evolution strategy searches the position and RGB
    value of ``pixels`` pixels, using only the model's probabilities (black
    box); ART's ``art.attacks.evasion.PixelAttack``. ART searches colours in
    0..255, so the changed pixels take values ``k / 255``; unchanged pixels
    are returned bit-exact. Images for which the search fails are returned
    unchanged. Runs image by image (ART), so it is slow on large models.

    ``perturb``: float32 (N, C, H, W) in [0, 1] -> same.
    """

    Params = OnePixelParams
    outputs = "probabilities"

    def __init__(self, params: AttackParams | None = None) -> None:
        super().__init__(params)
        if self.params.es == 0:
            try:
                import cma  # noqa: F401
            except ImportError as exc:
                raise ImportError("one_pixel with es=0 (CMA-ES) needs the cma package; use es=1 (DE)") from exc

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """ART ``PixelAttack.generate`` under numpy's global random state seeded from ``generator``."""
        art = _import_art()
        p = self.params
        h, w = x.shape[-2:]
        if p.pixels is not None and p.pixels > h * w:
            raise ValueError(f"one_pixel: pixels={p.pixels} exceeds the {h}x{w} image")
        attack = art.attacks.evasion.PixelAttack(
            classifier, th=p.pixels, es=p.es, max_iter=p.max_iter, targeted=p.target is not None, verbose=False,
        )
        labels = np.full(len(x), p.target, dtype=np.int64) if p.target is not None else y
        with _numpy_seeded(generator):
            adv = np.asarray(attack.generate(x, y=labels), dtype=np.float32)
        # ART round-trips the image through 0..255; keep untouched pixels exactly as given.
        changed = np.abs(adv - x).max(axis=1, keepdims=True) > 0.25 / 255
        return np.where(changed, adv, x)


class SquareParams(AttackParams):
    """Square Attack settings (ART ``SquareAttack``); defaults of the authors' code as
    AutoAttack runs it (Andriushchenko et al. 2020: ``p_init`` 0.8, one restart), with
    1,000 queries instead of 5,000.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the ball, pixel units of [0, 1] ("8/255" accepted; at most 1
            for L-inf; an L2 radius is over all C x H x W values).
        max_iter: iterations, i.e. queries per image (ART spends up to 3 forward
            passes an iteration).
        p_init: initial fraction of the image a square covers, in (0, 1); ART halves
            it on the authors' schedule (relative to ``max_iter``).
        restarts: independent runs on the images still robust (>= 1).
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: Budget = Field(8 / 255, gt=0, description="radius of the ball, pixel units of [0, 1]")
    max_iter: int = Field(1000, ge=1, le=100_000, description="queries per image")
    p_init: float = Field(0.8, gt=0, lt=1, description="initial fraction of the image a square covers")
    restarts: int = Field(1, ge=1, le=100)

    @model_validator(mode="after")
    def _check(self) -> SquareParams:
        _no_target(self, "square")
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"square: an L-inf eps is at most 1 (pixel units of [0, 1]: write 8/255), got {self.eps}")
        return self


@register_attack("square")
class Square(_ARTAttack):
    """Square Attack (Andriushchenko, Croce, Flammarion and Hein, ECCV 2020): random
    search over square-shaped updates at the vertices of the ``eps`` ball, accepted
    when they lower the margin ``z_y - max_{j != y} z_j``; only the model's scores are
    used (no gradients), so it is the gradient-free reference of the gradient-masking
    checks (Carlini et al. 2019, Section 5; :mod:`pipeline.analysis.masking`); ART's
    ``art.attacks.evasion.SquareAttack`` on the logits. Untargeted only. ART draws
    the squares from numpy's global random state, seeded here from the generator.

    ``perturb``: float32 (N, C, H, W) in [0, 1] -> same, within ``eps`` of ``x``;
    images the attack does not fool come back as its last accepted iterate.
    """

    Params = SquareParams

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """ART ``SquareAttack.generate`` (true labels) under numpy's global random state seeded from ``generator``."""
        art = _import_art()
        p = self.params
        attack = art.attacks.evasion.SquareAttack(
            classifier, norm=np.inf if p.norm == "linf" else 2, max_iter=p.max_iter, eps=p.eps, p_init=p.p_init,
            nb_restarts=p.restarts, batch_size=len(x), verbose=False,
        )
        with _numpy_seeded(generator):
            return attack.generate(x, y=y)
