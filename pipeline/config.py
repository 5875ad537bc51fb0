"""Typed, bounded schema of ``params.yaml`` (and the profiles in ``params/``).

Every stage validates the whole params file with :func:`load_params` before it
does any work, so a typo or an out-of-range value stops the run with a one-line
message naming the key and the fix, instead of failing an hour later.

Units used throughout the params files:

* pixel values and perturbation budgets are in [0, 1] (``2/255`` is written as
  ``0.00784``); the schema accepts the string form ``"2/255"`` too;
* ``patch.area_fraction`` is a fraction of the image area in (0, 1);
* ``fnc.alpha`` is the feature norm clipping factor of Yu et al., ICCV 2021,
  Eq. (4): positive, the authors use 1.0 to 1.2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.analysis.masking import MaskingParams
from pipeline.attacks.base import Budget
from pipeline.attacks.patch_losses import patch_losses
from pipeline.defenses.adjust import ADJUSTMENTS
from pipeline.defenses.adversarial import AdversarialTrainingParams
from pipeline.models import resolve_model
from pipeline.models.weights import TORCHVISION_PREFIX, torchvision_weights

DATASETS = ("cifar10", "gtsrb", "imagenet", "imagefolder")
"""Dataset kinds the prepare stage knows: three with built-in class names and normalisation
constants, and ``imagefolder``, any ImageFolder tree whose classes, channels and mean / std come
from the data (or from ``data.classes`` / ``data.channels`` / ``data.mean`` / ``data.std``)."""

RESERVED_SECTIONS = ("profile", "seed", "data", "model", "train", "resources", "fnc", "fnc_tradeoff", "patch",
                     "evaluate", "rp2", "analysis", "attacks", "mlflow", "report", "defended", "none", "baseline")
"""Top-level keys that cannot name a defended model (``fnc`` is the built-in one)."""

PATCH_ATTACKS = tuple(patch_losses())
"""Universal patch attacks made by ``generate_patches``: one per registered loss
(:mod:`pipeline.attacks.patch_losses`; ``advp``, ``lavan`` and any module added there)."""

ADAPTIVE_PATCH_ATTACKS = {f"{a}_{kind}": a for kind in ("adaptive", "bpda") for a in PATCH_ATTACKS}
"""Evaluate cells whose patches are optimised against each defended model itself
(white box, adaptive; Athalye et al. 2018) rather than transferred from the baseline:
``<attack>_adaptive`` differentiates through the defended model as it is (input transforms
by BPDA), ``<attack>_bpda`` also passes FNC's clipping by BPDA (identity backward)."""


def evaluate_attack_names() -> tuple[str, ...]:
    """Names ``evaluate.attacks`` accepts: ``none`` (clean), the universal patch
    attacks, ``occlusion`` (the control of a same-size uniform-noise patch at the
    same placements, DESIGN.md), the adaptive patch cells (``advp_adaptive``,
    ``lavan_adaptive``: patches optimised against each defended model; ``advp_bpda``,
    ``lavan_bpda``: the same with FNC's clipping passed by BPDA) and every
    registered per-image attack (:func:`pipeline.attacks.base.list_attacks`)."""
    from pipeline.attacks.base import list_attacks

    return ("none", *PATCH_ATTACKS, *ADAPTIVE_PATCH_ATTACKS, "occlusion", *list_attacks())


def _nested_error(prefix: str, exc: ValidationError, with_input: bool = False) -> str:
    """One line for the first error of a section validated inside another model:
    ``<prefix><.loc>: <message>`` (and ``(got <input>)`` with ``with_input``)."""
    first = exc.errors()[0]
    loc = "".join(f".{p}" for p in first["loc"])
    got = f" (got {first.get('input')!r})" if with_input else ""
    return f"{prefix}{loc}: {first['msg'].removeprefix('Value error, ')}{got}"


