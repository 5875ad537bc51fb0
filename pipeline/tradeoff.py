"""FNC's clipping trade-off curve, computed (the stage ``fnc_tradeoff``; the cells' keys,
records, table and figure are :mod:`pipeline.analysis.fnc_tradeoff`).

For every ``fnc_tradeoff.alphas`` x ``fnc_tradeoff.adjustments`` cell, the baseline with
feature norm clipping (Yu et al., ICCV 2021, Eq. 4) inserted at that alpha and adjusted
(the other settings from the ``fnc`` section), and the baseline itself: predictions on a
seeded test subset (a prefix of evaluate's order, ``fnc_tradeoff.test_images``), clean and
under every transferred universal patch of ``generate_patches`` at evaluate's placements.
One Ray task per cell, each cached as it finishes (:func:`pipeline.cached.cached_map`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from pipeline import papers
from pipeline.analysis import fnc_tradeoff as ft
from pipeline.attacks.patch import patch_side
from pipeline.cached import cached_map
from pipeline.cached import shared as put
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import resume_dir
from pipeline.config import Params
from pipeline.data import dataset_name, horizontal_flip, load_meta, load_tensors
from pipeline.evaluation import test_order
from pipeline.io import load_torch, sha256_file
from pipeline.layout import model_path, patch_path, prepared_dir
from pipeline.tasks import fnc_tradeoff_task


def tradeoff_curve(params: Params) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Every cell of ``params.fnc_tradeoff`` (``alphas`` must not be empty), from the cache or computed.

    Returns:
        ``(summary, fnc_cells, node_ids)``: the body of ``metrics/fnc_tradeoff.json`` (the
        baseline, per adjustment and alpha the cell's rates with 95 % Wilson intervals, the
        published point and the closest cell), the FNC cells' records in order, and the Ray
        nodes that computed them.

    Raises:
        FileNotFoundError: the baseline or a patch is missing, or a patch's side does not
            match ``patch.area_fraction`` (rerun generate_patches).
    """
    cfg, fnc, ev, p = params.fnc_tradeoff, params.fnc, params.evaluate, params.patch
    name = params.model.name
    prepared = prepared_dir(params.data.dataset)
    baseline_path = model_path(name)
    spec = load_checkpoint(baseline_path)
    meta = load_meta(prepared)
    x_all, y_all = load_tensors(prepared, "test")
    order = test_order(len(x_all), ev.subset_seed)
    idx = order[: cfg.test_images]
    x, y = x_all[idx].contiguous(), y_all[idx].contiguous()
    n_evaluate = len(order[: ev.test_images])  # evaluate's images: placements are drawn for them
    _, h, w = meta["image_shape"]
    side = patch_side(p.area_fraction, h, w)
    patches, patch_ids = {}, {}
    for attack in p.attacks:
        files = [patch_path(name, attack, s) for s in p.seeds]
        patches[attack] = torch.stack([load_torch(f) for f in files])
        patch_ids[attack] = [sha256_file(f) for f in files]
        if patches[attack].shape[-1] != side:
            raise FileNotFoundError(f"patches/{name}/{attack}: patch side {patches[attack].shape[-1]} != {side}; "
                                    "rerun generate_patches (dvc repro)")
    n_reference = max(len(x), n_evaluate)
    placements = ft.subset_placements(len(x), n_reference, ev.placements, (h, w), side, ev.placement_seed, p.location)
    common = {"baseline": sha256_file(baseline_path), "patches": patch_ids,
              "subset": {"n": len(x), "subset_seed": ev.subset_seed, "data": meta["source"]["sha256"],
                         "splits": meta["splits"], "prepared_subset": meta.get("subset")},
              "where": {"location": p.location, "placements": ev.placements, "placement_seed": ev.placement_seed,
                        "n_reference": n_reference},
              "code": ft.code_hashes()}

    cells = [ft.Cell(None, None), *(ft.Cell(a, adj) for adj in cfg.adjustments for a in cfg.alphas)]

    @functools.cache
    def inputs() -> dict[str, Any]:  # what every task reads, in Ray's object store once a cell is missing
        needs_train = any(cell.adjustment not in (None, "none") for cell in cells)
        return {"spec": put(spec), "x": put(x), "patches": put(patches),
                "train": put(load_tensors(prepared, "train")) if needs_train else None,
                "horizontal_flip": horizontal_flip(meta, params.train.augment), "block_types": fnc.block_types}

    def item(c: ft.Cell) -> dict[str, Any]:
        return {**inputs(), "alpha": c.alpha, "adjustment": c.adjustment, "eps": fnc.eps,
                "adjust_batches": fnc.adjust_batches, "finetune_epochs": fnc.finetune_epochs,
                "finetune_lr": fnc.finetune_lr, "adjust_batch_size": fnc.batch_size, "seed": params.seed,
                "placements": placements, "batch_size": ev.batch_size, "num_threads": params.resources.num_cpus}

    results = cached_map(fnc_tradeoff_task, cells,
                         lambda c: resume_dir("fnc_tradeoff", ft.cell_key(common, c, fnc, params.seed)) / "cell.pt",
                         item=item, desc="FNC trade-off (alpha x adjustment, and the baseline)",
                         num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus)

    attacks = list(p.attacks)
    records = {c: ft.cell_record(c, results[c], y, p.target, attacks) for c in cells}
    fnc_cells = [records[c] for c in cells if not c.is_baseline]
    reference = papers.FNC_CIFAR10 if params.data.dataset == "cifar10" else None
    summary = {
        "enabled": True, "profile": params.profile, "model": name, "dataset": dataset_name(meta),
        "alphas": list(cfg.alphas), "adjustments": list(cfg.adjustments), "attacks": attacks,
        "n_images": len(x), "n_seeds": len(p.seeds), "placements": ev.placements, "patch_target": p.target,
        "baseline": records[cells[0]],
        "cells": {adj: {ft.alpha_key(a): records[ft.Cell(a, adj)] for a in cfg.alphas} for adj in cfg.adjustments},
        "reference": None if reference is None else {k: reference[k] for k in ("clean_accuracy", "advp", "source",
                                                                               "setting")},
        "closest": ft.closest(fnc_cells, reference),
    }
    return summary, fnc_cells, sorted({r["node_id"] for r in results.values()})
