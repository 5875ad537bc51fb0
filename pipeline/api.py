"""A Python API for a model in memory, on the code paths of the evaluate and generate_patches stages.

* :func:`evaluate_model`: the (defense, attack) matrix of the evaluate stage for an ``nn.Module``
  and test tensors: its inputs are made in memory (:class:`pipeline.matrix.MatrixInputs`) and
  computed by :func:`pipeline.matrix.compute_matrix`, the function the stage calls on what it
  reads from its files, so the cells are the same Ray tasks, sharding, seeds and metrics;
* :func:`train_patch`: universal patches trained as generate_patches trains them (the same
  :func:`pipeline.tasks.patch_task`, :class:`pipeline.attacks.patch.PatchAttack`, settings and
  training-image selection).

Both validate their settings with the params schema (:class:`pipeline.config.Params`; the
sections and keys of ``params.yaml``) before any work, and raise one-line errors. The model
travels to the Ray tasks inside an in-memory checkpoint spec (``{"module": ...}``,
:func:`pipeline.checkpoint.build_from_spec`) through Ray's object store (cloudpickle): a model
class defined in a script or notebook travels by value, one in an importable module needs
that module importable on the workers. Nothing is cached between calls (each call computes
in a temporary folder, removed after it); the stages' caches under ``.cache/`` are not read.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["evaluate_model", "train_patch"]

_IN_MEMORY = "<in memory>"
"""``data.root`` of the params the API validates: no dataset is read."""


def evaluate_model(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str] | Mapping[str, Mapping[str, Any] | None] = ("none",),
    defenses: Sequence[str | Mapping[str, Any]] = ("none",),
    patches: Mapping[str, torch.Tensor] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    fit_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    **params: Any,
) -> Any:
    """Evaluate ``model`` under every (defense, attack) cell, as the evaluate stage does.

    The cells are computed by :func:`pipeline.matrix.compute_matrix`, the evaluate stage's own
    computation, on inputs made in memory instead of read from files: the test images in the
    stage's seeded order (``evaluate.subset_seed``, cut to ``evaluate.test_images``), the same
    fixed patch placements (``evaluate.placements``, ``evaluate.placement_seed``), the same Ray
    tasks per (defense, test shard) and (defense, attack, shard) (Ray started, or joined through
    ``RAY_ADDRESS``, by :func:`pipeline.distributed.init_ray`), the same metrics (README,
    Metrics). Method sources: the transferred patches are AdvP (Brown et al. 2017) and LaVAN
    (Karmon et al., ICML 2018) in the form of the FNC paper (Yu et al., ICCV 2021, Eq. 1-2);
    ``occlusion`` is the same-size uniform-noise control; the per-image attacks are those of
    :mod:`pipeline.attacks` (e.g. PGD, Madry et al. 2018; AutoAttack, Croce and Hein 2020), run
    white-box on each defended model; FNC is Yu et al., ICCV 2021, Eq. (4); each input transform
    cites its paper in ``pipeline.defenses.base.DEFENSES``.

    Args:
        model: maps float32 images (N, C, H, W) in [0, 1] to logits (N, K); it normalises its
            input itself (or give ``mean`` and ``std``). A deep copy is evaluated, in eval mode,
            on the CPU or the tasks' device; ``model`` itself is not changed.
        x: test images (N, C, H, W), C channels (3: RGB, 1: grey): uint8 0-255, or float in [0, 1]; float images are
            quantised to 8 bits (``round(255 x)``), as the prepared test set the stage reads.
        y: int64 (N,) labels in [0, K).
        attacks: the cells' attacks, names ``evaluate.attacks`` accepts: ``none`` (clean, needed
            by every patch cell), ``advp`` / ``lavan`` (the patches of ``patches``, transferred),
            ``occlusion``, or a registered per-image attack (``fgsm``, ``pgd``, ``autoattack``,
            ...). A mapping ``{name: its params or None}`` also sets the ``attacks`` params
            section (e.g. ``{"none": None, "pgd": {"eps": 8/255, "steps": 10}}``).
        defenses: ``none`` (the model as given), ``fnc`` (feature norm clipping with the
            ``fnc`` section's ``alpha`` and ``eps``), the name of a registered defense inserted
            without training (``input_blur``, ``lgs``, ``dw``, ``random_resize_pad``, FNC, a
            fixed-kernel ``blurnet``) with its default params, or ``{"name": ..., **params}``.
            A defended model of ``defended`` given in ``params`` (e.g. ``defended=["blur"],
            blur={"insert_after": [...]}``) is accepted too when it needs no training.
        patches: ``{"advp": float (S, C, side, side) in [0, 1]}`` for each patch cell of
            ``attacks``, e.g. :func:`train_patch`'s; ``side = floor(sqrt(patch.area_fraction H W))``;
            S is the number of ``patch.seeds`` (by default ``range(S)``).
        mean, std: C per-channel values each: evaluate ``Normalized(model, mean, std)``
            (:class:`pipeline.models.Normalized`) instead, for a model that expects normalised input.
        fit_data: ``(x_train, y_train)`` (as ``x``, ``y``) for attacks fitted on training images
            (``masked_pgd``); ``evaluate.fit_images`` of them are drawn with ``seed``.
        **params: sections of ``params.yaml`` overriding their defaults (:class:`pipeline.config.Params`),
            e.g. ``evaluate={"test_images": 100, "placements": 2}``, ``patch={"area_fraction": 0.1,
            "target": 0}``, ``fnc={"alpha": 1.0}``, ``seed=0``, ``resources={"num_cpus": 1}``.
            ``fnc.adjustment`` defaults to ``none`` here (an adjustment needs training images: the DAG).

    Returns:
        A ``pandas.DataFrame``, one row per (defense, attack) cell (plus the worst-case cells
        ``per_image_worst`` and ``<patch>_worst`` where they apply), the columns of the stage's
        ``plots/evaluate.csv``: ``model`` (the class name of ``model``), ``defense``, ``attack``,
        and the metrics, fractions in [0, 1] (``clean_accuracy``, ``robust_accuracy``,
        ``attack_success_rate``, their intervals and spreads, ``n_images``, ...).

    Raises:
        pipeline.config.ParamsError: a params key unknown, missing or out of range (one line,
            as the stages'), before any work.
        ValueError: bad tensors (shape, dtype, range), a patch cell without its patches or with
            patches of the wrong side, an adaptive patch cell (``advp_adaptive``: it needs
            training images and a validation split; use the DAG), a defense that needs
            training or an adjustment, a defense that does not fit the model, a fitted attack
            without ``fit_data``; one line each, before any work.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    import pandas as pd

    from pipeline.attacks.base import build_attack
    from pipeline.attacks.patch import patch_side
    from pipeline.config import ADAPTIVE_PATCH_ATTACKS, PATCH_ATTACKS
    from pipeline.data.datasets import seeded_subset
    from pipeline.defenses.base import check_defenses
    from pipeline.matrix import (
        PATCH_CELLS,
        MatrixInputs,
        compute_matrix,
        evaluated_images,
        occlusion_patches,
        patch_placements,
    )

    net = _network(model, mean, std)
    x8, y = _images(x, y, "x", "y")
    k = _num_classes(net, x8, y)
    _, c, h, w = x8.shape
    names, attack_sections = _attack_cells(attacks)
    patches = dict(patches or {})
    for key in ("evaluate", "patch", "fnc"):
        if params.get(key) is not None and not isinstance(params[key], Mapping):
            raise ValueError(f"{key}: a mapping of the section's keys, got {params[key]!r}")
    if fit_data is not None and not (isinstance(fit_data, (tuple, list)) and len(fit_data) == 2):
        raise ValueError("fit_data: a pair (x_train, y_train)")
    ev_raw = dict(params.pop("evaluate", None) or {})
    if {"attacks", "defenses"} & set(ev_raw):
        raise ValueError("evaluate.attacks / evaluate.defenses: pass them as evaluate_model(attacks=..., defenses=...)")
    raw: dict[str, Any] = {**params, "evaluate": {**ev_raw, "attacks": names}}
    raw["attacks"] = attack_sections
    patch_raw = dict(params.get("patch") or {})
    needed = list(dict.fromkeys(ADAPTIVE_PATCH_ATTACKS.get(a, a) for a in names if ADAPTIVE_PATCH_ATTACKS.get(a, a)
                                in PATCH_ATTACKS))
    if needed:
        patch_raw.setdefault("attacks", needed)
    sizes = {len(p) if isinstance(p, torch.Tensor) and p.ndim == 4 else 1 for p in patches.values()}
    if len(sizes) == 1:
        patch_raw.setdefault("seeds", list(range(sizes.pop())))
    raw["patch"] = patch_raw
    raw["evaluate"]["defenses"] = _defended_sections(defenses, raw)
    p = _validate(raw, k, "evaluate_model", check_target=any(a in PATCH_CELLS and a != "none" for a in names))

    ev = p.evaluate
    adaptive = [a for a in ev.attacks if a in ADAPTIVE_PATCH_ATTACKS]
    if adaptive:
        raise ValueError(f"attack {adaptive[0]!r}: adaptive patches are searched on training images with a validation "
                         "split; use the DAG (dvc repro evaluate), or evaluate the transferred patch here")
    specs = {"none": {"module": net, "state_dict": None, "defenses": []}}
    for d in ev.defenses:
        if d != "none":
            specs[d] = {"module": net, "state_dict": None, "defenses": _inserted_defenses(p, d)}
            check_defenses(lambda: copy.deepcopy(net), specs[d]["defenses"], (c, h, w))
    side = patch_side(p.patch.area_fraction, h, w)
    transferred = [a for a in ev.attacks if a in PATCH_ATTACKS]
    if any(a in PATCH_CELLS for a in ev.attacks if a != "none") and "none" not in ev.attacks:
        raise ValueError("evaluate.attacks: patch attacks need the clean cell 'none' too; add it")
    unknown = [a for a in patches if a not in PATCH_ATTACKS]
    if unknown:
        raise ValueError(f"patches: {unknown[0]!r} is not a patch attack; give patches of {', '.join(PATCH_ATTACKS)}")
    cell_patches: dict[str, torch.Tensor] = {}
    for a in transferred:
        if a not in patches:
            raise ValueError(f"attack {a!r} pastes trained patches: pass patches={{{a!r}: tensor (S, {c}, {side}, "
                             f"{side})}}, e.g. from pipeline.train_patch(model, x_train, y_train, attack={a!r})")
        cell_patches[a] = _patch_tensor(patches[a], a, c, side, len(p.patch.seeds))
    if "occlusion" in ev.attacks:
        cell_patches["occlusion"] = occlusion_patches(p, side, c)
    fitted = [a for a in ev.attacks if a not in PATCH_CELLS and build_attack(a, p.attack_params(a)).needs_fit]
    if fitted and fit_data is None:
        raise ValueError(f"attack {fitted[0]!r} is fitted on training images: pass fit_data=(x_train, y_train)")
    fit = _images(*fit_data, "fit_data x", "fit_data y") if fitted else None

    def fit_subset() -> tuple[torch.Tensor, torch.Tensor]:  # as pipeline.data.load_training_subset draws it
        return seeded_subset(*fit, ev.fit_images, p.seed)

    xe, ye = evaluated_images(x8, y, p)
    with tempfile.TemporaryDirectory(prefix="evaluate_model-") as tmp:
        inputs = MatrixInputs(
            specs={d: specs[d] for d in ev.defenses}, x=xe, y=ye, patches={d: dict(cell_patches) for d in ev.defenses},
            placements=patch_placements(p, len(xe), (h, w), side), cell_cache=lambda d, a: Path(tmp) / d / a / "cell.pt",
            fit_data=fit_subset if fitted else None)
        table = compute_matrix(p, inputs).table
    name = type(model).__name__
    return pd.DataFrame([{"model": name, "defense": d, "attack": a, **m} for d, row in table.items()
                         for a, m in row.items()])


def train_patch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str = "advp",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    resources: Mapping[str, Any] | None = None,
    **patch_params: Any,
) -> torch.Tensor:
    """Universal adversarial patches against ``model``, one per ``patch.seeds``, trained as the
    generate_patches stage trains them: on ``x``, ``y`` without the target class, a subset of
    ``patch.train_images`` drawn with ``seed`` (:func:`pipeline.attacks.patch.patch_training_images`),
    by :class:`pipeline.attacks.patch.PatchAttack` (the ``patch`` universal attack) with
    :func:`pipeline.attacks.patch.patch_training_config`, one Ray task per seed
    (:func:`pipeline.tasks.patch_task`). Method: AdvP (Brown et al., "Adversarial Patch", 2017;
    cross-entropy loss) or LaVAN (Karmon et al., ICML 2018; logit margin), in the form of the
    FNC paper (Yu et al., ICCV 2021, Section 3, Eq. 1-2): signed-gradient steps from a zero
    patch, a random placement per image and step (EOT).

    Args:
        model: as :func:`evaluate_model`'s (float32 (N, C, H, W) in [0, 1] -> logits (N, K)).
        x: training images (N, C, H, W), uint8 0-255 or float in [0, 1] (quantised to 8 bits).
        y: int64 (N,) labels in [0, K).
        attack: the patch loss, a registered one (``advp``, ``lavan``).
        mean, std: as :func:`evaluate_model`'s.
        seed: ``seed`` of params.yaml (draws the training subset).
        resources: the ``resources`` section (``num_cpus``, ``num_gpus`` of each task).
        **patch_params: keys of the ``patch`` section (:class:`pipeline.config.PatchConfig`):
            ``area_fraction``, ``target`` (a class, or None: untargeted), ``epochs``,
            ``step_size``, ``decay_epochs``, ``batch_size``, ``train_images``, ``location``,
            ``rotation``, ``scale_min``, ``scale_max``, ``seeds``, ``amp``; their defaults elsewhere.

    Returns:
        float32 (S, C, side, side) in [0, 1], S = ``len(seeds)``, side =
        ``floor(sqrt(area_fraction H W))``: the patches in ``seeds`` order, for
        ``evaluate_model(patches={attack: ...})`` with the same ``patch`` settings.

    Raises:
        pipeline.config.ParamsError: a ``patch`` key unknown or out of range (one line), before any work.
        ValueError: bad tensors, ``attacks`` given (one loss per call: ``attack=``), or no
            training image outside the target class.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    from pipeline.attacks.patch import patch_side, patch_training_config, patch_training_images
    from pipeline.cached import cached_map, shared_once
    from pipeline.tasks import patch_task

    if "attacks" in patch_params:
        raise ValueError("patch.attacks: train_patch trains one loss a call; pass attack='advp' or attack='lavan'")
    net = _network(model, mean, std)
    x8, y = _images(x, y, "x", "y")
    k = _num_classes(net, x8, y)
    _, _, h, w = x8.shape
    raw = {"seed": seed, "patch": {**patch_params, "attacks": [attack]}, "evaluate": {"attacks": ["none"]}}
    if resources is not None:
        raw["resources"] = dict(resources)
    p = _validate(raw, k, "train_patch")
    cfg = p.patch
    side = patch_side(cfg.area_fraction, h, w)
    xs, ys = patch_training_images(x8, y, cfg.target, cfg.train_images, p.seed)
    if not len(xs):
        raise ValueError(f"train_patch: no training image outside the target class {cfg.target}")
    spec = {"module": net, "state_dict": None, "defenses": []}
    data = shared_once(lambda: (xs, ys))

    def job(key: tuple[str, int]) -> dict[str, Any]:  # the item generate_patches makes
        return {"spec": spec, "data": data(), "cfg": patch_training_config(cfg, side, key[0]), "seed": key[1],
                "num_threads": p.resources.num_cpus}

    with tempfile.TemporaryDirectory(prefix="train_patch-") as tmp:
        made = cached_map(patch_task, [(attack, s) for s in cfg.seeds],
                          lambda key: Path(tmp) / f"{key[0]}_seed_{key[1]}" / "result.pt", item=job,
                          desc="patches (one task per seed)", num_cpus=p.resources.num_cpus,
                          num_gpus=p.resources.num_gpus)
    return torch.stack([made[(attack, s)]["patch"] for s in cfg.seeds])


def _network(model: Any, mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """A deep copy of ``model`` on the CPU in eval mode, wrapped in ``Normalized(mean, std)`` when given."""
    from pipeline.models import Normalized

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: a torch.nn.Module mapping images in [0, 1] to logits, got {type(model).__name__}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std: give both (one value a channel each) or neither")
    net = copy.deepcopy(model).cpu().eval()
    if mean is not None:
        net = Normalized(net, mean, std)
    elif isinstance(net, nn.Sequential):  # an input defense adds a child, which a Sequential would run last
        net = _Wrapped(net)
    return net.eval()


class _Wrapped(nn.Module):
    """``net`` as the child of a module whose forward is ``net``'s (input defenses add a child
    ``input_transform`` and a pre-hook to the model: :func:`pipeline.defenses.base.add_input_transform`)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _images(x: Any, y: Any, xname: str, yname: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 (N, C, H, W), int64 (N,))`` on the CPU from images (uint8, or float in [0, 1],
    quantised to 8 bits) and labels; ValueError with one line otherwise."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"{xname}, {yname}: torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or not x.shape[1] or not len(x):
        raise ValueError(f"{xname}: images of shape (N, C, H, W) with N >= 1, got {tuple(x.shape)}")
    if y.shape != (len(x),) or y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{yname}: integer labels of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    x, y = x.detach().cpu(), y.detach().cpu().to(torch.int64)
    if bool((y < 0).any()):
        raise ValueError(f"{yname}: labels must be >= 0, got {int(y.min())}")
    if x.dtype == torch.uint8:
        return x.contiguous(), y
    if not x.dtype.is_floating_point:
        raise ValueError(f"{xname}: uint8 or float images, got {x.dtype}")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError(f"{xname}: float images must be in [0, 1] (undo any normalisation; give mean/std for a model "
                         "that expects it)")
    return x.float().mul(255).round_().to(torch.uint8), y


