"""AutoAttack (Croce and Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020) behind the
project's :class:`~pipeline.attacks.base.Attack` interface, registered as
``autoattack``: the robust-accuracy protocol RobustBench reports.

Implementation: the attacks are the Adversarial Robustness Toolbox's (ART,
``adversarial-robustness-toolbox`` 1.20.1) --
``art.attacks.evasion.AutoProjectedGradientDescent`` (APGD, paper Section 3,
Algorithm 1, with its cross-entropy and difference-of-logits-ratio (DLR, Section
4) losses) and ``art.attacks.evasion.SquareAttack`` (Andriushchenko et al.,
"Square Attack", ECCV 2020). Nothing here re-implements an attack. torchattacks
(whose ``AutoAttack`` is a port of the authors' code) is not used: it pins
``requests~=2.25.1``, which would downgrade packages MLflow and DVC need.

Components, run in this order on the images still robust (``params.components``):

* ``apgd-ce`` -- untargeted APGD on the cross-entropy loss;
* ``apgd-t`` -- targeted APGD on the DLR loss, once per target class: the
  ``n_target_classes`` classes with the highest clean logits other than the true
  one, highest first (the paper's APGD-T, "top-9" on CIFAR-10);
* ``apgd-dlr`` -- untargeted APGD on the DLR loss;
* ``square`` -- Square Attack, score-based (no gradients), margin loss,
  ``p_init`` 0.8.

``version: auto`` (the default) runs ``rand`` on a randomised model
(:func:`~pipeline.attacks.base.is_randomized`: random resizing and padding, PRM
re-drawing its pixels) and ``standard`` on every other. ``version: standard`` runs
apgd-ce, apgd-t, square: the authors'
standard ensemble (``autoattack.AutoAttack(version="standard")``: APGD-CE,
APGD-T, FAB-T, Square) without FAB-T, which has no ART implementation (so,
with equally strong components, the robust accuracy here can only be equal to or
above the reference protocol's). ``version: rand`` (randomised
defenses) runs apgd-ce and apgd-dlr with Expectation over Transformation (EOT,
Athalye et al., ICML 2018), ``eot_iter`` = 20, as the authors' ``version="rand"``.

The ensemble bookkeeping is ours (ART's ``AutoAttack`` wrapper is not used): per
image, the first component that fools the model wins and its image is kept;
later components attack only the images still robust (the worst case over the
components, computed cheaply, as the reference ``run_standard_evaluation``).
ART's wrapper does not run this protocol: its default ensemble is APGD-CE and
APGD-DLR with 5 restarts each, DeepFool and Square with 5 restarts; its targeted
mode re-runs every attack (Square included, which has no targeted mode) against
every other class in index order, after all untargeted attacks, and counts only
the target class as success.

Known differences of ART's components from the authors' code, kept as ART has
them: APGD returns, per restart, its last iterate when that is adversarial (not
any adversarial iterate met on the way); ART's targeted DLR is the untargeted
DLR of the target class, minimised (``-(z_t - max_{j != t} z_j) / (z_pi1 -
z_pi3)``) rather than the paper's ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``;
Square spends up to 3 forward passes a query (the authors' code, 1); ART's L2
Square rescales each new window by dividing by the paper's factor instead of
multiplying (then rescales the whole perturbation to ``eps``), and can propose
NaN images, which it rejects (any non-finite image would be dropped here). Initial
step size ``2 * eps`` as in the authors' code (ART's ``eps_step``), momentum 0.75,
checkpoints and halving rule as in ART (the paper's).

EOT (``version: rand``): the APGD attacks see the model through a
``PyTorchClassifier`` subclass whose ``loss_gradient`` (and ``class_gradient``)
return the mean of ``eot_iter`` gradients, each from a fresh forward and backward
pass of the random model at the same input (so ``eot_iter`` times the cost per
APGD iteration). Loss values (APGD's step-size checkpoints, inside ART) are single
draws, as in the authors' code. ART's APGD makes two single-draw decisions that a
random model turns into luck, and the subclass takes both away from it: which images
to attack (APGD skips those one ``predict`` misclassifies; the subclass answers "not
yet adversarial" for every image the ensemble sends) and what to return (APGD returns
its random start wherever one ``predict`` calls its last iterate "not adversarial";
the subclass answers "adversarial", so APGD returns its last iterate, as PGD with EOT
does). Restarts are run one call each, on the images still robust. The ensemble's
own success check differs from the authors' single draw: it counts how many of
``eot_iter`` draws a component's image fools, keeps per image the image that fools
the most draws (never the clean image after one unlucky draw) and stops attacking an
image once at least half the draws are fooled. On a randomised model every image is
attacked, not only those the clean draw classifies correctly
(:class:`~pipeline.attacks.classic._ARTAttack`). Together these closed AutoAttack's
gap to PGD with EOT: on a ResNet-20 behind random resizing and padding (CIFAR-10,
200 test images, accuracy averaged over 20 draws) robust accuracy at ``eps`` 8/255
went from 5.8 % (every image left robust was unperturbed) to 0.0 %, PGD-10 with 4
draws 0.0 %; at 2/255, 23.9 % against PGD's 23.7 %.

Conventions (those of :mod:`pipeline.attacks.base`): ``x`` float32
(N, C, H, W) in [0, 1], ``y`` int64 (N,) true labels, output float32
(N, C, H, W) in [0, 1] on ``x``'s device, within ``eps`` of ``x`` in the chosen
norm (projected and clipped after every component, before the success check);
images the model already misclassifies come back unchanged.
Randomness (APGD's random starts, Square's squares, a randomised model's noise)
comes from the generator passed to :meth:`AutoAttack.perturb`: numpy's, Python's
and torch's global random states are seeded from it for the call and restored
afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import nn

from pipeline.attacks.base import AttackParams, Budget, is_randomized, register_attack
from pipeline.attacks.classic import _ARTAttack, _import_art, _model_device
from pipeline.attacks.pgd import check_norm_budget

__all__ = ["COMPONENTS", "AutoAttack", "AutoAttackParams"]

Component = Literal["apgd-ce", "apgd-t", "apgd-dlr", "square"]
COMPONENTS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
"""Default components of each version (the authors' ensembles, FAB-T left out)."""


class AutoAttackParams(AttackParams):
    """Params of ``autoattack``; the defaults are the authors' standard budgets
    (a profile may lower them for a smoke run).

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the ball, pixel units of [0, 1] (> 0; at most 1 for L-inf;
            an L2 radius is over all C x H x W values); "8/255" accepted; default 8/255.
        version: ``"auto"`` (default: ``rand`` on a randomised model, else ``standard``),
            ``"standard"`` (apgd-ce, apgd-t, square) or ``"rand"`` (apgd-ce and
            apgd-dlr with EOT over ``eot_iter`` draws, for randomised models).
        components: explicit component list, run in the given order, among
            ``apgd-ce``, ``apgd-t``, ``apgd-dlr``, ``square`` (no repeats);
            ``None``: the version's (see :data:`COMPONENTS`). FAB-T of the
            reference protocol has no ART implementation and is left out.
        n_iter: APGD iterations per run (gradient steps; default 100).
        n_restarts: APGD random restarts (apgd-ce, apgd-dlr; and per target class
            for apgd-t; default 1).
        n_target_classes: target classes of apgd-t (default 9; capped at K - 1).
        square_n_queries: Square Attack iterations (queries per image; default 5000).
        eot_iter: gradients averaged per APGD step in ``version: rand`` (default
            20); ignored by ``standard``.
        n_images, batch_size: inherited (:class:`AttackParams`).
        target: must stay ``None``: AutoAttack's robust accuracy is untargeted.
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: Budget = Field(8 / 255, description="radius of the ball, pixel units of [0, 1]")
    version: Literal["auto", "standard", "rand"] = "auto"
    components: list[Component] | None = Field(None, description="components in order (null: the version's)")
    n_iter: int = Field(100, ge=1, description="APGD iterations")
    n_restarts: int = Field(1, ge=1, description="APGD random restarts")
    n_target_classes: int = Field(9, ge=1, description="target classes of apgd-t (top logits)")
    square_n_queries: int = Field(5000, ge=1, description="Square Attack queries per image")
    eot_iter: int = Field(20, ge=1, description="gradients averaged per APGD step (version rand)")

    @field_validator("eps")
    @classmethod
    def _eps_in_range(cls, value: float, info: ValidationInfo) -> float:
        # a field validator so that errors name the field; ``norm`` is declared first
        return check_norm_budget(value, info.data.get("norm"), "eps")

    @field_validator("components")
    @classmethod
    def _components_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"components must be a non-empty list without repeats, got {value}")
        return value

    @model_validator(mode="after")
    def _untargeted(self) -> AutoAttackParams:
        if self.target is not None:
            raise ValueError("autoattack is untargeted only (robust accuracy); remove target")
        return self

    def attack_components(self, version: str | None = None) -> tuple[str, ...]:
        """The components to run, in order: ``components`` or the default of ``version``
        (``standard`` / ``rand``; by default this params' version, ``auto`` read as standard)."""
        version = version or ("standard" if self.version == "auto" else self.version)
        return tuple(self.components) if self.components is not None else COMPONENTS[version]


@functools.cache
def _eot_classifier_class() -> type:
    """ART's ``PyTorchClassifier`` with EOT gradients (built lazily: ART is imported on use)."""
    art = _import_art()

    class EOTPyTorchClassifier(art.estimators.classification.PyTorchClassifier):
        """A ``PyTorchClassifier`` for APGD on a randomised model.

        ``loss_gradient`` and ``class_gradient`` are the mean over ``eot_iter``
        independent forward/backward passes at the same input (fresh randomness of
        the model each pass); ``compute_loss`` (APGD's step-size checkpoints) is a
        single pass, as in the authors' code.

        ``predict`` answers ART's APGD's two single-draw success checks for the
        ensemble, whose own check counts draws (:meth:`AutoAttack._keep`). Before a
        restart, APGD asks which images still need attacking: with ``attack_labels``
        set (the labels of the coming ``generate`` call) every image is "not yet
        adversarial" (logits with the label highest, or the target lowest when
        ``targeted``), so APGD attacks every image the ensemble sends, including those
        a mean of draws already misclassifies but some draws still get right; without
        it, the mean of ``eot_iter`` draws of the logits, float32 (n, classes). After
        the iterations (a loss was computed since), APGD asks
        whether its last iterate is adversarial and, if not, returns its random
        starting point; on a randomised model that throws away iterates that fool some
        draws but not that one (PGD with EOT keeps them, and AutoAttack reported more
        robust accuracy than PGD). There ``predict`` answers "adversarial" for every image
        (logits with the true class lowest, or the target class highest when
        ``targeted``), so APGD returns its last iterate, and the ensemble's own
        multi-draw success check (:meth:`AutoAttack._keep`) decides what to keep.
        """

        eot_iter: int = 1
        targeted: bool = False
        attack_labels: Any = None  # int labels of the next generate call: attack every image
        _labels: Any = None  # the labels of the last loss computed (one-hot or indices)

        def predict(self, x: Any, batch_size: int = 128, training_mode: bool = False, **kwargs: Any) -> Any:
            """"Every image not yet adversarial" before a restart, "every image
            adversarial" after APGD's iterations, else the mean of ``eot_iter`` draws of
            the logits (class docstring)."""
            labels, self._labels = self._labels, None
            adversarial = labels is not None and len(labels) == len(x)
            if not adversarial:
                labels, self.attack_labels = self.attack_labels, None
            if labels is not None and len(labels) == len(x):
                labels = np.asarray(labels)
                index = labels.argmax(1) if labels.ndim == 2 else labels.astype(int)
                logits = np.zeros((len(x), self.nb_classes), dtype=np.float32)
                logits[np.arange(len(x)), index] = 1.0 if self.targeted == adversarial else -1.0
                return logits
            total = super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)
            for _ in range(self.eot_iter - 1):
                total = total + super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)
            return total / self.eot_iter

        def compute_loss(self, x: Any, y: Any, reduction: str = "none", **kwargs: Any) -> Any:
            """One draw of the loss (per image with ``reduction='none'``)."""
            self._labels = y
            return super().compute_loss(x, y, reduction=reduction, **kwargs)

        def loss_gradient(self, x: Any, y: Any, training_mode: bool = False, **kwargs: Any) -> Any:
            """Mean of ``eot_iter`` loss gradients w.r.t. ``x``, shaped like ``x``."""
            self._labels = y
            total = super().loss_gradient(x, y, training_mode=training_mode, **kwargs)
            for _ in range(self.eot_iter - 1):
                total = total + super().loss_gradient(x, y, training_mode=training_mode, **kwargs)
            return total / self.eot_iter

        def class_gradient(self, x: Any, label: Any = None, training_mode: bool = False, **kwargs: Any) -> Any:
            """Mean of ``eot_iter`` class gradients w.r.t. ``x``."""
            total = super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
            for _ in range(self.eot_iter - 1):
                total = total + super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
            return total / self.eot_iter

    return EOTPyTorchClassifier


