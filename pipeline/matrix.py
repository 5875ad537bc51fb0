"""The evaluation matrix: every (defense, attack) cell of ``evaluate`` on the prepared test set.

Defenses from ``evaluate.defenses`` (``none``: the baseline; any other name: the model
``train_defended@<name>`` made), attacks from ``evaluate.attacks``: ``none`` (clean), the
universal patches of generate_patches (``advp``, ``lavan``: made on the undefended model and
transferred, as the FNC authors evaluate), their adaptive counterparts (``advp_adaptive``,
``lavan_adaptive``: the same training against each defended model itself, white box;
Athalye et al. 2018), ``occlusion`` (uniform-noise patches of the same size at the same
placements), and the registered per-image attacks (run white-box on each model, with their
params from the ``attacks`` section; gradients through non-differentiable input transforms
by BPDA).

One Ray task per (defense, test shard) for the clean and patch cells, and per (defense,
attack, shard) for the per-image attacks (:func:`pipeline.cached.cached_map`). Every shard
of a cell is cached under ``.cache/evaluate/`` by a hash of what it depends on (the model
file, the patches, the attack's params, the test subset, the code of the cell's
computation), as soon as its task finishes, and the whole cell beside it; so a rerun after
adding an attack, or changing one attack's params, computes only those cells, and a killed
run redoes only the tasks that had not finished. The cell computations themselves are
:mod:`pipeline.evaluation`; the tables and figure are :mod:`pipeline.render.evaluate`.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.attacks.base import attack_params_class, build_attack, parse_fraction
from pipeline.attacks.patch import (
    Placements,
    corner_placements,
    patch_cache_params,
    patch_side,
    patch_training_config,
    patch_training_images,
)
from pipeline.cached import cached_map, shared, shared_once
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import resume_dir
from pipeline.config import ADAPTIVE_PATCH_ATTACKS, PATCH_ATTACKS, Params
from pipeline.data import load_meta, load_tensors, load_training_subset, load_validation
from pipeline.defenses.base import has_bpda
from pipeline.distributed import init_ray, ray_map
from pipeline.evaluation import (
    attack_cell_metrics,
    cell_metrics,
    fixed_placements,
    noise_patches,
    per_image_worst_metrics,
    test_order,
    worst_case_metrics,
)
from pipeline.io import load_torch, save_torch, sha256_file
from pipeline.layout import model_path, patch_path, prepared_dir
from pipeline.tasks import attack_task, evaluate_task, fit_task, patch_task, score_patches_task

log = logging.getLogger("evaluate")

PATCH_CELLS = ("none", *PATCH_ATTACKS, *ADAPTIVE_PATCH_ATTACKS, "occlusion")
"""Cells computed from the same forward passes at fixed placements (clean, patches, control)."""
PER_IMAGE_WORST = "per_image_worst"
"""The cell of the per-image worst case over the attacks of :func:`per_image_worst_attacks`."""
HEADLINE_ATTACKS = ("pgd", "autoattack", PER_IMAGE_WORST)
"""The per-image cells whose robust accuracy :func:`headline` reports, where evaluated."""
HEADLINE_METRICS = ("clean_accuracy", "robust_accuracy", "attack_success_rate")
"""The metrics of every cell logged on the evaluate run itself (all of them are on its cell's nested run)."""
CELL_METRICS = (*HEADLINE_METRICS, "n_images", "clean_accuracy_ci_low", "clean_accuracy_ci_high",
                "robust_accuracy_ci_low", "robust_accuracy_ci_high", "attack_success_rate_ci_low",
                "attack_success_rate_ci_high", "robust_accuracy_std", "attack_success_rate_std", "ssim", "ssim_global",
                "l0", "linf")
"""The metrics of a cell's nested MLflow run, where the cell has them."""


@dataclass
class Matrix:
    """What :func:`evaluate_matrix` computed.

    Attributes:
        table: ``defense -> attack -> metrics`` (fractions in [0, 1]; the cells of
            ``evaluate.attacks`` plus the worst-case cells ``<attack>_worst`` and
            ``per_image_worst`` where they apply), the body of ``metrics/evaluate.json``.
        patches: ``defense -> attack -> float (S, 3, side, side)`` in [0, 1], the patches
            each patch cell pasted (the adaptive ones per defended model).
        n_images: test images of the clean and patch cells.
        node_ids: the Ray nodes that computed the cells (cached ones included).
        per_image: the cells of ``evaluate.attacks`` that are per-image attacks, in order.
        transferred: the patch attacks of ``evaluate.attacks`` pasted as the baseline made them.
        adaptive: the adaptive patch cells of ``evaluate.attacks`` (``<loss>_adaptive``, ``<loss>_bpda``).
    """

    table: dict[str, dict[str, dict[str, Any]]]
    patches: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    n_images: int = 0
    node_ids: list[str] = field(default_factory=list)
    per_image: list[str] = field(default_factory=list)
    transferred: list[str] = field(default_factory=list)
    adaptive: list[str] = field(default_factory=list)


def attack_kind(attack: str) -> str:
    """How a cell's adversarial images are made: ``clean``, ``patch transferred`` (from the
    baseline), ``patch adaptive`` / ``patch bpda`` (optimised through the defended model),
    ``patch worst case``, ``occlusion``, ``per-image`` or ``per-image worst case``."""
    if attack == "none":
        return "clean"
    if attack == "occlusion":
        return "occlusion"
    if attack in PATCH_ATTACKS:
        return "patch transferred"
    if attack == PER_IMAGE_WORST:
        return "per-image worst case"
    if attack.endswith("_worst"):
        return "patch worst case"
    if attack in ADAPTIVE_PATCH_ATTACKS:
        return f"patch {attack.rsplit('_', 1)[1]}"
    return "per-image"


def per_image_worst_attacks(per_image: list[str], params: Params) -> list[str]:
    """The evaluated per-image attacks that :data:`PER_IMAGE_WORST` combines: ``pgd`` first,
    then every other untargeted attack with PGD's norm and an ``eps`` no larger than PGD's
    (its images lie inside PGD's threat model), in ``evaluate.attacks`` order. Empty when
    ``pgd`` is not evaluated or no other attack qualifies."""
    if "pgd" not in per_image:
        return []
    def threat(name: str) -> tuple[str, float] | None:  # (norm, eps) of an untargeted eps-bounded attack
        ap = params.attack_params(name)
        if "eps" not in ap or ap.get("target") is not None:
            return None
        return ap.get("norm", "linf"), float(parse_fraction(ap["eps"]))  # FGSM-like attacks without a norm: L-inf

    norm, eps = threat("pgd") or ("", 0.0)
    same = [a for a in per_image if a != "pgd" and (t := threat(a)) is not None and t[0] == norm
            and t[1] <= eps + 1e-6]
    return ["pgd", *same] if same else []


def cell_runs(table: dict[str, dict[str, dict]], params: Params, model: str) -> list[dict]:
    """One nested-run entry (:func:`pipeline.tracking.log_child_runs`) per evaluation cell:
    params ``model``, ``defense``, ``attack``, ``attack_kind``, the budget (``eps`` and
    ``norm`` for per-image attacks; ``patch.area_fraction`` and ``patch.target`` for patch
    cells), ``fnc.alpha`` on FNC's cells; the metrics of :data:`CELL_METRICS`."""
    out = []
    for d, row in table.items():
        for a, m in row.items():
            kind = attack_kind(a)
            cell = {"model": model, "defense": d, "attack": a, "attack_kind": kind}
            if kind.startswith("per-image"):
                ap = params.attack_params("pgd" if a == PER_IMAGE_WORST else a)
                cell.update({k: ap[k] for k in ("eps", "norm") if k in ap})
            elif kind.startswith("patch") or kind == "occlusion":
                cell.update({"patch.area_fraction": params.patch.area_fraction, "patch.target": params.patch.target})
            if d == "fnc":
                cell["fnc.alpha"] = params.fnc.alpha
            tags = {"defense": d, "attack": a, "attack_kind": kind,
                    "dvc_experiment": os.environ.get("DVC_EXP_NAME") or "workspace"}
            out.append({"name": f"{d} / {a}", "params": cell, "tags": tags,
                        "metrics": {k: m[k] for k in CELL_METRICS if k in m}})
    return out


def headline(table: dict[str, dict[str, dict]], params: Params) -> dict[str, dict[str, float]]:
    """``metrics/headline.json``, the few numbers ``dvc metrics show`` and ``dvc exp show``
    print, per defense: ``clean_accuracy``; the robust accuracy under the first of
    ``patch.attacks`` that was evaluated, as its worst case over the transferred and adaptive
    patches (key ``<attack>_worst``) where that cell exists, else the transferred patch's (key
    ``<attack>``); and, where evaluated, the robust accuracy under ``autoattack`` and the
    per-image worst case (``per_image_worst``, which bounds PGD's), or under ``pgd`` where
    there is no worst-case cell.
    The full matrix is ``metrics/evaluate.json``."""
    out: dict[str, dict[str, float]] = {}
    for d, row in table.items():
        h: dict[str, float] = {}
        if "none" in row:
            h["clean_accuracy"] = row["none"]["clean_accuracy"]
        patch = next((a for a in params.patch.attacks if a in row or f"{a}_worst" in row), None)
        if patch is not None:
            cell = f"{patch}_worst" if f"{patch}_worst" in row else patch
            h[cell] = row[cell]["robust_accuracy"]
        shown = [a for a in HEADLINE_ATTACKS if a in row and not (a == "pgd" and PER_IMAGE_WORST in row)]
        h.update({a: row[a]["robust_accuracy"] for a in shown})
        out[d] = h
    return out


def fit_images(params: Params, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``n`` training images (uint8 (n, C, H, W), int64 (n,)) for
    attacks that fit on data (masked PGD's pixel robustness map); never test images."""
    return load_training_subset(prepared_dir(params.data.dataset), n, params.seed)


def evaluate_matrix(params: Params) -> Matrix:
    """Evaluate every (defense, attack) cell of ``params.evaluate`` on the prepared test set:
    :func:`read_matrix_inputs` (the files) then :func:`compute_matrix` (the cells), the
    evaluate stage's code path, which :func:`pipeline.api.evaluate_model` shares with its
    inputs made in memory.

    Reads ``models/<model>/{baseline,<defense>}.pt``, ``patches/<model>/<attack>/seed_<s>.pt``
    and ``data/prepared/<dataset>``; writes only the caches of ``.cache/evaluate*``.

    Raises:
        pydantic.ValidationError: an attack's params are invalid (checked before any work).
        FileNotFoundError: a model or patch file is missing, or a patch's side does not
            match ``patch.area_fraction`` (rerun generate_patches).
        ValueError: patch cells are asked for without the clean cell ``none``.
        DatasetError: adaptive cells are asked for and the prepared data has no validation split.
    """
    return compute_matrix(params, read_matrix_inputs(params))


@dataclass
class MatrixInputs:
    """What :func:`compute_matrix` evaluates, all in memory.

    Attributes:
        specs: defense -> the model, as a checkpoint dict (:mod:`pipeline.checkpoint`; one
            holding the ``module`` itself for an in-memory model), for every ``evaluate.defenses``.
        x: uint8 (n, 3, H, W) test images, in the order subsets are prefixes of
            (:func:`evaluated_images`); y: int64 (n,) their labels.
        patches: defense -> patch cell -> float (S, 3, side, side) in [0, 1]: the patches
            pasted in each patch cell of ``evaluate.attacks`` (``occlusion``: its noise).
        placements: ``evaluate.placements * n`` placements (:func:`patch_placements`).
        cell_cache: ``(defense, attack) -> path`` of the cell's cached predictions; its
            shards are cached beside it (``shard_<k>_of_<m>.pt``).
        fit_data: returns the uint8 training images and labels that attacks with
            ``needs_fit`` are fitted on (called only when one is evaluated); None: none.
        selection: ``(defense, cell) -> `` what the adaptive search chose (added to the cell's metrics).
    """

    specs: dict[str, dict[str, Any]]
    x: torch.Tensor
    y: torch.Tensor
    patches: dict[str, dict[str, torch.Tensor]]
    placements: Placements
    cell_cache: Callable[[str, str], Path]
    fit_data: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    selection: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def evaluated_images(x: torch.Tensor, y: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluated test images: ``x`` and ``y`` in the fixed random order of
    :func:`pipeline.evaluation.test_order` (``evaluate.subset_seed``), cut to the first
    ``evaluate.test_images``; contiguous copies."""
    order = test_order(len(x), params.evaluate.subset_seed)[: params.evaluate.test_images]
    return x[order].contiguous(), y[order].contiguous()


def patch_placements(params: Params, n: int, image_size: tuple[int, int], side: int) -> Placements:
    """Where the patch cells paste their patches in ``n`` test images: ``evaluate.placements``
    per image, entry ``p * n + i`` for image i; random from ``evaluate.placement_seed``, or
    the fixed corner for ``patch.location: fixed``."""
    ev = params.evaluate
    if params.patch.location == "fixed":
        return corner_placements(n * ev.placements, image_size, side)
    return fixed_placements(n, ev.placements, image_size, side, ev.placement_seed)


def occlusion_patches(params: Params, side: int, channels: int = 3) -> torch.Tensor:
    """The ``occlusion`` cell's uniform noise, float (len(patch.seeds), channels, side, side) in
    [0, 1], drawn from ``evaluate.placement_seed``."""
    return noise_patches(len(params.patch.seeds), side, params.evaluate.placement_seed, channels)


def read_matrix_inputs(params: Params) -> MatrixInputs:
    """The evaluate stage's :class:`MatrixInputs`, from its files: the checkpoints of
    ``evaluate.defenses``, the prepared test set, the patches of generate_patches (and the
    adaptive ones, searched here: :func:`adaptive_patches`), with every cell cached under
    ``.cache/evaluate/`` by a hash of what it depends on. Raises as :func:`evaluate_matrix`."""
    name, ev = params.model.name, params.evaluate
    ckpts = {d: model_path(name, d) for d in ev.defenses}
    per_image = [a for a in ev.attacks if a not in PATCH_CELLS]
    for attack in per_image:  # every attack's params validated before any work
        attack_params_class(attack).model_validate(params.attack_params(attack))
    specs = {d: load_checkpoint(path) for d, path in ckpts.items()}
    weights = {d: sha256_file(path) for d, path in ckpts.items()}
    prepared = prepared_dir(params.data.dataset)
    meta = load_meta(prepared)
    x, y = evaluated_images(*load_tensors(prepared, "test"), params)
    _, h, w = meta["image_shape"]
    side = patch_side(params.patch.area_fraction, h, w)
    seeds = params.patch.seeds
    subset = {"n": len(x), "subset_seed": ev.subset_seed, "data": meta["source"]["sha256"], "splits": meta["splits"]}

    patches: dict[str, torch.Tensor] = {}
    patch_ids: dict[str, Any] = {}
    transferred = dict.fromkeys(ADAPTIVE_PATCH_ATTACKS.get(a, a) for a in ev.attacks)  # the baseline's patches
    for attack in (a for a in transferred if a in PATCH_ATTACKS):  # also read by the adaptive cells of `none`
        files = [patch_path(name, attack, s) for s in seeds]
        patches[attack] = torch.stack([load_torch(f) for f in files])
        patch_ids[attack] = [sha256_file(f) for f in files]
        if patches[attack].shape[-1] != side:
            raise FileNotFoundError(f"patches/{name}/{attack}: patch side {patches[attack].shape[-1]} != {side}; "
                                    "rerun generate_patches (dvc repro)")
    if "occlusion" in ev.attacks:
        patches["occlusion"] = occlusion_patches(params, side, x.shape[1])
        patch_ids["occlusion"] = {"noise_seed": ev.placement_seed, "n": len(seeds), "side": side}
    patches_of = {d: dict(patches) for d in ev.defenses}  # defense -> attack -> (S, 3, side, side)
    ids_of = {d: dict(patch_ids) for d in ev.defenses}
    adaptive = [a for a in ev.attacks if a in ADAPTIVE_PATCH_ATTACKS]
    selection: dict[tuple[str, str], dict[str, Any]] = {}
    if adaptive:
        made, selection = adaptive_patches(params, specs, weights, adaptive, side, patches, patch_ids)
        for d in ev.defenses:
            for a in adaptive:
                patches_of[d][a], ids_of[d][a] = made[(d, a)]
    where = {"location": params.patch.location, "placements": ev.placements, "placement_seed": ev.placement_seed}
    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "adversarial-robustness-toolbox")}

    def cell_cache(defense: str, attack: str) -> Path:
        """Where a cell's predictions are cached: keyed by everything they depend on, its code included."""
        code = ["pipeline/evaluation.py", "pipeline/attacks/patch.py"]
        key = {"weights": weights[defense], "attack": attack, "subset": subset}
        if attack in ids_of[defense]:
            key.update(patches=ids_of[defense][attack], where=where)
        elif attack != "none":
            key.update(params=params.attack_params(attack), seed=params.seed)
            code += ["pipeline/attacks/base.py", inspect.getsourcefile(type(build_attack(attack)))]
            key["versions"] = versions  # the classic attacks' code lives in ART
        key["code"] = [sha256_file(f) for f in code]
        return resume_dir("evaluate", key) / "cell.pt"

    return MatrixInputs(specs=specs, x=x, y=y, patches=patches_of, placements=patch_placements(params, len(x), (h, w), side),
                        cell_cache=cell_cache, fit_data=lambda: fit_images(params, ev.fit_images), selection=selection)


def compute_matrix(params: Params, inputs: MatrixInputs) -> Matrix:
    """Every (defense, attack) cell of ``params.evaluate`` on ``inputs``, the cells cached in
    ``inputs.cell_cache`` read from there: one Ray task per (defense, test shard) for the clean
    and patch cells, one per (defense, attack, shard) for the per-image attacks (after fitting
    those with ``needs_fit`` once per model), each shard cached as its task finishes
    (:func:`pipeline.cached.cached_map`); then the metrics of every cell and the worst cases.

    Raises:
        ValueError: patch cells are asked for without the clean cell ``none``, or an attack
            with ``needs_fit`` without ``inputs.fit_data``.
        Whatever the tasks raise (:func:`pipeline.distributed.ray_map`).
    """
    ev = params.evaluate
    specs, x, y, patches_of, placements = inputs.specs, inputs.x, inputs.y, inputs.patches, inputs.placements
    cell_cache = inputs.cell_cache
    per_image = [a for a in ev.attacks if a not in PATCH_CELLS]

    def shard_cache(key: tuple[str, str, int, int]) -> Path:
        """Where shard ``k`` of a cell's ``m`` is cached, as soon as its task has finished."""
        defense, attack, k, m = key
        return cell_cache(defense, attack).with_name(f"shard_{k}_of_{m}.pt")

    cells: dict[tuple[str, str], dict] = {}
    for d in ev.defenses:
        for a in ev.attacks:
            if cell_cache(d, a).is_file():
                cells[(d, a)] = load_torch(cell_cache(d, a))
    log.info("%d of %d cells cached; computing the rest", len(cells), len(ev.defenses) * len(ev.attacks))
    res = params.resources
    fan = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}

    # clean and patch cells: one task per (defense, shard) computes all of that defense's missing cells
    shards = [s for s in torch.arange(len(x)).tensor_split(ev.num_shards) if len(s)]
    m = len(shards)
    keys = [(d, a, k, m) for d in ev.defenses for a in ev.attacks if a in PATCH_CELLS and (d, a) not in cells
            for k in range(m)]
    refs: dict[str, tuple[Any, Any]] = {}

    def patch_tasks(missing: list[tuple[str, str, int, int]]) -> list[tuple[dict, list]]:
        by_task: dict[tuple[str, int], list] = {}
        for key in missing:
            by_task.setdefault((key[0], key[2]), []).append(key)
        todo = {d: {a for dd, a, _, _ in missing if dd == d} for d, _ in by_task}
        out = []
        for (d, k), ks in by_task.items():
            if d not in refs:
                refs[d] = (shared(specs[d]), shared({a: p for a, p in patches_of[d].items() if a in todo[d]}))
            idx = shards[k]
            pl_idx = torch.cat([idx + j * len(x) for j in range(ev.placements)])
            out.append(({"spec": refs[d][0], "x": x[idx].clone(), "placements": placements[pl_idx],
                         "patches": refs[d][1], "attacks": [key[1] for key in ks if key[1] != "none"],
                         "batch_size": ev.batch_size, "num_threads": res.num_cpus}, ks))
        return out

    parts = cached_map(evaluate_task, keys, shard_cache, group=patch_tasks,
                       split=lambda key, r: {"preds": r["preds"][key[1]], "node_id": r["node_id"]},
                       desc="evaluate clean and patch cells (defense x shard)", **fan)
    for d, a in dict.fromkeys((d, a) for d, a, _, _ in keys):
        ps = [parts[(d, a, k, m)] for k in range(m)]
        cells[(d, a)] = {"preds": torch.cat([p["preds"] for p in ps], dim=-1),
                         "node_ids": sorted({p["node_id"] for p in ps})}
        save_torch(cells[(d, a)], cell_cache(d, a))

    # per-image attacks: one task per (defense, attack, shard), after any fitting on training images
    splits: dict[tuple[str, str], list[torch.Tensor]] = {}
    for d, a in ((d, a) for d in ev.defenses for a in per_image if (d, a) not in cells):
        n = min(params.attack_params(a).get("n_images") or len(x), len(x))
        splits[(d, a)] = [idx for idx in torch.arange(n).tensor_split(min(ev.num_shards, n)) if len(idx)]
    keys = [(d, a, k, len(ks)) for (d, a), ks in splits.items() for k in range(len(ks))]

    def attack_tasks(missing: list[tuple[str, str, int, int]]) -> list[tuple[dict, list]]:
        spec_refs = {d: shared(specs[d]) for d in dict.fromkeys(key[0] for key in missing)}
        pending = list(dict.fromkeys((d, a) for d, a, _, _ in missing))
        to_fit = [(d, a) for d, a in pending if build_attack(a, params.attack_params(a)).needs_fit]
        fitted: dict[tuple[str, str], Any] = {}
        if to_fit:  # data-dependent set-up (masked PGD's robustness map): once per (defense, attack), not per shard
            if inputs.fit_data is None:
                raise ValueError(f"attack {to_fit[0][1]!r} is fitted on training images, and none were given")
            fit_ref = shared(inputs.fit_data())
            fit_items = [{"spec": spec_refs[d], "attack": a, "params": params.attack_params(a), "fit_data": fit_ref,
                          "num_threads": res.num_cpus} for d, a in to_fit]
            fits = ray_map(fit_task, fit_items, desc=f"fit attacks on {ev.fit_images} training images "
                           "(defense x attack)", **fan)
            fitted = {cell: shared(r["state"]) for cell, r in zip(to_fit, fits, strict=True)}
        out = []
        for d, a, k, n_shards in missing:
            idx = splits[(d, a)][k]
            out.append(({"spec": spec_refs[d], "attack": a, "params": params.attack_params(a), "x": x[idx].clone(),
                         "y": y[idx].clone(), "seed": params.seed * 1000 + k, "fitted": fitted.get((d, a)),
                         "num_threads": res.num_cpus}, [(d, a, k, n_shards)]))
        return out

    parts = cached_map(attack_task, keys, shard_cache, group=attack_tasks,
                       split=lambda key, r: {k: r[k] for k in ("pred_clean", "pred_adv", "sizes", "seconds", "node_id")},
                       desc="evaluate per-image attacks (defense x attack x shard)", **fan)
    for (d, a), ks in splits.items():
        ps = [parts[(d, a, k, len(ks))] for k in range(len(ks))]
        cells[(d, a)] = {"pred_clean": torch.cat([p["pred_clean"] for p in ps]),
                         "pred_adv": torch.cat([p["pred_adv"] for p in ps]),
                         "sizes": {s: torch.cat([p["sizes"][s] for p in ps]) for s in ps[0]["sizes"]},
                         "seconds": sum(p["seconds"] for p in ps),
                         "node_ids": sorted({p["node_id"] for p in ps})}
        save_torch(cells[(d, a)], cell_cache(d, a))

    table = _metrics(params, cells, y, per_image, inputs.selection)
    node_ids = sorted({n for c in cells.values() for n in c.get("node_ids", [])})
    return Matrix(table=table, patches=patches_of, n_images=len(x), node_ids=node_ids, per_image=per_image,
                  transferred=[a for a in ev.attacks if a in PATCH_ATTACKS],
                  adaptive=[a for a in ev.attacks if a in ADAPTIVE_PATCH_ATTACKS])


def _metrics(params: Params, cells: dict[tuple[str, str], dict], y: torch.Tensor, per_image: list[str],
             selection: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """``defense -> attack -> metrics`` from the cells' predictions, with the worst-case cells."""
    ev = params.evaluate
    table: dict[str, dict] = {}
    worst_of = per_image_worst_attacks(per_image, params)
    for d in ev.defenses:
        table[d] = {}
        clean = cells[(d, "none")]["preds"] if (d, "none") in cells else None
        for a in ev.attacks:
            c = cells[(d, a)]
            if a == "none":
                table[d][a] = cell_metrics(c["preds"], None, y, None)
            elif a in PATCH_CELLS:
                if clean is None:
                    raise ValueError("evaluate.attacks: patch attacks need the clean cell 'none' too; add it")
                table[d][a] = cell_metrics(clean, c["preds"], y, params.patch.target)
            else:
                n = len(c["pred_adv"])
                table[d][a] = attack_cell_metrics(c["pred_clean"], c["pred_adv"], y[:n],
                                                  params.attack_params(a).get("target"), c["sizes"])
            if (d, a) in selection:
                table[d][a].update(selection[(d, a)])
        if worst_of:  # per image, the worst case over the attacks of PGD's threat model
            table[d][PER_IMAGE_WORST] = per_image_worst_metrics({a: cells[(d, a)] for a in worst_of}, y)
        for attack in PATCH_ATTACKS:  # the worst case over every way of making this attack's patch
            variants = [a for a in (attack, *(c for c, b in ADAPTIVE_PATCH_ATTACKS.items() if b == attack))
                        if a in ev.attacks]
            if len(variants) > 1 and clean is not None:
                table[d][f"{attack}_worst"] = worst_case_metrics(
                    clean, {a: cells[(d, a)]["preds"] for a in variants}, y, params.patch.target)
    return table


def adaptive_patches(
    params: Params, specs: dict[str, dict], weights: dict[str, str], attacks: list[str], side: int,
    baseline_patches: dict[str, torch.Tensor], baseline_ids: dict[str, Any],
) -> tuple[dict[tuple[str, str], tuple[torch.Tensor, Any]], dict[tuple[str, str], dict[str, Any]]]:
    """Patches optimised against each defended model itself (white box, adaptive), with
    several starts, the best chosen on the validation split.

    For every defense of ``evaluate.defenses`` and adaptive cell ``<attack>_adaptive`` or
    ``<attack>_bpda``, and every ``patch.seeds``: the search trains, exactly as
    generate_patches trains the baseline's patch (same params and images) but on the defended
    model, from a warm start (the transferred patch of that seed) and from
    ``patch.adaptive_restarts`` uniform random starts; gradients pass the model's input
    transforms by BPDA (their own backward) and ``_bpda`` cells also pass FNC's clipping by BPDA
    (Athalye et al., ICML 2018, Section 4.1; on a model without FNC they are the ``_adaptive``
    patches, computed once). Among the candidates, the transferred patch itself and every
    trained start, the one with the lowest robust accuracy on the validation split (then the
    lowest patch loss) is kept: a white-box search that knows the defense is therefore never
    weaker on held-out data than the transfer attack it starts from (Carlini et al., "On
    Evaluating Adversarial Robustness", 2019, Section 4), and no test image takes part in the
    choice. For ``none`` these are the baseline's own patches (``baseline_patches`` /
    ``baseline_ids``, as the stage read them). Every trained start is cached under
    ``.cache/evaluate_patches/`` by the defended model's weights, the patch params and the start;
    the missing ones are one Ray task each, and the scoring is one Ray task per (defense, cell).

    Returns:
        ``(patches, selection)``: ``(defense, cell) -> (patches float (S, 3, side, side) in
        [0, 1], cache id)``, and ``(defense, cell) -> {"selected_start": names per seed,
        "val_robust_accuracy": of the kept patch per seed, "val_images": n}`` for defended models.

    Raises:
        DatasetError: the prepared data has no validation split (``data.val_per_class`` 0).
    """
    name, p, ev = params.model.name, params.patch, params.evaluate
    out: dict[tuple[str, str], tuple[torch.Tensor, Any]] = {}
    for cell in attacks:  # the baseline's own patches are already white box
        if "none" in ev.defenses:
            out[("none", cell)] = baseline_patches[ADAPTIVE_PATCH_ATTACKS[cell]], baseline_ids[ADAPTIVE_PATCH_ATTACKS[cell]]
    defended = [(d, cell) for d in ev.defenses if d != "none" for cell in attacks]
    if not defended:
        return out, {}
    prepared = prepared_dir(params.data.dataset)
    x_val, y_val = patch_training_images(*load_validation(prepared), p.target, None, params.seed)
    x, y = patch_training_images(*load_tensors(prepared, p.train_on), p.target, p.train_images, params.seed)
    patch_key = patch_cache_params(p)
    starts = ["warm", *(f"random_{r}" for r in range(1, p.adaptive_restarts + 1))]
    files: dict[tuple[str, str, int, str], Path] = {}
    for d, cell in defended:
        attack = ADAPTIVE_PATCH_ATTACKS[cell]
        bpda = cell.endswith("_bpda") and _has_bpda(specs[d])
        for i, s in enumerate(p.seeds):
            for start in starts:
                key = {"patch": patch_key, "model": name, "weights": weights[d], "seed": params.seed,
                       "n_train": len(x), "attack": attack, "patch_seed": s, "start": start}
                if start == "warm":
                    key["init"] = baseline_ids[attack][i]
                if bpda:  # otherwise the same patch as the _adaptive cell: one cache entry for both
                    key["bpda"] = True
                files[(d, cell, s, start)] = resume_dir("evaluate_patches", key) / "result.pt"
    data = shared_once(lambda: (x, y))  # the training images, put once, when a start is missing

    def start_item(job: tuple[str, str, int, str]) -> dict:
        d, cell, s, start = job
        attack = ADAPTIVE_PATCH_ATTACKS[cell]
        init = (baseline_patches[attack][p.seeds.index(s)] if start == "warm" else  # random_<r>: its own stream
                torch.rand(x.shape[1], side, side, generator=torch.Generator().manual_seed(
                    10_000 * s + int(start.removeprefix("random_")))))
        return {"spec": specs[d], "data": data(), "seed": s, "init": init,
                "bpda": cell.endswith("_bpda") and _has_bpda(specs[d]),
                "cfg": patch_training_config(p, side, attack), "num_threads": params.resources.num_cpus}

    cached_map(patch_task, list(files), files.__getitem__, item=start_item,
               desc=f"adaptive patches (defense x attack x seed x {len(starts)} start(s))",
               num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus)

    # choose, per (defense, cell, seed), the candidate that attacks the validation split best
    _, h, w = load_meta(prepared)["image_shape"]
    if p.location == "fixed":
        val_placements = corner_placements(len(x_val), (h, w), side)
    else:  # a stream of its own: the test placements are not reused
        val_placements = fixed_placements(len(x_val), 1, (h, w), side, ev.placement_seed + 1)
    names = ["transferred", *starts]
    groups: dict[tuple, list[str]] = {}  # (defense, attack, candidate files) -> the cells sharing them
    for d, cell in defended:
        group = tuple(files[(d, cell, s, start)] for s in p.seeds for start in starts)
        groups.setdefault((d, ADAPTIVE_PATCH_ATTACKS[cell], group), []).append(cell)
    candidates = {}
    for (d, attack, group), _cells in groups.items():
        trained = [load_torch(f)["patch"] for f in group]
        per_seed = [[baseline_patches[attack][i], *trained[i * len(starts):(i + 1) * len(starts)]]
                    for i in range(len(p.seeds))]
        candidates[(d, attack, group)] = torch.stack([c for cs in per_seed for c in cs])
    init_ray()
    val_ref = shared((x_val, y_val))
    items = [{"spec": specs[d], "data": val_ref, "patches": candidates[(d, attack, group)], "attack": attack,
              "placements": val_placements, "target": p.target, "batch_size": ev.batch_size,
              "num_threads": params.resources.num_cpus} for d, attack, group in groups]
    scores = ray_map(score_patches_task, items, num_cpus=params.resources.num_cpus,
                     num_gpus=params.resources.num_gpus, desc="select adaptive patches on the validation split")
    selection: dict[tuple[str, str], dict[str, Any]] = {}
    for (key, cells), score in zip(groups.items(), scores, strict=True):
        k = len(names)
        acc, loss = score["robust_accuracy"].view(-1, k), score["loss"].view(-1, k)
        best = [min(range(k), key=lambda j, i=i: (float(acc[i, j]), float(loss[i, j]))) for i in range(len(p.seeds))]
        chosen = torch.stack([candidates[key][i * k + j] for i, j in enumerate(best)])
        d, attack, group = key
        ids = [baseline_ids[attack][i] if j == 0 else group[i * len(starts) + j - 1].parent.name
               for i, j in enumerate(best)]
        info = {"selected_start": ",".join(names[j] for j in best),
                "val_robust_accuracy": float(torch.stack([acc[i, j] for i, j in enumerate(best)]).mean()),
                "val_robust_accuracy_transferred": float(acc[:, 0].mean()), "val_images": len(x_val)}
        for cell in cells:
            out[(d, cell)] = (chosen, ids)
            selection[(d, cell)] = info
    return out, selection


def _has_bpda(spec: dict[str, Any]) -> bool:
    """Whether a checkpoint dict's model has a defense with a BPDA switch (FNC's clipping)."""
    return has_bpda(spec.get("defenses", []))
