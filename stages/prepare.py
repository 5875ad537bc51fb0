"""DVC stage ``prepare``: decode the dataset once into uint8 tensors + meta.json.

Writes ``data/prepared/<dataset>/{train.pt,val.pt,test.pt,meta.json}`` (validation:
``data.val_per_class`` training images a class held out) (or lazy
indexes for sets too large to decode) and ``metrics/prepare.json``.
"""

from __future__ import annotations

import logging
import time

from pipeline.cli import key_hash, run_stage
from pipeline.config import Params
from pipeline.data import dataset_name
from pipeline.data.prepare import prepare_dataset, resolve_source
from pipeline.distributed import init_ray, ray_map
from pipeline.io import save_json
from pipeline.layout import prepared_dir
from pipeline.tracking import log_dataset, log_dict, log_metrics, stage_run

log = logging.getLogger("prepare")


def main(params: Params) -> None:
    """Check ``data.root``, then decode the dataset with Ray tasks into ``data/prepared/<dataset>``."""
    cfg = params.data
    source = resolve_source(cfg)  # fail on a bad data.root before starting Ray; its layout, detected once
    out_dir = prepared_dir(cfg.dataset)
    start = time.perf_counter()
    init_ray()
    meta = prepare_dataset(
        cfg,
        out_dir,
        seed=params.seed,
        mapper=lambda fn, items: ray_map(fn, items, num_cpus=1, desc="decode shards"),
        source=source,
    )
    seconds = time.perf_counter() - start
    summary = {
        "n_train": meta["splits"]["train"]["n_images"],
        "n_val": meta["splits"]["val"]["n_images"],
        "n_test": meta["splits"]["test"]["n_images"],
        "seconds": round(seconds, 2),
    }
    save_json(summary, "metrics/prepare.json")
    log.info("prepared %s: %d train, %d validation, %d test images (%s) in %.1f s", cfg.dataset,
             summary["n_train"], summary["n_val"], summary["n_test"], meta["mode"], seconds)
    with stage_run("prepare", params.mlflow.experiment, {"data": cfg.model_dump(mode="json"), "seed": params.seed},
                   tags={"profile": params.profile, "paper": params.mlflow.paper, "dataset": dataset_name(meta)}):
        log_metrics(summary)
        log_dict(meta, "meta.json")
        for split, context in (("train", "train"), ("val", "validation"), ("test", "test")):
            info = meta["splits"][split]
            log_dataset(f"{dataset_name(meta)} {split}", out_dir, key_hash({"split": split, "meta": meta}), context,
                        {"n_images": info["n_images"]})


if __name__ == "__main__":
    run_stage("prepare", main)