def _with_eot(classifier: Any, eot_iter: int, targeted: bool = False) -> Any:
    """An EOT copy of ART ``PyTorchClassifier`` ``classifier`` (same model, loss
    and label handling), averaging ``eot_iter`` gradients, for an APGD attack that is
    ``targeted`` or not (``EOTPyTorchClassifier`` above)."""
    cls = _eot_classifier_class()
    eot = cls(
        model=classifier.model, loss=classifier.loss, input_shape=classifier.input_shape,
        nb_classes=classifier.nb_classes, clip_values=classifier.clip_values, preprocessing=None,
        channels_first=True, device_type="cpu" if classifier.device.type == "cpu" else "gpu",
    )
    # the label format APGD set up for its loss (one-hot for DLR, indices for cross-entropy)
    eot._reduce_labels = classifier._reduce_labels
    eot._int_labels = classifier._int_labels
    eot._probability_labels = classifier._probability_labels
    eot.eot_iter = eot_iter
    eot.targeted = targeted
    return eot


@contextlib.contextmanager
def _seeded(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed numpy's, Python's and torch's (CPU, and ``device``'s if CUDA) global
    random states from ``generator`` for the block, then restore them."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    np_state, py_state, cpu_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    cuda = device.type == "cuda"
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    np.random.seed(seed)
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if cuda:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    try:
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # ART builds on the current device
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)