@torch.no_grad()
def _num_classes(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """K, from the logits of one image; ValueError when they are not (1, K) or a label is >= K."""
    try:
        logits = net(x[:1].float().div(255))
    except Exception as exc:  # noqa: BLE001 - the model's own error, as one line
        raise ValueError(f"model: failed on one image of shape {tuple(x.shape[1:])}: "
                         f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 1:
        raise ValueError(f"model: must return logits (N, K), got {getattr(logits, 'shape', type(logits).__name__)}")
    k = logits.shape[1]
    if int(y.max()) >= k:
        raise ValueError(f"y: label {int(y.max())} is not a class of the model ({k} logits)")
    return k


def _attack_cells(attacks: Any) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``(names, attacks section)`` from a list of names or a mapping name -> params."""
    if isinstance(attacks, str) or not isinstance(attacks, (Sequence, Mapping)):
        raise ValueError(f"attacks: a list of names or a mapping name -> params, got {attacks!r}")
    if not isinstance(attacks, Mapping):
        return list(attacks), {}
    from pipeline.matrix import PATCH_CELLS

    sections = {}
    for name, section in attacks.items():
        if section and name in PATCH_CELLS:
            raise ValueError(f"attacks[{name!r}]: patch cells take their settings from patch={{...}}; give None")
        if section:
            sections[name] = dict(section)
    return list(attacks), sections


def _defended_sections(defenses: Any, raw: dict[str, Any]) -> list[str]:
    """The names of ``evaluate.defenses``; adds to ``raw`` the ``defended`` list and a section
    ``{insert_after: [entry], adjustment: none}`` for every defense given by name or entry (FNC:
    the ``fnc`` section, its ``adjustment`` defaulting to ``none``)."""
    if isinstance(defenses, (str, Mapping)) or not isinstance(defenses, Sequence):
        raise ValueError(f"defenses: a list of names or {{'name': ..., **params}} entries, got {defenses!r}")
    if not isinstance(raw.get("defended") or [], list):
        raise ValueError(f"defended: a list of names, got {raw['defended']!r}")
    defended = list(dict.fromkeys(["fnc", *(raw.get("defended") or [])]))  # fnc: the built-in, as params.yaml's default
    fnc = dict(raw.get("fnc") or {})
    names = []
    for entry in defenses:
        if isinstance(entry, Mapping):
            entry = dict(entry)
            name = entry.get("name")
            if not isinstance(name, str):
                raise ValueError(f"defenses: an entry needs a 'name', got {entry}")
        elif isinstance(entry, str):
            name, entry = entry, {"name": entry}
        else:
            raise ValueError(f"defenses: a name or {{'name': ..., **params}}, got {entry!r}")
        names.append(name)
        if name == "fnc":
            fnc.update({k: v for k, v in entry.items() if k != "name"})
        elif name != "none" and (name not in defended or len(entry) > 1):
            raw[name] = {"insert_after": [entry], "adjustment": "none"}
        if name != "none" and name not in defended:
            defended.append(name)
    fnc.setdefault("adjustment", "none")
    raw["fnc"] = fnc
    raw["defended"] = defended
    return names


def _inserted_defenses(params: Any, name: str) -> list[dict[str, Any]]:
    """The defense entries of defended model ``name``; ValueError when it needs training or an adjustment."""
    from pipeline.defenses.base import needs_training

    cfg = params.defended_config(name)
    if cfg.adjustment != "none":
        raise ValueError(f"defense {name!r}: adjustment {cfg.adjustment!r} needs training images; set it to 'none' "
                         f"({name}={{'adjustment': 'none'}}) or build the model with the DAG (train_defended@{name})")
    if cfg.train is not None or cfg.init == "scratch" or cfg.defenses or needs_training(cfg.insert_after):
        raise ValueError(f"defense {name!r} needs training; build it with the DAG (dvc repro train_defended@{name}) "
                         "and evaluate it there")
    return list(cfg.insert_after)


def _validate(raw: dict[str, Any], num_classes: int, who: str, check_target: bool = True) -> Any:
    """``Params`` from ``raw`` plus a placeholder ``data`` section, with the stages' one-line
    errors (:class:`pipeline.config.ParamsError`); ``patch.target`` checked against the model's
    classes when ``check_target`` (a patch is trained or pasted)."""
    from pydantic import ValidationError

    from pipeline.config import Params, ParamsError, PatchConfig, _format_error

    if "data" in raw:
        raise ValueError("data: the images are the tensors given; remove the data section")
    def wrong_target(target: Any) -> ParamsError | None:
        if check_target and isinstance(target, int) and not isinstance(target, bool) and target >= num_classes:
            return ParamsError(f"{who}: patch.target {target} is not a class of the model ({num_classes} logits); "
                               f"use 0-{num_classes - 1} or None")
        return None

    patch = dict(raw.get("patch") or {})
    if not check_target and "target" not in patch:  # no patch is made or pasted: the default class is not needed
        raw = {**raw, "patch": {**patch, "target": None}}
    target = patch.get("target", PatchConfig.model_fields["target"].default)  # given, or the default
    if err := wrong_target(target):  # before the schema's own check, whose message names no model
        raise err
    # no dataset is read: an ImageFolder stand-in whose classes are the model's K logits, so the
    # schema checks class indices against K
    data = {"dataset": "imagefolder", "root": _IN_MEMORY, "classes": [str(i) for i in range(max(num_classes, 2))]}
    try:
        params = Params.model_validate({**raw, "data": data})
    except ValidationError as exc:
        raise ParamsError(_format_error(exc, who)) from None
    return params


def _patch_tensor(patch: Any, attack: str, channels: int, side: int, n_seeds: int) -> torch.Tensor:
    """float32 (S, C, side, side) in [0, 1] on the CPU from a (S, C, s, s) or (C, s, s) tensor."""
    if not isinstance(patch, torch.Tensor) or not patch.dtype.is_floating_point:
        raise ValueError(f"patches[{attack!r}]: a float tensor (S, {channels}, {side}, {side}) in [0, 1], got "
                         f"{getattr(patch, 'dtype', type(patch).__name__)}")
    patch = patch.detach().cpu().float()
    if patch.ndim == 3:
        patch = patch[None]
    if patch.ndim != 4 or tuple(patch.shape[1:]) != (channels, side, side):
        raise ValueError(f"patches[{attack!r}]: shape {tuple(patch.shape)}, expected (S, {channels}, {side}, {side}) for "
                         "patch.area_fraction on these images (train the patch with the same area_fraction)")
    if len(patch) != n_seeds:
        raise ValueError(f"patches[{attack!r}]: {len(patch)} patches for {n_seeds} patch.seeds; give one a seed")
    if not bool(torch.isfinite(patch).all()) or float(patch.min()) < 0 or float(patch.max()) > 1:
        raise ValueError(f"patches[{attack!r}]: values must be in [0, 1]")
    return patch.contiguous()
