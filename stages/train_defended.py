"""DVC stage ``train_defended@<defense>``: the baseline with a defense inserted and adjusted.

For ``fnc``: feature norm clipping after every block (``fnc.alpha``), then the
adjustment ``fnc.adjustment`` (BatchNorm re-estimation or classifier
fine-tuning). Clean accuracy is measured before and after the adjustment.
Writes ``models/<model>/<defense>.pt`` and ``metrics/train_defended/<defense>.json``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import mlflow
import ray

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.cli import run_stage
from pipeline.config import Params, ParamsError
from pipeline.data import load_meta, load_tensors
from pipeline.distributed import init_ray, ray_map
from pipeline.io import save_json
from pipeline.tasks import defend_task
from pipeline.tracking import log_metrics, stage_run

log = logging.getLogger("train_defended")
PREPARED = Path("data/prepared")
TRAINABLE = ("fnc",)


def main(params: Params, defense: str) -> None:
    """Insert ``defense`` into the baseline, adjust it, write ``models/<model>/<defense>.pt``."""
    if defense not in TRAINABLE:
        raise ParamsError(f"train_defended: unknown defense {defense!r}; choose from {', '.join(TRAINABLE)}")
    name = params.model.name
    spec = load_checkpoint(Path("models") / name / "baseline.pt")
    meta = load_meta(PREPARED / params.data.dataset)
    fnc = params.fnc
    init_ray()
    item = {
        "spec": spec,
        "defenses": [{"name": "fnc", "alpha": fnc.alpha, "eps": fnc.eps}],
        "adjustment": fnc.adjustment,
        "adjust_batches": fnc.adjust_batches,
        "finetune_epochs": fnc.finetune_epochs,
        "finetune_lr": fnc.finetune_lr,
        "batch_size": fnc.batch_size,
        "seed": params.seed,
        "train": ray.put(load_tensors(PREPARED / params.data.dataset, "train")),
        "test": ray.put(load_tensors(PREPARED / params.data.dataset, "test")),
        "num_threads": params.resources.train_num_cpus,
    }
    (result,) = ray_map(defend_task, [item], num_cpus=params.resources.train_num_cpus,
                        num_gpus=params.resources.train_num_gpus, desc=f"{defense}: insert + adjust")
    out = {**spec, "state_dict": result.pop("state_dict"), "defenses": item["defenses"]}
    out_path = Path("models") / name / f"{defense}.pt"
    save_checkpoint(out, out_path)
    metrics = {
        "clean_accuracy": result["clean_accuracy"],
        "clean_accuracy_unadjusted": result["clean_accuracy_unadjusted"],
        "baseline_clean_accuracy": result["baseline_clean_accuracy"],
        "n_images": meta["splits"]["test"]["n_images"],
        "adjustment": fnc.adjustment,
        "seconds": round(result["seconds"], 2),
    }
    save_json(metrics, Path("metrics/train_defended") / f"{defense}.json")
    log.info("%s (alpha %.2f): clean accuracy %.4f unadjusted, %.4f after %s (baseline %.4f)", defense, fnc.alpha,
             metrics["clean_accuracy_unadjusted"], metrics["clean_accuracy"], fnc.adjustment,
             metrics["baseline_clean_accuracy"])
    section = {"model": params.model.model_dump(), "fnc": fnc.model_dump(), "seed": params.seed}
    tags = {"profile": params.profile, "model": name, "defense": defense, "node_id": result["node_id"]}
    with stage_run(f"train_defended@{defense}", params.mlflow.experiment, section, tags):
        log_metrics(metrics)
        mlflow.log_artifact(str(out_path), artifact_path="checkpoints")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", required=True, help=f"one of: {', '.join(TRAINABLE)}")
    args = parser.parse_args()
    run_stage(f"train_defended@{args.defense}", main, defense=args.defense)
