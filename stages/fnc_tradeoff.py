"""DVC stage ``fnc_tradeoff``: FNC's clipping trade-off curve (:mod:`pipeline.analysis.fnc_tradeoff`).

For every ``fnc_tradeoff.alphas`` x ``fnc_tradeoff.adjustments`` cell, the baseline with
feature norm clipping (Yu et al., ICCV 2021, Eq. 4) inserted at that alpha and adjusted
(the other settings from the ``fnc`` section), and the baseline itself: predictions on a
seeded test subset (a prefix of evaluate's order, ``fnc_tradeoff.test_images``), clean and
under every transferred universal patch of ``generate_patches`` at evaluate's placements.
One Ray task per cell; each finished cell is cached under ``.cache/fnc_tradeoff/`` by a
hash of what it depends on (:func:`pipeline.analysis.fnc_tradeoff.cell_key`: the baseline
file, the patches, alpha, the adjustment and its settings, the images, the placements, the
code), so adding an alpha computes only its cells and a killed run resumes.

Writes ``metrics/fnc_tradeoff.json`` (the baseline, every cell with its rates and 95 %
Wilson intervals, the published point and the cell closest to it), ``metrics/fnc_tradeoff.md``,
``plots/fnc_tradeoff.csv`` (a row per cell) and ``plots/fnc_tradeoff.png`` (clean against
AdvP accuracy, a line per adjustment), and logs them to MLflow with a nested run per cell.
With ``fnc_tradeoff.alphas`` empty (the default) it writes only a note that it is off.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch

from pipeline import papers
from pipeline.analysis import fnc_tradeoff as ft
from pipeline.attacks.patch import patch_side
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import resume_dir, run_stage
from pipeline.config import Params
from pipeline.data import load_meta, load_tensors
from pipeline.data.datasets import DATASETS
from pipeline.distributed import init_ray, ray_map
from pipeline.evaluation import test_order
from pipeline.io import atomic_write, load_torch, save_json, save_torch, sha256_file
from pipeline.tasks import fnc_tradeoff_task
from pipeline.tracking import flatten, log_artifact, log_child_runs, log_metrics, stage_run

log = logging.getLogger("fnc_tradeoff")
PREPARED = Path("data/prepared")
JSON, MD = Path("metrics/fnc_tradeoff.json"), Path("metrics/fnc_tradeoff.md")
CSV, PNG = Path("plots/fnc_tradeoff.csv"), Path("plots/fnc_tradeoff.png")


def _write_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] | None = None) -> None:
    data = pd.DataFrame(rows, columns=list(columns) if columns else None).to_csv(index=False).encode()
    atomic_write(CSV, lambda f: f.write(data))


def write_off(params: Params) -> None:
    """The outputs of a profile without alphas: a note (JSON and markdown), the CSV's header and a
    PNG saying so (DVC needs every output); no task, no MLflow run."""
    note = ft.off_note(params.profile)
    save_json({"enabled": False, "note": note}, JSON)
    atomic_write(MD, lambda f: f.write(f"# FNC trade-off\n\n{note}\n".encode()))
    _write_csv([], ft.CSV_HEAD)
    png = ft.off_figure(params.profile)
    atomic_write(PNG, lambda f: f.write(png))
    log.info("%s", note)


def _shared(obj: Any) -> Any:
    """``ray.put(obj)`` once Ray is up (inputs every task reads), else the object itself."""
    return ray.put(obj) if ray.is_initialized() else obj


def main(params: Params) -> None:
    """Compute (or read from the cache) every cell of the trade-off and write its outputs."""
    cfg, fnc, ev, p = params.fnc_tradeoff, params.fnc, params.evaluate, params.patch
    if not cfg.alphas:
        write_off(params)
        return
    name = params.model.name
    prepared = PREPARED / params.data.dataset
    baseline_path = Path("models") / name / "baseline.pt"
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
        files = [Path("patches") / name / attack / f"seed_{s}.pt" for s in p.seeds]
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
    files = {c: resume_dir("fnc_tradeoff", ft.cell_key(common, c, fnc, params.seed)) / "cell.pt" for c in cells}
    results = {c: load_torch(files[c]) for c in cells if files[c].is_file()}
    todo = [c for c in cells if c not in results]
    log.info("%d of %d cells cached (the baseline and %d alpha x %d adjustment); computing %d", len(results),
             len(cells), len(cfg.alphas), len(cfg.adjustments), len(todo))
    if todo:
        init_ray()
        train = _shared(load_tensors(prepared, "train")) if any(c.adjustment not in (None, "none") for c in todo) \
            else None
        shared = {"spec": _shared(spec), "x": _shared(x), "patches": _shared(patches), "train": train,
                  "horizontal_flip": DATASETS[meta["dataset"]].horizontal_flip}
        res = params.resources
        items = [{**shared, "alpha": c.alpha, "adjustment": c.adjustment, "eps": fnc.eps,
                  "adjust_batches": fnc.adjust_batches, "finetune_epochs": fnc.finetune_epochs,
                  "finetune_lr": fnc.finetune_lr, "adjust_batch_size": fnc.batch_size, "seed": params.seed,
                  "placements": placements, "batch_size": ev.batch_size, "num_threads": res.num_cpus} for c in todo]

        def done(i: int, r: dict[str, Any]) -> None:  # cached as each cell ends: a killed run resumes here
            save_torch(r, files[todo[i]])
            results[todo[i]] = r

        ray_map(fnc_tradeoff_task, items, num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                desc="FNC trade-off (alpha x adjustment, and the baseline)", on_result=done)

    attacks = list(p.attacks)
    records = {c: ft.cell_record(c, results[c], y, p.target, attacks) for c in cells}
    fnc_cells = [records[c] for c in cells if not c.is_baseline]
    reference = papers.FNC_CIFAR10 if params.data.dataset == "cifar10" else None
    summary = {
        "enabled": True, "profile": params.profile, "model": name, "dataset": params.data.dataset,
        "alphas": list(cfg.alphas), "adjustments": list(cfg.adjustments), "attacks": attacks,
        "n_images": len(x), "n_seeds": len(p.seeds), "placements": ev.placements, "patch_target": p.target,
        "baseline": records[cells[0]],
        "cells": {adj: {ft.alpha_key(a): records[ft.Cell(a, adj)] for a in cfg.alphas} for adj in cfg.adjustments},
        "reference": None if reference is None else {k: reference[k] for k in ("clean_accuracy", "advp", "source",
                                                                               "setting")},
        "closest": ft.closest(fnc_cells, reference),
    }
    save_json(summary, JSON)
    md = ft.markdown(summary)
    atomic_write(MD, lambda f: f.write(md.encode()))
    _write_csv(ft.table(summary))
    png = ft.figure(summary)
    atomic_write(PNG, lambda f: f.write(png))
    log.info("%s\n%s", ft.closest_sentence(summary),
             pd.DataFrame(ft.display_rows(summary)).to_string(index=False))

    section = {"model": params.model.model_dump(), "fnc_tradeoff": cfg.model_dump(mode="json"),
               "fnc": {k: v for k, v in fnc.model_dump().items() if k not in ("alpha", "adjustment")},
               "patch": {k: getattr(p, k) for k in ("attacks", "seeds", "location", "area_fraction", "target")},
               "evaluate": {k: getattr(ev, k) for k in ("subset_seed", "placement_seed", "placements", "test_images")},
               "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper, "model": name, "dataset": params.data.dataset,
            "node_ids": ",".join(sorted({r["node_id"] for r in results.values()}))}
    if summary["closest"] is not None:
        tags["closest_to_reference"] = f"alpha {summary['closest']['alpha']:g}, {summary['closest']['adjustment']}"
    with stage_run("fnc_tradeoff", params.mlflow.experiment, section, tags):
        log_metrics({"baseline": _numbers(summary["baseline"]),
                     **{adj: {f"alpha_{k}": _numbers(c) for k, c in by_alpha.items()}
                        for adj, by_alpha in summary["cells"].items()}})
        log_child_runs([{"name": f"{c['adjustment']} / alpha {c['alpha']:g}",
                         "params": {"model": name, "fnc.alpha": c["alpha"], "fnc.adjustment": c["adjustment"],
                                    "n_images": c["n_images"]},
                         "tags": {"fnc.adjustment": c["adjustment"]},
                         "metrics": flatten(_numbers(c))} for c in fnc_cells])
        for f in (JSON, MD, CSV, PNG):
            log_artifact(f, artifact_path="fnc_tradeoff")


def _numbers(record: dict[str, Any]) -> dict[str, Any]:
    """A cell's rates and counts for MLflow (``advp.robust_accuracy``, ...), without alpha and adjustment."""
    return {k: v for k, v in record.items() if k not in ("alpha", "adjustment")}


if __name__ == "__main__":
    run_stage("fnc_tradeoff", main)