class ParamsError(ValueError):
    """A params file is missing, unreadable or invalid; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class DataConfig(_Strict):
    """``data``: where the dataset is and how much of it to prepare."""

    dataset: Literal["cifar10", "gtsrb", "imagenet", "imagefolder"] = "cifar10"
    root: str = Field(description="folder holding the dataset (any accepted layout)")
    classes: list[str] | None = Field(
        None, min_length=2, description="imagefolder: the class folder names in label order; null: sorted folder names")
    channels: Literal[1, 3] | None = Field(
        None, description="imagefolder: 1 (grayscale) or 3 (RGB), images converted on decoding; null: what the "
                          "first training image is")
    mean: list[float] | None = Field(
        None, description="imagefolder: per-channel mean in [0, 1] of the training images; null: computed at prepare")
    std: list[float] | None = Field(
        None, description="imagefolder: per-channel standard deviation (> 0); null: computed at prepare")
    download: bool = Field(False, description="use torchvision's download when root holds nothing")
    train_per_class: int | None = Field(None, gt=0, description="keep this many training images a class")
    test_per_class: int | None = Field(None, gt=0, description="keep this many test images a class")
    val_per_class: int = Field(
        100, ge=0, description="training images a class held out as the validation split (val.pt): every selection "
                               "and calibration (adaptive restarts, detector thresholds) reads it, never the test "
                               "split; 0: no validation split")
    num_shards: int = Field(8, ge=1, le=1024, description="decoding tasks (Ray) per split")
    lazy_threshold_mb: float = Field(
        4096.0, gt=0, description="datasets larger than this when decoded are indexed, not decoded"
    )
    image_size: int | None = Field(
        None, ge=8, le=1024, description="resize the shorter side to image_size / 0.875 and centre-crop "
                                         "image_size x image_size (ImageNet's evaluation view); null: as stored")

    @model_validator(mode="after")
    def _validation_fits(self) -> DataConfig:
        if self.train_per_class is not None and self.val_per_class >= self.train_per_class:
            raise ValueError(f"data.val_per_class ({self.val_per_class}) must be below data.train_per_class "
                             f"({self.train_per_class}): the validation images come out of the training images")
        return self

    @model_validator(mode="after")
    def _imagefolder_keys(self) -> DataConfig:
        given = [k for k in ("classes", "channels", "mean", "std") if getattr(self, k) is not None]
        if self.dataset != "imagefolder" and given:
            raise ValueError(f"data.{given[0]} is for data.dataset: imagefolder; {self.dataset} has its own (remove it)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither (computed on the training split)")
        if self.std is not None:
            if len(self.mean) != len(self.std) or len(self.std) not in (1, 3):
                raise ValueError(f"data.mean and data.std need 1 or 3 values each, the same number; got "
                                 f"{len(self.mean)} and {len(self.std)}")
            if self.channels is not None and len(self.std) != self.channels:
                raise ValueError(f"data.mean / data.std have {len(self.std)} values but data.channels is "
                                 f"{self.channels}; give one value a channel")
            if min(self.std) <= 0 or not all(0 <= m <= 1 for m in self.mean):
                raise ValueError("data.std must be > 0 and data.mean in [0, 1] (pixel values in [0, 1])")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"data.classes lists a name twice: {self.classes}")
        return self

    @model_validator(mode="after")
    def _imagenet_needs_a_size(self) -> DataConfig:
        if self.dataset == "imagenet" and self.image_size is None:
            raise ValueError("ImageNet's images differ in size: set data.image_size (224 for resnet50 and "
                             "mobilenet_v2, 299 for inception_v3)")
        return self


class ModelConfig(_Strict):
    """``model``: architecture from the registry or the user's own ``package.module:callable``,
    optionally the user's own weights."""

    name: str = Field("resnet20", description="a registered model, or 'package.module:callable' returning an "
                                              "nn.Module (called with num_classes / in_channels where it takes them)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments of the model's factory")
    checkpoint: str | None = Field(
        None, description="a state dict for this architecture, or torchvision:<WEIGHTS> for torchvision's "
                          "published weights (downloaded once by train_baseline); skips baseline training"
    )

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(TORCHVISION_PREFIX) and not Path(v).expanduser().is_file():
            raise ValueError(f"no such file {v!r}; give the path of a state dict for model.name, "
                             "torchvision:<WEIGHTS> for a torchvision model, or null to train")
        return v

    @model_validator(mode="after")
    def _torchvision_weights_exist(self) -> ModelConfig:
        if self.checkpoint is not None and self.checkpoint.startswith(TORCHVISION_PREFIX):
            torchvision_weights(self.name, self.checkpoint.removeprefix(TORCHVISION_PREFIX))  # names only
        return self

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        resolve_model(v)  # the registry's error (unknown model 'x'; choose one of: ...) or the import's
        return v


