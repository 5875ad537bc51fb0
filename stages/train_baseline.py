"""DVC stage ``train_baseline``: train the undefended model (or adopt the user's checkpoint).

Writes ``models/<model>/baseline.pt``, ``metrics/train_baseline.json`` and the
per-epoch curve ``plots/train_baseline.csv``. Training runs in one Ray actor
with ``resources.train_num_cpus`` threads; after every epoch the stage process
saves a resume checkpoint under ``.cache/train_baseline/<hash of params>/``, so
a killed run continues from its last epoch and resumes the same MLflow run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
import pandas as pd
import ray
from tqdm.auto import tqdm

from pipeline.checkpoint import model_spec, save_checkpoint
from pipeline.cli import resume_dir, run_stage
from pipeline.config import Params, ParamsError
from pipeline.data import load_meta, load_tensors
from pipeline.data.datasets import DATASETS
from pipeline.distributed import effective_gpus, init_ray, node_id
from pipeline.io import atomic_write, load_torch, save_json, save_torch
from pipeline.models import build_model
from pipeline.tracking import log_metrics, stage_run
from pipeline.train import Trainer, accuracy

log = logging.getLogger("train_baseline")
PREPARED = Path("data/prepared")
MAX_ACTOR_RESTARTS = 2


@ray.remote
class TrainingActor(Trainer):
    """:class:`pipeline.train.Trainer` in a Ray actor: the data stays in the worker,
    this process calls ``run_epoch`` and checkpoints between calls."""

    def node_id(self) -> str:
        """The Ray node this actor runs on (an MLflow tag of the run)."""
        return node_id()


def main(params: Params) -> None:
    """Train (resuming if a checkpoint exists) or adopt ``model.checkpoint``; write baseline.pt."""
    meta = load_meta(PREPARED / params.data.dataset)
    x_train, y_train = load_tensors(PREPARED / params.data.dataset, "train")
    x_test, y_test = load_tensors(PREPARED / params.data.dataset, "test")
    name = params.model.name
    spec = model_spec(name, len(meta["classes"]), meta["mean"], meta["std"], None)
    out_path = Path("models") / name / "baseline.pt"
    # exclude_none: options added later (train.adversarial) leave the resume key of runs without them unchanged
    section = {"model": params.model.model_dump(), "train": params.train.model_dump(exclude_none=True),
               "seed": params.seed}
    tags = {"profile": params.profile, "model": name, "defense": "none", "dataset": meta["dataset"]}

    if params.model.checkpoint:  # the user's own weights: evaluate and adopt, no training
        try:
            model = build_model(name, spec["num_classes"], spec["mean"], spec["std"], weights=params.model.checkpoint)
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
    cache = resume_dir("train_baseline", key)
    state_path = cache / "last.pt"
    state = load_torch(state_path) if state_path.is_file() else None
    start_epoch = state["epoch"] + 1 if state else 0
    history: list[dict] = state["history"] if state else []
    if state:
        log.info("resuming from epoch %d (%s)", start_epoch, state_path)

    init_ray()
    cpus = params.resources.train_num_cpus
    data_refs = ray.put((x_train, y_train)), ray.put((x_test, y_test))

    def start_actor(trainer_state):
        """A fresh training actor, restored to ``trainer_state`` (None: epoch 0)."""
        new = TrainingActor.options(num_cpus=cpus, num_gpus=effective_gpus(params.resources.train_num_gpus)).remote(
            spec, *data_refs, params.train.model_dump(), params.seed, int(cpus),
            DATASETS[meta["dataset"]].horizontal_flip,
        )
        if trainer_state is not None:
            ray.get(new.load_state.remote(trainer_state))
        return new

    actor = start_actor(state["trainer"] if state else None)
    node = ray.get(actor.node_id.remote())

    with stage_run("train_baseline", params.mlflow.experiment, section, {**tags, "node_id": node},
                   run_id=state["mlflow_run_id"] if state else None) as run:
        bar = tqdm(range(start_epoch, params.train.epochs), initial=start_epoch, total=params.train.epochs,
                   desc=f"train {name}", unit="epoch", dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            for attempt in range(MAX_ACTOR_RESTARTS + 1):
                try:
                    m = ray.get(actor.run_epoch.remote(epoch))
                    break
                except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
                    if attempt == MAX_ACTOR_RESTARTS:
                        raise
                    # the worker died: restart from the last finished epoch; epochs are seeded by
                    # (seed, epoch), so the retried epoch gives what an uninterrupted run would have
                    log.warning("training actor lost during epoch %d (%s); restarting it from the last checkpoint",
                                epoch + 1, type(exc).__name__)
                    ray.kill(actor, no_restart=True)
                    last = load_torch(state_path)["trainer"] if state_path.is_file() else None
                    actor = start_actor(last)
            m["epoch_seconds"] = time.perf_counter() - t0
            history.append({"epoch": epoch, **m})
            save_torch({"epoch": epoch, "trainer": ray.get(actor.state.remote()), "history": history,
                        "mlflow_run_id": run.info.run_id}, state_path)
            log_metrics(m, step=epoch)
            bar.set_postfix(loss=f"{m['train_loss']:.3f}", test_acc=f"{m['test_accuracy']:.4f}")
            log.info("epoch %d/%d: loss %.4f, train acc %.4f, test acc %.4f (%.0f s)", epoch + 1,
                     params.train.epochs, m["train_loss"], m["train_accuracy"], m["test_accuracy"], m["epoch_seconds"])
        spec["state_dict"] = ray.get(actor.model_state_dict.remote())
        save_checkpoint(spec, out_path)
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
        mlflow.log_artifact(str(out_path), artifact_path="checkpoints")
        mlflow.log_artifact("plots/train_baseline.csv", artifact_path="plots")
    log.info("baseline %s: clean accuracy %.4f", name, metrics["clean_accuracy"])


if __name__ == "__main__":
    run_stage("train_baseline", main)
