"""DVC stage ``train_baseline``: train the undefended model (or adopt the user's checkpoint).

Writes ``models/<model>/baseline.pt``, ``metrics/train_baseline.json`` and the
per-epoch curve ``plots/train_baseline.csv``. Training runs in one Ray actor
with ``resources.train_num_cpus`` threads; after every epoch the stage process
saves a resume checkpoint under ``.cache/train_baseline/<hash of params>/``, so
a killed run continues from its last epoch and resumes the same MLflow run.
"""

from __future__ import annotations

import logging

import pandas as pd

from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.cli import resume_dir, run_stage
from pipeline.config import Params, ParamsError
from pipeline.data import dataset_name, horizontal_flip, load_meta, load_tensors
from pipeline.io import atomic_write, save_json
from pipeline.layout import model_path, prepared_dir
from pipeline.models import build_model
from pipeline.models.weights import TORCHVISION_PREFIX, torchvision_weights_file
from pipeline.tracking import log_artifact, log_metrics, log_model, stage_run
from pipeline.train import accuracy
from pipeline.training_run import train_resumable

log = logging.getLogger("train_baseline")


def main(params: Params) -> None:
    """Train (resuming if a checkpoint exists) or adopt ``model.checkpoint``; write baseline.pt."""
    meta = load_meta(prepared_dir(params.data.dataset))
    x_train, y_train = load_tensors(prepared_dir(params.data.dataset), "train")
    x_test, y_test = load_tensors(prepared_dir(params.data.dataset), "test")
    name = params.model.name
    spec = model_spec(name, len(meta["classes"]), meta["mean"], meta["std"], None, kwargs=params.model.kwargs)
    out_path = model_path(name)
    # exclude_none: options added later (train.adversarial) leave the resume key of runs without them unchanged
    section = {"model": params.model.model_dump(), "train": params.train.model_dump(exclude_none=True),
               "seed": params.seed}
    tags = {"profile": params.profile, "paper": params.mlflow.paper,
            "model": name, "defense": "none", "dataset": dataset_name(meta)}

    if params.model.checkpoint:  # the user's own weights: evaluate and adopt, no training
        try:
            weights = params.model.checkpoint
            if weights.startswith(TORCHVISION_PREFIX):  # torchvision's published weights, downloaded once
                weights = torchvision_weights_file(name, weights.removeprefix(TORCHVISION_PREFIX))
            model = build_model(name, spec["num_classes"], spec["mean"], spec["std"], weights=weights,
                                kwargs=params.model.kwargs)
        except ValueError as exc:
            raise ParamsError(f"model.checkpoint: {exc}") from None
        spec["state_dict"] = model.state_dict()
        acc = accuracy(model, x_test, y_test, params.train.eval_batch_size)
        save_checkpoint(spec, out_path)
        metrics = {"clean_accuracy": acc, "n_images": len(y_test), "epochs": 0, "source": params.model.checkpoint}
        save_json(metrics, "metrics/train_baseline.json")
        atomic_write("plots/train_baseline.csv", lambda f: f.write(b"epoch,train_loss,train_accuracy,test_accuracy,lr\n"))
        with stage_run("train_baseline", params.mlflow.experiment, section, tags):
            log_metrics({"clean_accuracy": acc})
        return

    key = {**section, "data": meta["source"]["sha256"], "subset": meta["subset"], "splits": meta["splits"]}
    state_dict, history, run_id = train_resumable(
        "train_baseline", spec, (x_train, y_train), (x_test, y_test), params.train, params.seed,
        params.resources, horizontal_flip(meta, params.train.augment), resume_dir("train_baseline", key),
        params.mlflow.experiment, section, tags, desc=f"train {name}")
    spec["state_dict"] = state_dict
    save_checkpoint(spec, out_path)
    with stage_run("train_baseline", params.mlflow.experiment, section, tags, run_id=run_id):
        final = history[-1]
        metrics = {
            "clean_accuracy": final["test_accuracy"],
            "train_accuracy": final["train_accuracy"],
            "train_loss": final["train_loss"],
            "n_images": int(len(y_test)),
            "epochs": params.train.epochs,
            "train_seconds": round(sum(h["epoch_seconds"] for h in history), 1),
        }
        save_json(metrics, "metrics/train_baseline.json")
        csv = pd.DataFrame(history)[["epoch", "train_loss", "train_accuracy", "test_accuracy", "lr"]]
        atomic_write("plots/train_baseline.csv", lambda f: f.write(csv.to_csv(index=False).encode()))
        log_metrics({"clean_accuracy": metrics["clean_accuracy"], "train_seconds": metrics["train_seconds"]})
        log_artifact(out_path, artifact_path="checkpoints")
        log_artifact("plots/train_baseline.csv", artifact_path="plots")
        log_model(out_path, tuple(meta["image_shape"]))
    log.info("baseline %s: clean accuracy %.4f", name, metrics["clean_accuracy"])


if __name__ == "__main__":
    run_stage("train_baseline", main)