@register_attack("autoattack")
class AutoAttack(_ARTAttack):
    """AutoAttack (Croce and Hein, ICML 2020, arXiv:2003.01690; APGD Section 3,
    DLR loss Section 4; the ensemble as in the authors' code, fra31/auto-attack,
    ``version="standard"`` / ``"rand"``): the parameter-free ensemble APGD-CE, APGD-T (top
    ``n_target_classes`` targets), Square -- or, ``version: rand``, APGD-CE and
    APGD-DLR with EOT -- from ART, with the per-image "first success wins, only
    robust images attacked further" bookkeeping of the reference protocol (module
    docstring for the details and what differs from the authors' code).

    ``perturb``: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,) ->
    float32 (N, C, H, W) in [0, 1] on ``x``'s device; every image within ``eps``
    of its clean image in ``norm`` (L-inf: max absolute change; L2: over all
    C x H x W values); images misclassified before the attack are unchanged;
    images no component fools are unchanged too.

    Raises (from :meth:`perturb`):
        ValueError: a DLR component (apgd-t, apgd-dlr) on a model with fewer
            than 3 classes (the DLR loss uses the third-largest logit).
        ImportError: ART is not installed.
    """

    Params = AutoAttackParams
    params: AutoAttackParams

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The ensemble on one batch, under global random states seeded from ``generator``
        (clean prediction included, so a randomised model is reproducible); see the class."""
        v = self.params.version
        self._version = "rand" if v == "rand" or (v == "auto" and is_randomized(model)) else "standard"
        with _seeded(generator, _model_device(model, x.device)):
            return super().perturb(model, x, y, generator)

    def generate(self, classifier: Any, x: np.ndarray, y: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Run the components on float32 ``x`` (n, C, H, W) in [0, 1], correctly
        classified (on a randomised model: every image), with int64 true labels ``y`` (n,); float32 (n, C, H, W):
        the first successful component's image, or ``x`` where none succeeded."""
        p = self.params
        components = p.attack_components(getattr(self, "_version", None))
        k = int(classifier.nb_classes)
        if k < 3 and {"apgd-t", "apgd-dlr"} & set(components):
            raise ValueError(f"autoattack: the DLR loss of apgd-t / apgd-dlr needs >= 3 classes, the model has {k}")
        out = x.copy()
        robust = np.ones(len(x), dtype=bool)  # the images sent: correctly classified (randomised model: all)
        fool_rate = np.zeros(len(x))  # of the image in ``out``, over the success-check draws
        for component in components:
            if not robust.any():
                break
            if component == "apgd-t":
                scores = classifier.predict(x, batch_size=p.batch_size).astype(np.float64)
                scores[np.arange(len(x)), y] = -np.inf  # the true class is never a target
                targets = np.argsort(-scores, axis=1, kind="stable")[:, : min(p.n_target_classes, k - 1)]
                attack = self._apgd(classifier, "difference_logits_ratio", targeted=True)
                for rank in range(targets.shape[1]):
                    self._run(attack, classifier, x, y, targets[:, rank], out, robust, fool_rate)
            elif component == "square":
                attack = _import_art().attacks.evasion.SquareAttack(
                    classifier, norm=self._art_norm(), max_iter=p.square_n_queries, eps=p.eps, p_init=0.8,
                    nb_restarts=1, batch_size=p.batch_size, verbose=False,
                )
                idx = np.flatnonzero(robust)
                # ART's L2 Square divides by zero on some proposals (NaN images, which it
                # rejects: a NaN loss never improves); silence numpy's warnings about it
                with np.errstate(divide="ignore", invalid="ignore"):
                    adv = attack.generate(x[idx], y=y[idx])
                self._keep(classifier, x, y, idx, adv, out, robust, fool_rate)
            else:
                loss = "cross_entropy" if component == "apgd-ce" else "difference_logits_ratio"
                self._run(self._apgd(classifier, loss, targeted=False), classifier, x, y, y, out, robust, fool_rate)
        return out

    def _run(self, attack: Any, classifier: Any, x: np.ndarray, y: np.ndarray, labels: np.ndarray,
             out: np.ndarray, robust: np.ndarray, fool_rate: np.ndarray) -> None:
        """One APGD component on the images still robust, with ``labels`` (int (n,): the
        true classes, or the targets of a targeted APGD). Standard version: ART runs the
        ``n_restarts`` restarts itself. Rand version: one restart a call, ``n_restarts``
        calls, each on the images the ensemble's multi-draw check still finds robust, and
        APGD told to attack every image it is sent (``EOTPyTorchClassifier.predict``)."""
        rand = self._rand()
        for _ in range(self.params.n_restarts if rand else 1):
            idx = np.flatnonzero(robust)
            if len(idx) == 0:
                return
            if rand:
                attack.estimator.attack_labels = labels[idx]
            self._keep(classifier, x, y, idx, attack.generate(x[idx], y=labels[idx]), out, robust, fool_rate)

    def _rand(self) -> bool:
        return getattr(self, "_version", self.params.version) == "rand"

    def _art_norm(self) -> float:
        return np.inf if self.params.norm == "linf" else 2

    def _apgd(self, classifier: Any, loss_type: str, targeted: bool) -> Any:
        """ART's APGD with the reference settings (initial step ``2 * eps``); with
        ``version: rand``, its estimator is replaced by the EOT one."""
        p = self.params
        attack = _import_art().attacks.evasion.AutoProjectedGradientDescent(
            classifier, norm=self._art_norm(), eps=p.eps, eps_step=2 * p.eps, max_iter=p.n_iter, targeted=targeted,
            nb_random_init=1 if self._rand() else p.n_restarts, batch_size=p.batch_size, loss_type=loss_type,
            verbose=False,
        )
        if self._rand():
            # APGD builds its own PyTorchClassifier around the model with the chosen loss;
            # swap in the same one with EOT gradients (ART has no hook for this)
            attack._estimator = _with_eot(attack.estimator, p.eot_iter, targeted)
        return attack

    def _project(self, x0: np.ndarray, adv: np.ndarray) -> np.ndarray:
        """``adv`` moved into the ``eps`` ball around ``x0`` (``norm``) and [0, 1], float32."""
        eps = self.params.eps
        adv = np.asarray(adv, dtype=np.float32)
        if self.params.norm == "linf":
            adv = np.clip(adv, x0 - eps, x0 + eps)
        else:
            delta = adv - x0
            norms = np.sqrt(np.sum(delta.astype(np.float64) ** 2, axis=(1, 2, 3), keepdims=True))
            adv = x0 + delta * np.minimum(1.0, eps / np.maximum(norms, 1e-12)).astype(np.float32)
        return np.clip(adv, 0.0, 1.0).astype(np.float32)  # x0 in [0, 1]: clipping only shrinks the change

    def _keep(self, classifier: Any, x: np.ndarray, y: np.ndarray, idx: np.ndarray, adv: np.ndarray,
              out: np.ndarray, robust: np.ndarray, fool_rate: np.ndarray) -> None:
        """Project the component's images ``adv`` (for ``x[idx]``) and update in place.

        Standard version: one success check; an image the model misclassifies goes to
        ``out`` and is marked not robust. Rand version (a randomised model, where one
        draw can be lucky): the check is ``eot_iter`` draws; an image goes to ``out`` when
        it fools more of them than the image there, and is marked not robust (attacked no
        further) when it fools at least half -- so the images returned are the most
        reliably adversarial ones found, not the clean image after an unlucky draw."""
        adv = np.asarray(adv, dtype=np.float32)
        finite = np.isfinite(adv).reshape(len(adv), -1).all(axis=1)
        adv[~finite] = x[idx][~finite]  # never keep a NaN or inf image: it is the clean one again
        adv = self._project(x[idx], adv)
        draws = self.params.eot_iter if self._rand() else 1
        rate = np.zeros(len(adv))
        for _ in range(draws):
            rate += classifier.predict(adv, batch_size=self.params.batch_size).argmax(1) != y[idx]
        rate /= draws
        better = rate > fool_rate[idx]
        out[idx[better]] = adv[better]
        fool_rate[idx[better]] = rate[better]
        robust[idx[rate >= 0.5]] = False