class AugmentConfig(_Strict):
    """``train.augment``: the training augmentation, a random crop of the zero-padded image and
    a horizontal flip (the CIFAR recipe of He et al., CVPR 2016, Section 4.2)."""

    crop_padding: int = Field(4, ge=0, le=64, description="zero padding in pixels before the random crop; 0: no crop")
    horizontal_flip: bool | None = Field(
        None, description="flip half of the images left-right; null: the dataset's default (cifar10 and imagenet "
                          "flip; gtsrb and imagefolder do not, as a mirror can change the label)")


class TrainConfig(_Strict):
    """``train``: SGD with momentum, weight decay and a one-cycle schedule."""

    epochs: int = Field(40, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0, description="peak learning rate of the one-cycle schedule")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    pct_start: float = Field(0.25, gt=0, lt=1, description="fraction of steps spent warming up")
    anneal_strategy: Literal["cos", "linear"] = Field(
        "cos", description="shape of the one-cycle warm-up and decay; linear decay suits short budgets (Li et al. 2020)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    channels_last: bool = True
    eval_batch_size: int = Field(500, ge=1)
    amp: bool | None = Field(
        None, description="bf16 autocast of the training forward passes where the device runs bf16 natively "
                          "(pipeline/precision.py); null or false: float32")
    adversarial: AdversarialTrainingParams | None = Field(
        None, description="train on PGD / FGSM-RS examples (Madry et al. 2018; Wong et al. 2020); null: clean")
    augment: AugmentConfig | None = Field(
        None, description="crop padding and flips of the training images; null: padding 4 and the dataset's flip")
    workers: int | None = Field(
        None, ge=1, description="data-parallel training workers (Ray Train TorchTrainer, DDP), each with "
                                "resources.train_num_cpus CPUs and train_num_gpus GPUs; null or 1: one training actor")


class ResourcesConfig(_Strict):
    """``resources``: what each Ray task asks for (GPUs fall back to 0 without one)."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs per patch / evaluation task")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per patch / evaluation task (fractional allowed)")
    train_num_cpus: float = Field(2.0, gt=0, description="CPUs of the training task, or of each data-parallel "
                                                         "worker (train.workers): its torch threads")
    train_num_gpus: float = Field(0.0, ge=0, description="GPUs of the training task, or of each data-parallel worker")


Adjustment = Literal[ADJUSTMENTS]
"""What ``fnc.adjustment``, a defended section's ``adjustment`` and ``fnc_tradeoff.adjustments``
accept: :data:`pipeline.defenses.adjust.ADJUSTMENTS`."""


class AdjustmentConfig(_Strict):
    """How a model is adjusted after defenses are inserted without retraining
    (:func:`pipeline.defenses.adjust.adjust_after_insertion`): the fields every defended
    model's section and the ``fnc`` section share."""

    adjustment: Adjustment = "none"
    adjust_batches: int = Field(
        100, ge=1, description="bn_recalibration: training batches used to re-estimate BN statistics"
    )
    finetune_epochs: int = Field(1, ge=1)
    finetune_lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)


class FNCConfig(AdjustmentConfig):
    """``fnc``: feature norm clipping (Yu et al., ICCV 2021, Eq. 4) and its adjustment; the
    defended model ``fnc`` in the short form the papers' readers know (``fnc.alpha``):
    :meth:`as_defended` is the same model as an ordinary defended section."""

    alpha: float = Field(1.0, gt=0, description="clip norms to alpha x the per-sample mean norm")
    eps: float = Field(1e-6, gt=0, description="guard against zero norms")
    block_types: list[str] | None = Field(
        None, min_length=1, description="class names of the blocks clipped, for a model the registry does not know; "
                                        "null: the registered blocks, else the blocks inside nn.Sequential stages")
    adjustment: Adjustment = "bn_recalibration"

    def as_defended(self) -> DefendedConfig:
        """The section ``{init: baseline, insert_after: [{name: fnc, alpha, eps[, block_types]}], adjustment ...}``."""
        fnc = {"name": "fnc", "alpha": self.alpha, "eps": self.eps, "block_types": self.block_types}  # null: dropped
        return DefendedConfig(insert_after=[fnc], **self.model_dump(include=set(AdjustmentConfig.model_fields)))


