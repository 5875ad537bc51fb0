"""DVC stage ``train_defended@<name>``: one defended model of ``defended``.

``fnc`` (the ``fnc`` section): the baseline with feature norm clipping after every
block (``fnc.alpha``), then the adjustment ``fnc.adjustment`` (BatchNorm
re-estimation or classifier fine-tuning). Any other name is a top-level section
(:class:`pipeline.config.DefendedConfig`): start from the baseline or from scratch,
insert ``defenses`` (BlurNet, PRM), train with the ``train`` section plus its overrides
(PGD adversarial training with ``train: {adversarial: {...}}``; resumable, one Ray
actor, per-epoch penalty and held-out robust accuracy in MLflow), insert
``insert_after`` (FNC, input transforms), adjust. Clean accuracy is measured before
insertion, after it and after the adjustment.

Writes ``models/<model>/<name>.pt`` (its ``defenses`` list says how to rebuild it) and
``metrics/train_defended/<name>.json`` and ``plots/train_defended/<name>.csv`` (the
per-epoch curve of its training; the header alone when it is not trained).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from pipeline.checkpoint import build_from_spec, load_checkpoint, model_spec, save_checkpoint
from pipeline.cli import run_stage
from pipeline.config import Params, ParamsError, TrainConfig
from pipeline.data import dataset_name, horizontal_flip, load_meta, load_tensors
from pipeline.defended import build_defended
from pipeline.defenses.base import check_defenses
from pipeline.io import atomic_write, save_json
from pipeline.layout import model_path, prepared_dir
from pipeline.tracking import log_artifact, log_metrics, log_model, stage_run

log = logging.getLogger("train_defended")


def main(params: Params, defense: str) -> None:
    """Build, train where needed, insert and adjust defended model ``defense``; write its checkpoint."""
    cfg = params.defended_config(defense)  # ParamsError when not listed in `defended`
    name = params.model.name
    meta = load_meta(prepared_dir(params.data.dataset))
    baseline = load_checkpoint(model_path(name))
    base = baseline if cfg.init == "baseline" else model_spec(name, len(meta["classes"]), meta["mean"], meta["std"],
                                                               None, kwargs=params.model.kwargs)
    train_cfg = None
    if cfg.train is not None:
        train_cfg = TrainConfig.model_validate({**params.train.model_dump(), **cfg.train})
    flip = horizontal_flip(meta, (train_cfg or params.train).augment)  # the training augmentation's flips
    try:  # every defense must fit the model before any work starts
        check_defenses(lambda: build_from_spec({**base, "state_dict": None, "defenses": []}),
                       cfg.defenses + cfg.insert_after, tuple(meta["image_shape"]))
    except ValueError as exc:
        raise ParamsError(f"{defense}: {exc}") from None

    section = {"model": params.model.model_dump(), defense: params.defended_section(defense), "seed": params.seed}
    if train_cfg is not None:
        section["train"] = train_cfg.model_dump(exclude_none=True)
    tags = {"profile": params.profile, "paper": params.mlflow.paper,
            "model": name, "defense": defense, "dataset": dataset_name(meta)}
    x_train, y_train = load_tensors(prepared_dir(params.data.dataset), "train")
    x_test, y_test = load_tensors(prepared_dir(params.data.dataset), "test")

    (out, result, history, run_id) = build_defended(params, defense, cfg, base, meta, train_cfg,
                                                    ((x_train, y_train), (x_test, y_test)), flip,
                                                    section, tags)
    out_path = model_path(name, defense)
    save_checkpoint(out, out_path)
    metrics = {
        "clean_accuracy": result["clean_accuracy"],
        "clean_accuracy_unadjusted": result["clean_accuracy_unadjusted"],
        "baseline_clean_accuracy": result["baseline_clean_accuracy"],
        "n_images": meta["splits"]["test"]["n_images"],
        "adjustment": cfg.adjustment,
        "seconds": round(result["seconds"] + sum(h["epoch_seconds"] for h in history), 2),
    }
    if history:
        last = history[-1]
        metrics.update(epochs=len(history), train_accuracy=last["train_accuracy"],
                       **{k: last[k] for k in ("train_penalty", "test_robust_accuracy") if k in last})
    df = pd.DataFrame(history, columns=None if history else ["epoch", "train_loss", "train_accuracy",
                                                              "test_accuracy", "lr"])
    atomic_write(Path("plots/train_defended") / f"{defense}.csv", lambda f: f.write(df.to_csv(index=False).encode()))
    save_json(metrics, Path("metrics/train_defended") / f"{defense}.json")
    log.info("%s: clean accuracy %.4f before insertion, %.4f after, %.4f after adjustment (%s)", defense,
             metrics["baseline_clean_accuracy"], metrics["clean_accuracy_unadjusted"], metrics["clean_accuracy"],
             cfg.adjustment)
    with stage_run(f"train_defended@{defense}", params.mlflow.experiment, section,
                   {**tags, "node_id": result["node_id"]}, run_id=run_id):
        per_epoch = {"epochs", "train_accuracy", "train_penalty", "test_robust_accuracy"}  # logged by epoch already
        log_metrics({k: v for k, v in metrics.items() if k not in per_epoch})
        log_artifact(out_path, artifact_path="checkpoints")
        log_model(out_path, tuple(meta["image_shape"]))
        if history:
            log_artifact(Path("plots/train_defended") / f"{defense}.csv", artifact_path="plots")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--defense", required=True, help="a name listed in `defended` (params.yaml)")
    args = parser.parse_args()
    run_stage(f"train_defended@{args.defense}", main, defense=args.defense)
