"""DVC stage ``generate_patches``: universal adversarial patches against the baseline.

For every attack in ``patch.attacks`` (``advp``: Brown et al. 2017; ``lavan``:
Karmon et al. 2018, the FNC authors' logit-margin loss), one Ray task per seed
in ``patch.seeds``. Writes, under ``patches/<model>/<attack>/``:
``seed_<k>.pt`` (float32 (3, s, s) in [0, 1]), ``seed_<k>.png`` (8x
upscaled), ``patches.png`` (all seeds and a patched example), plus
``metrics/generate_patches.json`` and ``plots/patch_loss.csv``. A finished
(attack, seed) is cached under ``.cache/generate_patches/``, so a killed run
redoes only what had not finished, and adding an attack to ``patch.attacks``
trains only the new one.
"""

from __future__ import annotations

import logging

import pandas as pd
import torch

from pipeline.attacks.patch import patch_cache_params, patch_side, patch_training_config, patch_training_images
from pipeline.cached import cached_map, shared_once
from pipeline.checkpoint import load_checkpoint
from pipeline.cli import resume_dir, run_stage
from pipeline.config import Params
from pipeline.data import load_meta, load_tensors
from pipeline.io import atomic_write, save_json, save_png, save_torch, sha256_file
from pipeline.layout import model_path, patch_dir, prepared_dir
from pipeline.render.patches import patches_figure
from pipeline.tasks import patch_task
from pipeline.tracking import log_artifacts, log_metrics, stage_run

log = logging.getLogger("generate_patches")


def training_images(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the patch is optimised on: the chosen split, without the target
    class, a seeded subset of ``patch.train_images`` (:func:`patch_training_images`)."""
    x, y = load_tensors(prepared_dir(params.data.dataset), params.patch.train_on)
    return patch_training_images(x, y, params.patch.target, params.patch.train_images, params.seed)


def main(params: Params) -> None:
    """Train one AdvP patch per seed against the baseline (cached per seed) and write them."""
    name = params.model.name
    spec = load_checkpoint(model_path(name))
    meta = load_meta(prepared_dir(params.data.dataset))
    _, h, w = meta["image_shape"]
    p = params.patch
    side = patch_side(p.area_fraction, h, w)
    x, y = training_images(params)
    log.info("patches %dx%d px (%.1f%% of %dx%d), attacks %s, target %s, %s location, %d training images, seeds %s",
             side, side, 100 * side * side / (h * w), h, w, p.attacks, p.target, p.location, len(x), p.seeds)

    base_key = {"patch": patch_cache_params(p), "model": name, "weights": sha256_file(model_path(name)),
                "seed": params.seed, "n_train": len(x)}
    data = shared_once(lambda: (x, y))  # the training images, put once, when a patch is missing

    def job(key: tuple[str, int]) -> dict:
        return {"spec": spec, "data": data(), "cfg": patch_training_config(p, side, key[0]), "seed": key[1],
                "num_threads": params.resources.num_cpus}

    cached = cached_map(patch_task, [(a, s) for a in p.attacks for s in p.seeds],
                        lambda key: resume_dir("generate_patches", {**base_key, "attack": key[0],
                                                                    "patch_seed": key[1]}) / "result.pt",
                        item=job, desc="patches (one task per attack and seed)",
                        num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus)

    rows = []
    summary: dict = {"side": side, "area_fraction": side * side / (h * w), "target": p.target, "location": p.location}
    for attack in p.attacks:
        out_dir = patch_dir(name, attack)
        summary[attack] = {}
        for seed in p.seeds:
            r = cached[(attack, seed)]
            save_torch(r["patch"], out_dir / f"seed_{seed}.pt")
            save_png(r["patch"], out_dir / f"seed_{seed}.png", upscale=8)
            rows += [{"attack": attack, "seed": seed, "epoch": e, "loss": v, "series": f"{attack} seed {seed}"}
                     for e, v in enumerate(r["history"])]  # series: a line of dvc plots show's chart
            summary[attack][str(seed)] = {"final_loss": r["history"][-1], "seconds": round(r["seconds"], 1)}
        patches_figure([cached[(attack, s)]["patch"] for s in p.seeds], p.seeds, x[:1], meta["classes"], p.target,
                out_dir / "patches.png", attack)
    save_json(summary, "metrics/generate_patches.json")
    loss_csv = pd.DataFrame(rows).to_csv(index=False).encode()
    atomic_write("plots/patch_loss.csv", lambda f: f.write(loss_csv))

    section = {"model": params.model.model_dump(), "patch": p.model_dump(), "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper,
            "model": name, "attack": ",".join(p.attacks), "defense": "none",
            "node_ids": ",".join(sorted({r.get("node_id", "?") for r in cached.values()}))}
    with stage_run("generate_patches", params.mlflow.experiment, section, tags):
        for row in rows:
            log_metrics({f"patch_loss.{row['attack']}.seed_{row['seed']}": row["loss"]}, step=row["epoch"])
        log_metrics({f"seconds.{a}.seed_{s}": v["seconds"] for a in p.attacks for s, v in summary[a].items()})
        for attack in p.attacks:
            log_artifacts(patch_dir(name, attack), artifact_path=f"patches/{attack}")


if __name__ == "__main__":
    run_stage("generate_patches", main)
