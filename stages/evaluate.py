"""DVC stage ``evaluate``: the (model, defense, attack) matrix on the test set.

Defenses from ``evaluate.defenses`` (``none``: the baseline; any other name: the
model ``train_defended@<name>`` made), attacks from ``evaluate.attacks``: ``none``
(clean), the universal patches of generate_patches (``advp``, ``lavan``: made on the
undefended model and transferred, as the FNC authors evaluate), their adaptive
counterparts (``advp_adaptive``, ``lavan_adaptive``: the same training against each
defended model itself, white box; Athalye et al. 2018), ``occlusion`` (uniform-noise
patches of the same size at the same placements), and the registered per-image
attacks (run white-box on each model, with their params from the ``attacks``
section; gradients through non-differentiable input transforms by BPDA).

One Ray task per (defense, test shard) for the clean and patch cells, and per
(defense, attack, shard) for the per-image attacks. Every cell's raw
predictions are cached under ``.cache/evaluate/`` by a hash of what it depends
on (the model file, the patches, the attack's params, the test subset), so a
rerun after adding an attack, or changing one attack's params, computes only
those cells; each task's shard of a cell is cached there as soon as the task
finishes, so a killed run redoes only the tasks that had not finished. Writes
``metrics/evaluate.json`` (nested model -> defense -> attack -> metric,
fractions in [0, 1]), ``metrics/headline.json`` (per defense the few numbers
``dvc metrics show`` prints: :func:`headline`), ``metrics/evaluate.md`` (the
table), ``plots/evaluate.csv``, ``plots/evaluate_accuracy.csv`` (the bar chart
``dvc plots show`` draws) and ``plots/evaluate.png``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.base import attack_params_class, build_attack, parse_fraction  # noqa: E402
from pipeline.attacks.patch import (  # noqa: E402
    corner_placements,
    patch_cache_params,
    patch_side,
    patch_training_config,
    patch_training_images,
)
from pipeline.checkpoint import load_checkpoint  # noqa: E402
from pipeline.cli import resume_dir, run_stage  # noqa: E402
from pipeline.config import ADAPTIVE_PATCH_ATTACKS, PATCH_ATTACKS, Params  # noqa: E402
from pipeline.data import load_meta, load_tensors, load_validation  # noqa: E402
from pipeline.distributed import init_ray, ray_map  # noqa: E402
from pipeline.evaluation import (  # noqa: E402
    attack_cell_metrics,
    cell_metrics,
    fixed_placements,
    noise_patches,
    per_image_worst_metrics,
    test_order,
    worst_case_metrics,
)
from pipeline.io import (  # noqa: E402
    atomic_write,
    figure_png,
    load_torch,
    save_json,
    save_png,
    save_torch,
    sha256_file,
)
from pipeline.tasks import attack_task, evaluate_task, fit_task, patch_task, score_patches_task  # noqa: E402
from pipeline.tracking import log_artifact, log_artifacts, log_child_runs, log_metrics, stage_run  # noqa: E402

log = logging.getLogger("evaluate")
PREPARED = Path("data/prepared")
PATCH_CELLS = ("none", *PATCH_ATTACKS, *ADAPTIVE_PATCH_ATTACKS, "occlusion")
"""Cells computed from the same forward passes at fixed placements (clean, patches, control)."""
HEADLINE = Path("metrics/headline.json")
"""Per defense: clean, worst-case patch, PGD and AutoAttack accuracy (:func:`headline`)."""
PER_IMAGE_WORST = "per_image_worst"
"""The cell of the per-image worst case over the attacks of :func:`per_image_worst_attacks`."""
HEADLINE_ATTACKS = ("pgd", "autoattack", PER_IMAGE_WORST)
"""The per-image cells whose robust accuracy :func:`headline` reports, where evaluated."""
ACCURACY_CSV = Path("plots/evaluate_accuracy.csv")
"""Accuracy per (defense, attack) cell, labelled with its images, for ``dvc plots show`` (:func:`accuracy_bars`)."""


HEADLINE_METRICS = ("clean_accuracy", "robust_accuracy", "attack_success_rate")
"""The metrics of every cell logged on the evaluate run itself (all of them are on its cell's nested run)."""

CELL_METRICS = (*HEADLINE_METRICS, "n_images", "clean_accuracy_ci_low", "clean_accuracy_ci_high",
                "robust_accuracy_ci_low", "robust_accuracy_ci_high", "attack_success_rate_ci_low",
                "attack_success_rate_ci_high", "robust_accuracy_std", "attack_success_rate_std", "ssim", "ssim_global",
                "l0", "linf")
"""The metrics of a cell's nested MLflow run, where the cell has them."""


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


def _cell_runs(table: dict[str, dict[str, dict]], params: Params, model: str) -> list[dict]:
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


def main(params: Params) -> None:
    """Evaluate every (defense, attack) cell of ``params.evaluate`` on the prepared test set."""
    name = params.model.name
    ev = params.evaluate
    ckpts = {d: Path("models") / name / ("baseline.pt" if d == "none" else f"{d}.pt") for d in ev.defenses}
    per_image = [a for a in ev.attacks if a not in PATCH_CELLS]
    for attack in per_image:  # every attack's params validated before any work
        attack_params_class(attack).model_validate(params.attack_params(attack))
    specs = {d: load_checkpoint(path) for d, path in ckpts.items()}
    weights = {d: sha256_file(path) for d, path in ckpts.items()}
    meta = load_meta(PREPARED / params.data.dataset)
    x, y = load_tensors(PREPARED / params.data.dataset, "test")
    order = test_order(len(x), ev.subset_seed)[: ev.test_images]
    x, y = x[order].contiguous(), y[order].contiguous()
    _, h, w = meta["image_shape"]
    side = patch_side(params.patch.area_fraction, h, w)
    seeds = params.patch.seeds
    subset = {"n": len(x), "subset_seed": ev.subset_seed, "data": meta["source"]["sha256"], "splits": meta["splits"]}

    patches: dict[str, torch.Tensor] = {}
    patch_ids: dict[str, Any] = {}
    transferred = dict.fromkeys(ADAPTIVE_PATCH_ATTACKS.get(a, a) for a in ev.attacks)  # the baseline's patches
    for attack in (a for a in transferred if a in PATCH_ATTACKS):  # also read by the adaptive cells of `none`
        files = [Path("patches") / name / attack / f"seed_{s}.pt" for s in seeds]
        patches[attack] = torch.stack([load_torch(f) for f in files])
        patch_ids[attack] = [sha256_file(f) for f in files]
        if patches[attack].shape[-1] != side:
            raise FileNotFoundError(f"patches/{name}/{attack}: patch side {patches[attack].shape[-1]} != {side}; "
                                    "rerun generate_patches (dvc repro)")
    if "occlusion" in ev.attacks:
        patches["occlusion"] = noise_patches(len(seeds), side, ev.placement_seed)
        patch_ids["occlusion"] = {"noise_seed": ev.placement_seed, "n": len(seeds), "side": side}
    patches_of = {d: dict(patches) for d in ev.defenses}  # defense -> attack -> (S, 3, side, side)
    ids_of = {d: dict(patch_ids) for d in ev.defenses}
    adaptive = [a for a in ev.attacks if a in ADAPTIVE_PATCH_ATTACKS]
    selection: dict[tuple[str, str], dict[str, Any]] = {}
    if adaptive:
        made, selection = _adaptive_patches(params, specs, weights, adaptive, side, patches, patch_ids)
        for d in ev.defenses:
            for a in adaptive:
                patches_of[d][a], ids_of[d][a] = made[(d, a)]
    if params.patch.location == "fixed":
        placements = corner_placements(len(x) * ev.placements, (h, w), side)
    else:
        placements = fixed_placements(len(x), ev.placements, (h, w), side, ev.placement_seed)
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

    cells: dict[tuple[str, str], dict] = {}
    for d in ev.defenses:
        for a in ev.attacks:
            if cell_cache(d, a).is_file():
                cells[(d, a)] = load_torch(cell_cache(d, a))
    log.info("%d of %d cells cached; computing the rest", len(cells), len(ev.defenses) * len(ev.attacks))

    parts: dict[tuple[str, str], dict[int, dict]] = {}  # cell -> shard -> the part its finished task made

    def shard_cache(defense: str, attack: str, k: int, m: int) -> Path:
        """Where shard ``k`` of a cell's ``m`` is cached, as soon as its task has finished."""
        return cell_cache(defense, attack).with_name(f"shard_{k}_of_{m}.pt")

    def add_part(cell: tuple[str, str], k: int, m: int, part: dict, compose: Callable[[list[dict]], dict],
                 cached: bool = False) -> None:
        """Keep (and unless ``cached``, cache at once) shard ``k`` of a cell's ``m``; with
        all ``m`` there, ``compose(parts in shard order)`` is the cell, cached too."""
        if not cached:
            save_torch(part, shard_cache(*cell, k, m))
        got = parts.setdefault(cell, {})
        got[k] = part
        if len(got) == m:
            cells[cell] = compose([got[j] for j in sorted(got)])
            save_torch(cells[cell], cell_cache(*cell))

    def load_parts(cell: tuple[str, str], ks: list[int], compose: Callable[[list[dict]], dict]) -> None:
        """The shards of an uncached cell that a killed run finished."""
        for k in ks:
            if shard_cache(*cell, k, len(ks)).is_file():
                add_part(cell, k, len(ks), load_torch(shard_cache(*cell, k, len(ks))), compose, cached=True)

    def patch_cell(ps: list[dict]) -> dict:
        return {"preds": torch.cat([p["preds"] for p in ps], dim=-1), "node_ids": sorted({p["node_id"] for p in ps})}

    shards = [s for s in torch.arange(len(x)).tensor_split(ev.num_shards) if len(s)]
    res = params.resources
    items, meta_items = [], []
    for d in ev.defenses:
        for a in ev.attacks:
            if a in PATCH_CELLS and (d, a) not in cells:
                load_parts((d, a), list(range(len(shards))), patch_cell)
        todo = [a for a in ev.attacks if a in PATCH_CELLS and (d, a) not in cells]
        if not todo:
            continue
        init_ray()
        patches_ref = ray.put({a: p for a, p in patches_of[d].items() if a in todo})
        spec_ref = ray.put(specs[d])
        for k, idx in enumerate(shards):
            missing = [a for a in todo if k not in parts.get((d, a), {})]
            if not missing:
                continue
            pl_idx = torch.cat([idx + j * len(x) for j in range(ev.placements)])
            items.append({"spec": spec_ref, "x": x[idx].clone(), "placements": placements[pl_idx],
                          "patches": patches_ref, "attacks": [a for a in missing if a != "none"],
                          "batch_size": ev.batch_size, "num_threads": res.num_cpus})
            meta_items.append((d, missing, k))
    if items:
        log.info("clean and patch cells: %d task(s) to run", len(items))

        def patch_done(i: int, r: dict) -> None:
            d, missing, k = meta_items[i]
            for a in missing:
                add_part((d, a), k, len(shards), {"preds": r["preds"][a], "node_id": r["node_id"]}, patch_cell)

        ray_map(evaluate_task, items, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                desc="evaluate clean and patch cells (defense x shard)", on_result=patch_done)

    def attack_cell(ps: list[dict]) -> dict:
        return {
            "pred_clean": torch.cat([p["pred_clean"] for p in ps]),
            "pred_adv": torch.cat([p["pred_adv"] for p in ps]),
            "sizes": {k: torch.cat([p["sizes"][k] for p in ps]) for k in ps[0]["sizes"]},
            "seconds": sum(p["seconds"] for p in ps),
            "node_ids": sorted({p["node_id"] for p in ps}),
        }

    splits: dict[tuple[str, str], dict[int, torch.Tensor]] = {}  # cell -> shard -> its image indices
    for d, a in ((d, a) for d in ev.defenses for a in per_image if (d, a) not in cells):
        n = min(params.attack_params(a).get("n_images") or len(x), len(x))
        splits[(d, a)] = {k: idx for k, idx in enumerate(torch.arange(n).tensor_split(min(ev.num_shards, n)))
                          if len(idx)}
        load_parts((d, a), list(splits[(d, a)]), attack_cell)
    todo_cells = [(d, a) for d in ev.defenses for a in per_image if (d, a) not in cells]
    spec_refs: dict[str, Any] = {}
    fitted: dict[tuple[str, str], Any] = {}
    to_fit = [(d, a) for d, a in todo_cells if build_attack(a, params.attack_params(a)).needs_fit]
    if todo_cells:
        init_ray()
        spec_refs = {d: ray.put(specs[d]) for d in dict.fromkeys(d for d, _ in todo_cells)}
    if to_fit:  # data-dependent set-up (masked PGD's robustness map): once per (defense, attack), not per shard
        fit_ref = ray.put(fit_images(params, ev.fit_images))
        fit_items = [{"spec": spec_refs[d], "attack": a, "params": params.attack_params(a), "fit_data": fit_ref,
                      "num_threads": res.num_cpus} for d, a in to_fit]
        fits = ray_map(fit_task, fit_items, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                       desc=f"fit attacks on {ev.fit_images} training images (defense x attack)")
        fitted = {cell: ray.put(r["state"]) for cell, r in zip(to_fit, fits, strict=True)}
    items, meta_items = [], []
    for d, a in todo_cells:
        ap = params.attack_params(a)
        for k, idx in splits[(d, a)].items():
            if k not in parts.get((d, a), {}):
                items.append({"spec": spec_refs[d], "attack": a, "params": ap, "x": x[idx].clone(), "y": y[idx].clone(),
                              "seed": params.seed * 1000 + k, "fitted": fitted.get((d, a)),
                              "num_threads": res.num_cpus})
                meta_items.append((d, a, k))
    if items:
        log.info("per-image attacks: %d task(s) to run", len(items))

        def attack_done(i: int, r: dict) -> None:
            d, a, k = meta_items[i]
            part = {key: r[key] for key in ("pred_clean", "pred_adv", "sizes", "seconds", "node_id")}
            add_part((d, a), k, len(splits[(d, a)]), part, attack_cell)

        ray_map(attack_task, items, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                desc="evaluate per-image attacks (defense x attack x shard)", on_result=attack_done)

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
    metrics = {name: table}
    save_json(metrics, "metrics/evaluate.json")
    save_json(headline(table, params), HEADLINE)

    rows = [{"model": name, "defense": d, "attack": a, **m} for d, row in table.items() for a, m in row.items()]
    df = pd.DataFrame(rows)
    atomic_write("plots/evaluate.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    bars = accuracy_bars(df).to_csv(index=False).encode()
    atomic_write(ACCURACY_CSV, lambda f: f.write(bars))
    atomic_write("metrics/evaluate.md", lambda f: f.write(_markdown(df, params).encode()))
    figure = _figure(df, name, params)
    atomic_write("plots/evaluate.png", lambda f: f.write(figure))
    log.info("results (%d test images, %d placement(s), %d patch seed(s)):\n%s", len(x), ev.placements, len(seeds),
             df[["defense", "attack", "n_images", "clean_accuracy", "robust_accuracy", "attack_success_rate"]]
             .to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    section = {"model": params.model.model_dump(), "evaluate": ev.model_dump(), "patch": params.patch.model_dump(),
               "fnc": params.fnc.model_dump(), "seed": params.seed,
               "attacks": {a: params.attack_params(a) for a in per_image}}
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": name, "defenses": ",".join(ev.defenses),
            "attacks": ",".join(ev.attacks),
            "node_ids": ",".join(sorted({n for c in cells.values() for n in c.get("node_ids", [])}))}
    with stage_run("evaluate", params.mlflow.experiment, section, tags):
        # the parent run holds the three rates per cell; every cell is a nested run too, with
        # its defense, attack and budget as params, for the runs table and the compare view
        log_metrics({d: {a: {k: m[k] for k in HEADLINE_METRICS if k in m} for a, m in row.items()}
                     for d, row in table.items()})
        log_child_runs(_cell_runs(table, params, name))
        for f in ("plots/evaluate.csv", "plots/evaluate.png", "metrics/evaluate.md"):
            log_artifact(f, artifact_path="evaluate")
        for attack in (a for a in ev.attacks if a in PATCH_ATTACKS):
            for s in seeds:
                log_artifact(Path("patches") / name / attack / f"seed_{s}.png", artifact_path=f"patches/{attack}")
        with tempfile.TemporaryDirectory() as tmp:  # the adaptive patches, as PNGs per defense
            for d in ev.defenses:
                for attack in (a for a in ev.attacks if a in ADAPTIVE_PATCH_ATTACKS and d != "none"):
                    for s, patch in zip(seeds, patches_of[d][attack], strict=True):
                        save_png(patch, Path(tmp) / d / attack / f"seed_{s}.png", upscale=8)
            if any(Path(tmp).iterdir()):
                log_artifacts(tmp, artifact_path="patches_adaptive")


def _adaptive_patches(
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
    prepared = PREPARED / params.data.dataset
    x_val, y_val = patch_training_images(*load_validation(prepared), p.target, None, params.seed)
    x, y = patch_training_images(*load_tensors(prepared, p.train_on), p.target, p.train_images, params.seed)
    shared = patch_cache_params(p)
    starts = ["warm", *(f"random_{r}" for r in range(1, p.adaptive_restarts + 1))]
    jobs, files, queued = [], {}, set()
    for d, cell in defended:
        attack = ADAPTIVE_PATCH_ATTACKS[cell]
        bpda = cell.endswith("_bpda") and _has_fnc(specs[d])
        for i, s in enumerate(p.seeds):
            for start in starts:
                key = {"patch": shared, "model": name, "weights": weights[d], "seed": params.seed,
                       "n_train": len(x), "attack": attack, "patch_seed": s, "start": start}
                if start == "warm":
                    key["init"] = baseline_ids[attack][i]
                if bpda:  # otherwise the same patch as the _adaptive cell: one cache entry for both
                    key["bpda"] = True
                f = files[(d, cell, s, start)] = resume_dir("evaluate_patches", key) / "result.pt"
                if not f.is_file() and f not in queued:
                    init = (baseline_patches[attack][i] if start == "warm" else  # random_<r>: its own stream
                            torch.rand(3, side, side, generator=torch.Generator().manual_seed(
                                10_000 * s + int(start.removeprefix("random_")))))
                    jobs.append({"d": d, "cell": cell, "seed": s, "bpda": bpda, "init": init, "file": f})
                    queued.add(f)
    if jobs:
        init_ray()
        data = ray.put((x, y))
        items = [{"spec": specs[j["d"]], "data": data, "seed": j["seed"], "init": j["init"], "bpda": j["bpda"],
                  "cfg": patch_training_config(p, side, ADAPTIVE_PATCH_ATTACKS[j["cell"]]),
                  "num_threads": params.resources.num_cpus} for j in jobs]
        ray_map(patch_task, items, num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus,
                desc=f"adaptive patches (defense x attack x seed x {len(starts)} start(s))",
                on_result=lambda i, r: save_torch(r, jobs[i]["file"]))  # cached as each start ends

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
    val_ref = ray.put((x_val, y_val))
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


def _has_fnc(spec: dict[str, Any]) -> bool:
    """Whether a checkpoint dict's model has feature norm clipping (its defenses list)."""
    return any((d.get("name") if isinstance(d, dict) else d) == "fnc" for d in spec.get("defenses", []))


def fit_images(params: Params, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of ``n`` training images (uint8, int64) for attacks that fit on data."""
    x, y = load_tensors(PREPARED / params.data.dataset, "train")
    idx = test_order(len(x), params.seed)[:n]
    return x[idx].contiguous(), y[idx].contiguous()


def _markdown(df: pd.DataFrame, params: Params) -> str:
    """The matrix as a markdown table (pandas + tabulate), one row per cell."""
    cols = [c for c in ("defense", "attack", "n_images", "clean_accuracy", "robust_accuracy", "robust_accuracy_std",
                        "attack_success_rate", "attack_success_rate_std", "fooling_rate", "l0", "l2", "linf", "ssim",
                        "worst_attack", "selected_start", "val_robust_accuracy")
            if c in df]
    head = (f"# {params.model.name}: evaluation matrix ({params.profile} profile)\n\n"
            "Fractions in [0, 1]; `_std` is the standard deviation over patch seeds; `l0` is the fraction of input "
            "values changed, `l2`/`linf` in pixel units of [0, 1]. Patch attacks are made on the undefended model "
            "and transferred; `*_adaptive` patches are made on each defended model itself (white box), `*_bpda` ones "
            "also pass FNC's clipping as the identity in the backward pass (BPDA); each adaptive search starts from "
            "the transferred patch and from `patch.adaptive_restarts` random patches and keeps the start that attacks "
            "the validation split best (`selected_start`, `val_robust_accuracy`); `*_worst` is the worst case over "
            "the transferred and adaptive cells per seed (`worst_attack`: the cell that achieved it). Per-image "
            "attacks are white-box on each model; `per_image_worst` counts an image as robust only if no attack of "
            "PGD's threat model fools it (`worst_attack`: the strongest of them alone).\n\n")
    return head + df[cols].to_markdown(index=False, floatfmt=".4f", missingval="") + "\n"


def _figure(df: pd.DataFrame, model: str, params: Params) -> bytes:
    """Grouped bars: accuracy per defense, clean and under each attack, with seed spread; one
    colour per attack (never reused) and each attack labelled with the images it was measured
    on, since the per-image attacks run on subsets of the clean cell's images."""
    defenses = list(dict.fromkeys(df["defense"]))
    attacks = list(dict.fromkeys(df["attack"]))
    labels = attack_labels(df)
    colours = distinct_colours(len(attacks))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.5 + 0.45 * len(attacks) * len(defenses)), 3.8))
    width = 0.8 / len(attacks)
    for j, attack in enumerate(attacks):
        sub = df[df["attack"] == attack].set_index("defense").reindex(defenses)
        col = "clean_accuracy" if attack == "none" else "robust_accuracy"
        err = None if attack == "none" else sub.get("robust_accuracy_std")
        xs = [i + (j - (len(attacks) - 1) / 2) * width for i in range(len(defenses))]
        bars = ax.bar(xs, sub[col], width, yerr=err, capsize=3, color=colours[j], label=labels[attack])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(defenses)), [f"defense: {d}" for d in defenses])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    target = params.patch.target
    ax.set_title(f"{model}: accuracy clean and under attack ({params.patch.area_fraction:.0%} patches"
                 + (f", target {target})" if target is not None else ")") + "; n: test images per cell", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return figure_png(fig)


def distinct_colours(n: int) -> list:
    """``n`` colours, no two the same: matplotlib's qualitative tab20 (then tab20b and tab20c,
    60 in all; beyond that, evenly spaced hues of a continuous map)."""
    pool = [c for m in ("tab20", "tab20b", "tab20c") for c in plt.get_cmap(m).colors]
    if n <= len(pool):
        return pool[:n]
    return [plt.get_cmap("hsv")(i / n) for i in range(n)]


def attack_labels(df: pd.DataFrame) -> dict[str, str]:
    """Each attack's label with the number of test images its cells were measured on, e.g.
    ``one_pixel (n=30)``, ``clean (n=1000)`` (``n=30/40`` where defenses differ)."""
    out = {}
    for attack, g in df.groupby("attack", sort=False):
        ns = "/".join(str(int(n)) for n in dict.fromkeys(g["n_images"].dropna()))
        out[attack] = f"{'clean' if attack == 'none' else attack} (n={ns})" if ns else attack
    return out


def accuracy_bars(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``plots/evaluate_accuracy.csv``, the chart ``dvc plots show`` draws of the
    matrix: one row per (defense, attack) cell with its accuracy (clean for ``none``, robust
    otherwise), ``label`` the attack with its images (:func:`attack_labels`) and ``series``
    the defense (the bars' colour in ``.dvc/plots/series_bar.json``)."""
    labels = attack_labels(df)
    robust = df["robust_accuracy"] if "robust_accuracy" in df else pd.Series(float("nan"), index=df.index)
    return pd.DataFrame({"defense": df["defense"], "attack": df["attack"], "n_images": df["n_images"],
                         "accuracy": robust.where(df["attack"] != "none", df["clean_accuracy"]),
                         "label": df["attack"].map(labels), "series": df["defense"]})


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


if __name__ == "__main__":
    run_stage("evaluate", main)
