"""Resumable training in a Ray actor, shared by ``train_baseline`` and ``train_defended``.

:func:`train_resumable` runs :class:`pipeline.train.Trainer` one epoch per call in a
Ray actor (``resources.train_num_cpus`` threads, ``train_num_gpus`` GPUs where the
cluster has them) while the stage process, after every epoch, writes a resume
checkpoint (weights, optimiser, schedule, history, MLflow run id) to
``<cache>/last.pt``. The cache folder is keyed by a hash of everything the training
depends on and lies outside the stage's DVC ``outs`` (which ``dvc repro`` deletes
first), so a killed stage continues from its last finished epoch, in the same MLflow
run. A worker that dies mid-epoch is replaced and the epoch redone from the last
checkpoint; epochs are seeded by ``(seed, epoch)``, so the result equals an
uninterrupted run's.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from pipeline.config import ParamsError
from pipeline.distributed import effective_gpus, init_ray, node_id
from pipeline.io import load_torch, save_torch
from pipeline.tracking import log_metrics, stage_run
from pipeline.train import Trainer

log = logging.getLogger(__name__)
MAX_ACTOR_RESTARTS = 2
"""Times a lost training actor is replaced before the stage gives up."""


@ray.remote
class TrainingActor(Trainer):
    """:class:`pipeline.train.Trainer` in a Ray actor: the data stays in the worker,
    the stage process calls ``run_epoch`` and checkpoints between calls."""

    def node_id(self) -> str:
        """The Ray node this actor runs on (an MLflow tag of the run)."""
        return node_id()


def train_resumable(
    stage: str,
    spec: dict[str, Any],
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    cfg: dict[str, Any],
    seed: int,
    resources: Any,
    horizontal_flip: bool,
    cache: Path,
    experiment: str,
    section: dict[str, Any],
    tags: dict[str, str],
    desc: str,
) -> tuple[dict[str, Any], list[dict[str, float]], str]:
    """Train ``spec`` for ``cfg["epochs"]`` epochs, resuming from ``cache/last.pt``.

    Args:
        stage: MLflow run name (``train_baseline``, ``train_defended@<name>``).
        spec: checkpoint dict of the model to train (:mod:`pipeline.checkpoint`;
            ``state_dict`` None for a fresh initialisation, else the starting weights).
        train, test: uint8 images (N, 3, H, W) and int64 labels (N,).
        cfg: a validated ``train`` section as a dict (:class:`pipeline.config.TrainConfig`).
        seed: seeds initialisation, order, augmentation and adversarial starts.
        resources: the ``resources`` section (``train_num_cpus``, ``train_num_gpus``).
        horizontal_flip: flip augmentation (off for traffic signs).
        cache: resume folder (:func:`pipeline.cli.resume_dir`).
        experiment, section, tags: MLflow experiment, logged params and run tags.
        desc: progress-bar label.

    Returns:
        ``(state_dict, history, mlflow_run_id)``: the trained weights (CPU tensors),
        one dict of metrics per epoch (``train_loss``, ``train_accuracy``,
        ``test_accuracy``, ``lr``, ``epoch_seconds``, and ``train_penalty`` /
        ``test_robust_accuracy`` where they apply) and the run to log final results to.

    Raises:
        ray.exceptions.ActorDiedError: the actor died more than ``MAX_ACTOR_RESTARTS`` times.
        ParamsError: training diverged (non-finite loss); the message says which param to change.
    """
    state_path = cache / "last.pt"
    state = load_torch(state_path) if state_path.is_file() else None
    start_epoch = state["epoch"] + 1 if state else 0
    history: list[dict] = state["history"] if state else []
    if state:
        log.info("resuming from epoch %d (%s)", start_epoch, state_path)

    init_ray()
    cpus = resources.train_num_cpus
    data_refs = ray.put(train), ray.put(test)

    def start_actor(trainer_state):
        """A fresh training actor, restored to ``trainer_state`` (None: epoch 0)."""
        new = TrainingActor.options(num_cpus=cpus, num_gpus=effective_gpus(resources.train_num_gpus)).remote(
            spec, *data_refs, cfg, seed, int(cpus), horizontal_flip
        )
        if trainer_state is not None:
            ray.get(new.load_state.remote(trainer_state))
        return new

    actor = start_actor(state["trainer"] if state else None)
    node, precision = ray.get([actor.node_id.remote(), actor.precision.remote()])
    epochs = cfg["epochs"]
    with stage_run(stage, experiment, section, {**tags, "node_id": node, "precision": precision},
                   run_id=state["mlflow_run_id"] if state else None) as run:
        bar = tqdm(range(start_epoch, epochs), initial=start_epoch, total=epochs, desc=desc, unit="epoch",
                   dynamic_ncols=True)
        for epoch in bar:
            t0 = time.perf_counter()
            for attempt in range(MAX_ACTOR_RESTARTS + 1):
                try:
                    m = ray.get(actor.run_epoch.remote(epoch))
                    break
                except ray.exceptions.RayTaskError as exc:  # a bad recipe: one line, not a traceback
                    if isinstance(exc.cause, FloatingPointError):
                        raise ParamsError(f"{stage}: {exc.cause}") from None
                    raise
                except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
                    if attempt == MAX_ACTOR_RESTARTS:
                        raise
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
            extra = "".join(f", {k.replace('_', ' ')} {m[k]:.4f}" for k in ("train_penalty", "test_robust_accuracy")
                            if k in m)
            log.info("epoch %d/%d: loss %.4f, train acc %.4f, test acc %.4f%s (%.0f s)", epoch + 1, epochs,
                     m["train_loss"], m["train_accuracy"], m["test_accuracy"], extra, m["epoch_seconds"])
        state_dict = ray.get(actor.model_state_dict.remote())
        run_id = run.info.run_id
    ray.kill(actor, no_restart=True)
    return state_dict, history, run_id