class FNCTradeoffConfig(_Strict):
    """``fnc_tradeoff``: FNC's clipping trade-off curve (stage ``fnc_tradeoff``): clean accuracy
    and accuracy under the transferred universal patches for every ``alphas`` x ``adjustments``
    cell (Yu et al., ICCV 2021, Eq. 4; no retraining, so every cell is the baseline with FNC
    inserted and adjusted). The other FNC settings (eps, adjust_batches, finetune_epochs,
    finetune_lr, batch_size) come from the ``fnc`` section. Optional: without the section, or
    with ``alphas: []``, the stage only writes a note that it is off."""

    alphas: list[float] = Field(
        default_factory=list, description="clipping factors, each > 0 and finite, no repeats; empty: the stage is off")
    adjustments: list[Adjustment] = Field(
        default_factory=lambda: list(ADJUSTMENTS), min_length=1,
        description="adjustments after insertion, each a curve of the figure; no repeats")
    test_images: int | None = Field(
        None, gt=0, description="a prefix of evaluate's seeded test order (evaluate.subset_seed); null: all")

    @field_validator("alphas")
    @classmethod
    def _positive_alphas(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not (math.isfinite(a) and a > 0)]
        if bad:
            raise ValueError(f"every alpha must be a finite number > 0, got {bad[0]!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"alphas lists a value twice: {v}")
        return v

    @field_validator("adjustments")
    @classmethod
    def _distinct_adjustments(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"adjustments lists a name twice: {v}")
        return v


class DefendedConfig(AdjustmentConfig):
    """A defended model made by ``train_defended@<name>`` (its params: the top-level section ``<name>``).

    It is built in four steps, each optional: start from the baseline's weights or from
    scratch (``init``); insert ``defenses`` (trained with the network: BlurNet, PRM);
    train (``train``: overrides of the ``train`` section, for example
    ``{adversarial: {method: pgd}}`` for Madry et al.'s adversarial training; null: no
    training); insert ``insert_after`` (defenses that need no training, such as FNC or the
    input transforms) and apply ``adjustment``. Defense entries are
    ``{name: <registered defense>, **its params}`` (README, Defenses); the built-in
    ``fnc`` section is the case ``init: baseline, insert_after: [fnc]``.
    """

    init: Literal["baseline", "scratch"] = Field(
        "baseline", description="start from models/<model>/baseline.pt, or train from a fresh initialisation")
    defenses: list[dict[str, Any]] = Field(default_factory=list, description="inserted before training")
    train: dict[str, Any] | None = Field(None, description="overrides of the train section; null: no training")
    insert_after: list[dict[str, Any]] = Field(default_factory=list, description="inserted after training")

    @field_validator("defenses", "insert_after", mode="before")
    @classmethod
    def _entries(cls, v: list[dict[str, Any]], info) -> list[dict[str, Any]]:
        from pipeline.defenses.base import parse_defense

        if not isinstance(v, list):
            raise ValueError(f"{info.field_name}: a list of defenses, got {v!r}")
        out = []
        for entry in v:
            if isinstance(entry, str):
                entry = {"name": entry}
            if not isinstance(entry, dict):
                raise ValueError(f"{info.field_name}: each entry is {{name: <defense>, ...params}}, got {entry!r}")
            info_, p = parse_defense(entry)
            out.append({"name": info_.name, **p.model_dump(mode="json")})
        return out

    @model_validator(mode="after")
    def _consistent(self) -> DefendedConfig:
        from pipeline.defenses.base import needs_training

        if self.train is not None:
            try:
                TrainConfig.model_validate({"epochs": 1, **self.train})
            except ValidationError as exc:
                raise ValueError(_nested_error("train", exc)) from None
        if self.init == "scratch" and self.train is None:
            raise ValueError("init: scratch needs training; give train: {} (the train section) or overrides")
        if self.train is None and needs_training(self.defenses):
            raise ValueError("defenses has trainable parts (learned kernels, TV penalty, PRM); give train: {...}, "
                             "or move fixed defenses to insert_after")
        if not (self.defenses or self.insert_after or (self.train or {}).get("adversarial")):
            raise ValueError("a defended model needs defenses, insert_after or train.adversarial")
        return self


class PatchConfig(_Strict):
    """``patch``: the universal adversarial patch, AdvP (Brown et al. 2017), as used by FNC."""

    area_fraction: float = Field(0.1, gt=0, lt=1, description="patch side = floor(sqrt(f H W))")
    target: int | None = Field(
        5, ge=0, description="target class, by index or by name (a class name of the dataset, resolved to its index "
                             "when the params are read); null for an untargeted patch")
    epochs: int = Field(10, ge=1)
    step_size: Budget = Field(2 / 255, gt=0, le=1, description="signed-gradient step, pixels in [0, 1]")
    decay_epochs: list[int] = Field(default_factory=lambda: [5], description="halve the step at these epochs")
    batch_size: int = Field(80, ge=1)
    train_images: int | None = Field(10000, gt=0, description="images the patch is optimised on (null: all)")
    amp: bool | None = Field(None, description="bf16 autocast of the patch optimisation's forward passes where "
                                               "the device runs bf16 natively; null or false: float32")
    train_on: Literal["train", "test"] = Field(
        "train", description="'test' reproduces the FNC authors' CIFAR-10 code exactly"
    )
    rotation: float = Field(0.0, ge=0, le=180, description="EOT: max rotation in degrees")
    scale_min: float = Field(1.0, gt=0, le=1)
    scale_max: float = Field(1.0, gt=0, le=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    attacks: list[str] = Field(
        default_factory=lambda: ["advp"], min_length=1,
        description="universal patch attacks to train, one per registered loss (pipeline/attacks/patch_losses): "
                    "advp (cross-entropy), lavan (logit margin)",
    )

    @field_validator("attacks")
    @classmethod
    def _registered_losses(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in PATCH_ATTACKS]
        if unknown:
            raise ValueError(f"unknown patch attack {unknown[0]!r}; choose from: {', '.join(PATCH_ATTACKS)} "
                             "(or add a loss module to pipeline/attacks/patch_losses)")
        return v
    location: Literal["random", "fixed"] = Field(
        "random", description="random placement per image (EOT) or the fixed bottom-right corner"
    )
    adaptive_restarts: int = Field(
        2, ge=0, le=100, description="random starts of every adaptive (white-box) patch search, beside the warm "
                                     "start from the transferred patch; the start that attacks the validation split "
                                     "best is kept")

    @model_validator(mode="after")
    def _scale_order(self) -> PatchConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"patch.scale_min ({self.scale_min}) must not exceed patch.scale_max ({self.scale_max})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"patch.seeds must be distinct, got {self.seeds}")
        return self


class EvaluateConfig(_Strict):
    """``evaluate``: the (defense x attack) matrix on the test set."""

    defenses: list[str] = Field(default_factory=lambda: ["none", "fnc"], min_length=1)
    attacks: list[str] = Field(default_factory=lambda: ["none", "advp", "occlusion"], min_length=1)
    placements: int = Field(1, ge=1, description="fixed random patch placements per test image")
    placement_seed: int = 1234
    batch_size: int = Field(500, ge=1)
    num_shards: int = Field(4, ge=1, description="Ray tasks over the test set")
    test_images: int | None = Field(
        None, gt=0, description="a fixed random subset of n test images, drawn with subset_seed (null: all)"
    )
    subset_seed: int = Field(0, description="seed of the test-image order that every subset is a prefix of")
    fit_images: int = Field(
        1000, ge=1, description="training images for attacks fitted on data (masked PGD's pixel robustness map)"
    )

    @field_validator("defenses", "attacks")
    @classmethod
    def _known_names(cls, v: list[str], info) -> list[str]:
        if info.field_name == "attacks":  # defenses are checked against `defended` by Params
            allowed = evaluate_attack_names()
            bad = [name for name in v if name not in allowed]
            if bad:
                raise ValueError(f"unknown attack {bad[0]!r}; choose from: {', '.join(allowed)}")
        if len(set(v)) != len(v):
            raise ValueError(f"evaluate.{info.field_name} lists a name twice: {v}")
        return v


class RP2Config(_Strict):
    """``rp2``: the RP2 sticker attack (Eykholt et al. 2018) on RP2's own stop-sign victims,
    as BlurNet (Raju and Lipasti 2019) evaluates it; needs a traffic-sign model
    (``data.dataset: gtsrb``, see ``params/gtsrb.yaml``), so it is off in the CIFAR-10 profiles.

    One sticker per (defense, target, seed) is optimised on the model with that
    defense (white box, every defense of ``white_box``, default all of ``defenses``); the
    stickers made on ``none`` are also applied to every other defense's model (black box,
    transferred). ``attack`` holds :class:`pipeline.attacks.rp2.RP2Params` without
    ``target`` (the targets are listed here).
    """

    enabled: bool = False
    victims: str = Field("../shared/datasets/rp2-stop-signs", description="folder with victim-32/ and masks/")
    mask: str = Field("masks/rectangles-32.png", description="sticker mask PNG, relative to victims or absolute")
    true_class: int = Field(14, ge=0, description="the victims' class (GTSRB stop sign = 14)")
    targets: list[int] = Field(default_factory=lambda: [5], min_length=1, description="target classes attacked")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    defenses: list[str] = Field(default_factory=lambda: ["none", "fnc"], min_length=1)
    white_box: list[str] | None = Field(
        None, description="models stickers are optimised on (white box); null: every one of rp2.defenses. The "
                          "black-box rows (stickers made on none) cover every model of rp2.defenses either way")
    eval_transforms: int = Field(100, ge=0, le=10_000, description="random transforms per victim at evaluation")
    attack: dict[str, Any] = Field(default_factory=dict, description="RP2Params except target")

    @field_validator("attack")
    @classmethod
    def _attack(cls, v: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError as _VE

        from pipeline.attacks.rp2 import RP2Params

        if "target" in v:
            raise ValueError("rp2.attack.target: list target classes in rp2.targets instead")
        try:
            return RP2Params.model_validate(v).model_dump(mode="json", by_alias=True, exclude={"target"})
        except _VE as exc:
            raise ValueError(_nested_error("rp2.attack", exc)) from None

    @model_validator(mode="after")
    def _targets(self) -> RP2Config:
        if self.true_class in self.targets:
            raise ValueError(f"rp2.targets {self.targets} include rp2.true_class {self.true_class}; drop it")
        if len(set(self.targets)) != len(self.targets) or len(set(self.defenses)) != len(self.defenses):
            raise ValueError("rp2.targets and rp2.defenses must not repeat a value")
        if "none" not in self.defenses:
            raise ValueError("rp2.defenses must include 'none': its stickers are the black-box (transfer) attack")
        if self.white_box is not None:
            outside = [d for d in self.white_box if d not in self.defenses]
            if outside or "none" not in self.white_box or len(set(self.white_box)) != len(self.white_box):
                raise ValueError(f"rp2.white_box {self.white_box}: list 'none' and names of rp2.defenses, once each "
                                 f"(null: all of them)")
        return self

    @property
    def white_box_defenses(self) -> list[str]:
        """The models stickers are optimised on: ``white_box``, or every one of ``defenses``."""
        return list(self.defenses) if self.white_box is None else list(self.white_box)


class AnalysisConfig(_Strict):
    """``analysis``: the papers' analyses (``analyze@<name>``), on a seeded test subset
    (a prefix of the evaluate order) of each model in ``defenses``."""

    defenses: list[str] = Field(default_factory=lambda: ["none", "fnc"], min_length=1)
    images: int = Field(500, ge=1, description="test images analysed (feature norms, masked PGD)")
    batch_size: int = Field(250, ge=1)
    fit_images: int = Field(1000, ge=1, description="training images of the pixel robustness map")
    ks: list[float] = Field(default_factory=lambda: [0.02, 0.05, 0.1, 0.25, 0.5, 1.0], min_length=1,
                            description="pixel fractions attacked by masked PGD")
    eps: Budget = Field(8 / 255, gt=0, le=1, description="PGD budget of masked PGD and the loss landscape")
    step_size: Budget = Field(2 / 255, gt=0, le=1)
    steps: int = Field(10, ge=1, le=1000, description="PGD steps of masked PGD")
    landscape_images: int = Field(100, ge=1)
    landscape_steps: int = Field(20, ge=1, le=1000)
    restarts: int = Field(20, ge=1, le=1000, description="random restarts of the loss landscape")
    distances: list[float] = Field(default_factory=lambda: [0, 2, 4, 6, 8, 10, 12, 14, 16], min_length=2)
    block: int = Field(6, ge=1, description="side of the noise block of the Grad-CAM distance experiment (pixels)")
    angles: int = Field(8, ge=1)
    gradcam_images: int = Field(200, ge=1)
    masking: MaskingParams = Field(
        default_factory=MaskingParams, description="gradient-masking checks (analyze@masking; Carlini et al. 2019, "
                                                   "Section 5): pipeline.analysis.masking.MaskingParams")

    @field_validator("ks")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < k <= 1 for k in v):
            raise ValueError(f"analysis.ks are pixel fractions in (0, 1], got {v}")
        return v


class MLflowConfig(_Strict):
    """``mlflow``: experiment name and the ``paper`` tag of every run (the compare view
    groups by it); the tracking URI comes from ``MLFLOW_TRACKING_URI``."""

    experiment: str = "fnc-cifar10"
    paper: str = Field("FNC (Yu et al., ICCV 2021)", description="the paper this profile reproduces (a run tag)")


class ReportConfig(_Strict):
    """``report``: how the report stage reads the numbers."""

    max_clean_drop: float = Field(
        0.05, ge=0, le=1, description="a defense whose clean accuracy falls by more than this (a fraction: 0.05 = 5 "
                                      "points) below the undefended model's is marked in the defense matrix")


class Params(_Strict):
    """The whole params file."""

    profile: str = Field("default", description="name shown in MLflow tags and the report")
    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    resources: ResourcesConfig = ResourcesConfig()
    fnc: FNCConfig = FNCConfig()
    fnc_tradeoff: FNCTradeoffConfig = Field(
        default_factory=FNCTradeoffConfig, description="FNC's trade-off curve over alphas x adjustments; off by default")
    patch: PatchConfig = PatchConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    rp2: RP2Config = RP2Config()
    analysis: AnalysisConfig = AnalysisConfig()
    attacks: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-image attack name -> its params (threat model as data); defaults where omitted",
    )
    mlflow: MLflowConfig = MLflowConfig()
    report: ReportConfig = ReportConfig()
    defended: list[str] = Field(
        default_factory=lambda: ["fnc"],
        description="defended models made by train_defended; each but fnc is a top-level section (DefendedConfig)")
    defended_models: dict[str, DefendedConfig] = Field(
        default_factory=dict, description="filled from the top-level sections named in `defended`; do not write it")

    @model_validator(mode="before")
    @classmethod
    def _target_by_name(cls, raw: Any) -> Any:
        """``patch.target`` given as a class name becomes that class's index (:func:`class_names`)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("patch"), dict):
            return raw
        target = raw["patch"].get("target")
        if not isinstance(target, str) or target.strip().lstrip("-").isdigit():
            return raw
        try:
            data = DataConfig.model_validate(raw.get("data"))
        except ValidationError:
            return raw  # the data section's own error is reported
        names = class_names(data)
        if names is None:
            raise ValueError(f"patch.target {target!r}: the class names of {data.root} are not known before prepare "
                             "(data.root holds no dataset yet); give data.classes or the class index")
        if target not in names:
            raise ValueError(f"patch.target {target!r} is not a class of {data.dataset} ({', '.join(names[:10])}"
                             f"{', ...' if len(names) > 10 else ''}); give a class name or index")
        return {**raw, "patch": {**raw["patch"], "target": names.index(target)}}

    @model_validator(mode="before")
    @classmethod
    def _collect_defended(cls, raw: Any) -> Any:
        """Move the sections named in ``defended`` (all but ``fnc``) into ``defended_models``."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if "defended_models" in raw:
            raise ValueError("defended_models is filled from the sections named in `defended`; remove it")
        names = raw.get("defended", ["fnc"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"defended: a list of names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"defended lists a name twice: {names}")
        models = {}
        for name in names:
            if name == "fnc":
                continue
            if name in RESERVED_SECTIONS or not name.isidentifier():
                raise ValueError(f"defended: {name!r} cannot name a defended model (reserved or not an identifier); "
                                 "rename it")
            if name not in raw:
                raise ValueError(f"defended lists {name!r} but the params file has no section {name!r}; add one "
                                 "(README, Defenses)")
            models[name] = raw.pop(name)
        raw["defended_models"] = models
        return raw

    def defended_config(self, name: str) -> DefendedConfig:
        """The recipe of defended model ``name`` (``fnc``: from the ``fnc`` section).

        Raises:
            ParamsError: ``name`` is not listed in ``defended``.
        """
        if name not in self.defended:
            raise ParamsError(f"defended model {name!r} is not listed in `defended` ({self.defended}); add it")
        if name == "fnc":
            return self.fnc.as_defended()
        return self.defended_models[name]

    def defended_section(self, name: str) -> dict[str, Any]:
        """The params section of defended model ``name``, as written (for hashing and MLflow)."""
        if name == "fnc":
            return self.fnc.model_dump(mode="json")
        return self.defended_models[name].model_dump(mode="json")

    @model_validator(mode="after")
    def _defenses_defined(self) -> Params:
        known = ["none", *self.defended]
        checked = [("evaluate.defenses", self.evaluate.defenses), ("analysis.defenses", self.analysis.defenses)]
        if self.rp2.enabled:  # a disabled rp2 section keeps its defaults, whatever `defended` lists
            checked.append(("rp2.defenses", self.rp2.defenses))
        for where, names in checked:
            bad = [d for d in names if d not in known]
            if bad:
                raise ValueError(f"{where}: unknown defense {bad[0]!r}; choose from {known} "
                                 "(defended models are listed in `defended`)")
        return self

    @field_validator("attacks")
    @classmethod
    def _attack_params(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Validate every section with its attack's params model; store the normalised values."""
        from pydantic import ValidationError as _VE

        from pipeline.attacks.base import attack_params_class

        out = {}
        for name, section in v.items():
            model = attack_params_class(name)  # ValueError lists the known names
            try:
                out[name] = model.model_validate(section or {}).model_dump(mode="json")
            except _VE as exc:
                raise ValueError(_nested_error(f"attacks.{name}", exc, with_input=True)) from None
        return out

    @model_validator(mode="after")
    def _patch_attacks_generated(self) -> Params:
        made_from = {a: ADAPTIVE_PATCH_ATTACKS.get(a, a) for a in self.evaluate.attacks}  # cell -> patch attack
        missing = [a for a, b in made_from.items() if b in PATCH_ATTACKS and b not in self.patch.attacks]
        if missing:
            raise ValueError(f"evaluate.attacks lists {missing[0]!r} but patch.attacks does not generate "
                             f"{made_from[missing[0]]!r}; add it to patch.attacks")
        return self

    def attack_params(self, name: str) -> dict[str, Any]:
        """The validated params of per-image attack ``name`` (its defaults where ``attacks`` omits it)."""
        from pipeline.attacks.base import attack_params_class

        return self.attacks.get(name) or attack_params_class(name)().model_dump(mode="json")

    @model_validator(mode="after")
    def _target_in_range(self) -> Params:
        names = class_names(self.data)
        if names is None:  # an ImageFolder not there yet: prepare names its classes
            return self
        k = len(names)
        if self.rp2.enabled and max(self.rp2.targets + [self.rp2.true_class]) >= k:
            raise ValueError(f"rp2.targets/true_class must be classes of {self.data.dataset} (0-{k - 1}); "
                             f"got {self.rp2.targets} / {self.rp2.true_class}")
        if self.patch.target is not None and self.patch.target >= k:
            raise ValueError(
                f"patch.target {self.patch.target} is not a class of {self.data.dataset} ({k} classes); "
                f"use 0-{k - 1} or null"
            )
        return self


def class_names(data: DataConfig) -> list[str] | None:
    """The class names of ``data`` in label order, as the params can know them: a known dataset's
    built-in names; for ``imagefolder`` ``data.classes``, or the sorted class folders of the
    training split under ``data.root`` (:func:`pipeline.data.sources.class_folders`: folder names,
    no image listed or read); None when the folder holds no dataset yet."""
    from pipeline.data.datasets import DATASETS as _INFO
    from pipeline.data.sources import DatasetError, class_folders, find_source

    if data.dataset != "imagefolder":
        return list(_INFO[data.dataset].classes)
    if data.classes is not None:
        return list(data.classes)
    try:
        source = find_source(Path(data.root).expanduser())
        return None if source is None else class_folders(source) or None
    except (DatasetError, OSError):
        return None


def _format_error(err: ValidationError, path: Path) -> str:
    """One line: the first offending key, what is wrong, and the fix."""
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"]]
    if parts[:1] == ["defended_models"]:  # a defended model's section is top-level in the file
        parts = parts[1:]
    loc = ".".join(parts) or "<top level>"
    kind = first["type"]
    msg = first["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling against params.yaml"
    elif kind == "missing":
        msg = "required key is missing; add it (see params.yaml for an example)"
    elif parts:  # a whole-file input is not worth printing
        msg = f"{msg} (got {first.get('input')!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{path}: {loc}: {msg}{more}"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: YAML file, by default ``params.yaml`` in the current directory.

    Returns:
        The validated, immutable :class:`Params`.

    Raises:
        ParamsError: the file is missing, is not a YAML mapping, or a key is
            unknown, missing, of the wrong type or out of range; the message is
            one line naming the file, the key and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file; copy one from params/ or run from the project root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (data, model, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_error(exc, path)) from None


def params_section(params: Params, *names: str) -> dict[str, Any]:
    """The given top-level sections as plain dicts, for hashing and MLflow logging."""
    dumped = params.model_dump(mode="json")
    return {name: dumped[name] for name in names}
