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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.patch import (  # noqa: E402
    apply_patch,
    patch_cache_params,
    patch_side,
    patch_training_config,
    patch_training_images,
    sample_placements,
)
from pipeline.checkpoint import load_checkpoint  # noqa: E402
from pipeline.cli import resume_dir, run_stage  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.data import load_meta, load_tensors  # noqa: E402
from pipeline.distributed import init_ray, ray_map  # noqa: E402
from pipeline.io import atomic_write, load_torch, save_figure, save_json, save_png, save_torch, sha256_file  # noqa: E402
from pipeline.tasks import patch_task  # noqa: E402
from pipeline.tracking import log_artifacts, log_metrics, stage_run  # noqa: E402

log = logging.getLogger("generate_patches")
PREPARED = Path("data/prepared")


def training_images(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the patch is optimised on: the chosen split, without the target
    class, a seeded subset of ``patch.train_images`` (:func:`patch_training_images`)."""
    x, y = load_tensors(PREPARED / params.data.dataset, params.patch.train_on)
    return patch_training_images(x, y, params.patch.target, params.patch.train_images, params.seed)


def main(params: Params) -> None:
    """Train one AdvP patch per seed against the baseline (cached per seed) and write them."""
    name = params.model.name
    spec = load_checkpoint(Path("models") / name / "baseline.pt")
    meta = load_meta(PREPARED / params.data.dataset)
    _, h, w = meta["image_shape"]
    p = params.patch
    side = patch_side(p.area_fraction, h, w)
    x, y = training_images(params)
    log.info("patches %dx%d px (%.1f%% of %dx%d), attacks %s, target %s, %s location, %d training images, seeds %s",
             side, side, 100 * side * side / (h * w), h, w, p.attacks, p.target, p.location, len(x), p.seeds)

    ckpt_hash = sha256_file(Path("models") / name / "baseline.pt")
    shared = patch_cache_params(p)
    base_key = {"patch": shared, "model": name, "weights": ckpt_hash, "seed": params.seed, "n_train": len(x)}
    jobs = [(a, s) for a in p.attacks for s in p.seeds]

    def cache_file(attack: str, seed: int) -> Path:
        return resume_dir("generate_patches", {**base_key, "attack": attack, "patch_seed": seed}) / "result.pt"

    cached, todo = {}, []
    for job in jobs:
        if cache_file(*job).is_file():
            cached[job] = load_torch(cache_file(*job))
            log.info("%s seed %d: reusing finished patch from %s", *job, cache_file(*job))
        else:
            todo.append(job)
    if todo:
        init_ray()
        data = ray.put((x, y))
        items = [{"spec": spec, "data": data, "cfg": patch_training_config(p, side, attack), "seed": seed,
                  "num_threads": params.resources.num_cpus} for attack, seed in todo]

        def finished(i: int, r: dict) -> None:  # cached as each task ends: a killed run redoes only the others
            cached[todo[i]] = r
            save_torch(r, cache_file(*todo[i]))

        ray_map(patch_task, items, num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus,
                desc="patches (one task per attack and seed)", on_result=finished)

    rows = []
    summary: dict = {"side": side, "area_fraction": side * side / (h * w), "target": p.target, "location": p.location}
    for attack in p.attacks:
        out_dir = Path("patches") / name / attack
        summary[attack] = {}
        for seed in p.seeds:
            r = cached[(attack, seed)]
            save_torch(r["patch"], out_dir / f"seed_{seed}.pt")
            save_png(r["patch"], out_dir / f"seed_{seed}.png", upscale=8)
            rows += [{"attack": attack, "seed": seed, "epoch": e, "loss": v, "series": f"{attack} seed {seed}"}
                     for e, v in enumerate(r["history"])]  # series: a line of dvc plots show's chart
            summary[attack][str(seed)] = {"final_loss": r["history"][-1], "seconds": round(r["seconds"], 1)}
        _figure([cached[(attack, s)]["patch"] for s in p.seeds], p.seeds, x[:1], meta["classes"], p.target,
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
            log_artifacts(Path("patches") / name / attack, artifact_path=f"patches/{attack}")


def _figure(patches, seeds, example, classes, target, path: Path, attack: str) -> None:
    """The patches side by side, and one training image with the first patch pasted."""
    n = len(patches)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.2 * (n + 1), 2.6))
    for ax, patch, seed in zip(axes, patches, seeds, strict=False):
        ax.imshow(patch.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.axis("off")
    img = example.float() / 255
    side = patches[0].shape[-1]
    pl = sample_placements(1, img.shape[-2:], side, generator=torch.Generator().manual_seed(0))
    axes[-1].imshow(apply_patch(img, patches[0], pl)[0].permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[-1].set_title("pasted", fontsize=9)
    axes[-1].axis("off")
    goal = f"target: {classes[target]}" if target is not None else "untargeted"
    label = {"advp": "AdvP", "lavan": "LaVAN"}.get(attack, attack)
    fig.suptitle(f"universal adversarial patches ({label}), {goal}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    run_stage("generate_patches", main)
