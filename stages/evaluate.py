"""DVC stage ``evaluate``: the (model, defense, attack) matrix on the test set.

Defenses from ``evaluate.defenses`` (``none``: the baseline; ``fnc``: the
train_defended model), attacks from ``evaluate.attacks`` (``none``, ``advp``:
the patches of generate_patches, made on the undefended model and transferred;
``occlusion``: uniform-noise patches of the same size at the same placements).
One Ray task per (defense, test shard). Writes ``metrics/evaluate.json``
(nested model -> defense -> attack -> metric, fractions in [0, 1]),
``plots/evaluate.csv`` and ``plots/evaluate.png``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from pipeline.attacks.patch import patch_side  # noqa: E402
from pipeline.checkpoint import load_checkpoint  # noqa: E402
from pipeline.cli import run_stage  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.data import load_meta, load_tensors  # noqa: E402
from pipeline.distributed import init_ray, ray_map  # noqa: E402
from pipeline.evaluation import cell_metrics, fixed_placements, noise_patches  # noqa: E402
from pipeline.io import atomic_write, load_torch, save_json  # noqa: E402
from pipeline.tasks import evaluate_task  # noqa: E402
from pipeline.tracking import log_metrics, stage_run  # noqa: E402

log = logging.getLogger("evaluate")
PREPARED = Path("data/prepared")


def main(params: Params) -> None:
    """Evaluate every (defense, attack) cell of ``params.evaluate`` on the prepared test set."""
    name = params.model.name
    ev = params.evaluate
    specs = {d: load_checkpoint(Path("models") / name / ("baseline.pt" if d == "none" else f"{d}.pt"))
             for d in ev.defenses}
    meta = load_meta(PREPARED / params.data.dataset)
    x, y = load_tensors(PREPARED / params.data.dataset, "test")
    if ev.test_images is not None:
        x, y = x[: ev.test_images], y[: ev.test_images]
    _, h, w = meta["image_shape"]
    side = patch_side(params.patch.area_fraction, h, w)
    seeds = params.patch.seeds
    patches: dict[str, torch.Tensor] = {}
    if "advp" in ev.attacks:
        patches["advp"] = torch.stack([load_torch(Path("patches") / name / "advp" / f"seed_{s}.pt") for s in seeds])
        if patches["advp"].shape[-1] != side:
            raise FileNotFoundError(f"patches/{name}/advp: patch side {patches['advp'].shape[-1]} != {side}; "
                                    "rerun generate_patches (dvc repro)")
    if "occlusion" in ev.attacks:
        patches["occlusion"] = noise_patches(len(seeds), side, ev.placement_seed)
    placements = fixed_placements(len(x), ev.placements, (h, w), side, ev.placement_seed)

    init_ray()
    patches_ref = ray.put(patches)
    shards = [s for s in torch.arange(len(x)).tensor_split(ev.num_shards) if len(s)]
    items = []
    for d in ev.defenses:
        spec_ref = ray.put(specs[d])
        for idx in shards:
            pl_idx = torch.cat([idx + j * len(x) for j in range(ev.placements)])
            items.append({"defense": d, "spec": spec_ref, "x": x[idx].clone(), "placements": placements[pl_idx],
                          "patches": patches_ref, "batch_size": ev.batch_size,
                          "num_threads": params.resources.num_cpus})
    results = ray_map(evaluate_task, [{k: v for k, v in it.items() if k != "defense"} for it in items],
                      num_cpus=params.resources.num_cpus, num_gpus=params.resources.num_gpus,
                      desc="evaluate (defense x shard)")

    table: dict[str, dict] = {}
    for d in ev.defenses:
        parts = [r["preds"] for it, r in zip(items, results, strict=True) if it["defense"] == d]
        clean = torch.cat([p["none"] for p in parts])
        table[d] = {}
        for attack in ev.attacks:
            adv = None if attack == "none" else torch.cat([p[attack] for p in parts], dim=-1)
            table[d][attack] = cell_metrics(clean, adv, y, params.patch.target if attack != "none" else None)
    metrics = {name: table}
    save_json(metrics, "metrics/evaluate.json")

    rows = [{"model": name, "defense": d, "attack": a, **m} for d, row in table.items() for a, m in row.items()]
    df = pd.DataFrame(rows)
    atomic_write("plots/evaluate.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    figure = _figure(df, name, params)
    atomic_write("plots/evaluate.png", lambda f: f.write(figure))
    log.info("results (%d test images, %d placement(s), %d patch seed(s)):\n%s", len(x), ev.placements, len(seeds),
             df[["defense", "attack", "clean_accuracy", "robust_accuracy", "attack_success_rate"]].to_string(
                 index=False, float_format=lambda v: f"{v:.4f}"))

    section = {"model": params.model.model_dump(), "evaluate": ev.model_dump(), "patch": params.patch.model_dump(),
               "fnc": params.fnc.model_dump(), "seed": params.seed}
    tags = {"profile": params.profile, "model": name, "defenses": ",".join(ev.defenses),
            "attacks": ",".join(ev.attacks),
            "node_ids": ",".join(sorted({r["node_id"] for r in results}))}
    with stage_run("evaluate", params.mlflow.experiment, section, tags):
        log_metrics(table)
        mlflow.log_artifact("plots/evaluate.csv", artifact_path="plots")
        mlflow.log_artifact("plots/evaluate.png", artifact_path="plots")
        if "advp" in ev.attacks:
            for s in seeds:
                mlflow.log_artifact(str(Path("patches") / name / "advp" / f"seed_{s}.png"), artifact_path="patches")


def _figure(df: pd.DataFrame, model: str, params: Params) -> bytes:
    """Grouped bars: accuracy per defense, clean and under each attack, with seed spread."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    defenses = list(dict.fromkeys(df["defense"]))
    attacks = list(dict.fromkeys(df["attack"]))
    width = 0.8 / len(attacks)
    for j, attack in enumerate(attacks):
        sub = df[df["attack"] == attack].set_index("defense").reindex(defenses)
        col = "clean_accuracy" if attack == "none" else "robust_accuracy"
        err = None if attack == "none" else sub.get("robust_accuracy_std")
        xs = [i + (j - (len(attacks) - 1) / 2) * width for i in range(len(defenses))]
        bars = ax.bar(xs, sub[col], width, yerr=err, capsize=3, label="clean" if attack == "none" else attack)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(defenses)), [f"defense: {d}" for d in defenses])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    target = params.patch.target
    ax.set_title(f"{model}: accuracy clean and under a {params.patch.area_fraction:.0%} patch"
                 + (f" (target {target})" if target is not None else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    run_stage("evaluate", main)
