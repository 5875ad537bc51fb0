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

With ``train.workers`` above 1 the epochs run data-parallel instead: a Ray Train
``TorchTrainer`` with that many workers (each ``train_num_cpus`` CPUs and
``train_num_gpus`` GPUs, DDP), whose rank 0 sends every finished epoch to the stage
process, which logs and checkpoints it the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from tqdm.auto import tqdm

from pipeline.config import ParamsError, TrainConfig
from pipeline.distributed import check_resources, effective_gpus, init_ray, node_id, record_compute
from pipeline.io import load_torch, save_torch
from pipeline.tracking import log_metrics, set_tags, stage_run
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
    cfg: TrainConfig,
    seed: int,
    resources: Any,
    horizontal_flip: bool,
    cache: Path,
    experiment: str,
    section: dict[str, Any],
    tags: dict[str, str],
    desc: str,
) -> tuple[dict[str, Any], list[dict[str, float]], str]:
    """Train ``spec`` for ``cfg.epochs`` epochs, resuming from ``cache/last.pt``.

    With ``cfg.workers`` above 1 the epochs run data-parallel on that many Ray
    Train workers (:class:`_RayTrainEpochs`); else in one training actor
    (:class:`_ActorEpochs`). Either way the stage process logs every epoch and writes
    the resume checkpoint.

    Args:
        stage: MLflow run name (``train_baseline``, ``train_defended@<name>``).
        spec: checkpoint dict of the model to train (:mod:`pipeline.checkpoint`;
            ``state_dict`` None for a fresh initialisation, else the starting weights).
        train, test: uint8 images (N, 3, H, W) and int64 labels (N,).
        cfg: the validated ``train`` section (:class:`pipeline.config.TrainConfig`).
        seed: seeds initialisation, order, augmentation and adversarial starts.
        resources: the ``resources`` section (``train_num_cpus``, ``train_num_gpus``:
            of the actor, or of each data-parallel worker).
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
        ray.exceptions.ActorDiedError, ray.train.TrainingFailedError: the training
            workers died more than ``MAX_ACTOR_RESTARTS`` times.
        ParamsError: training diverged (non-finite loss; the message says which param
            to change).
        pipeline.distributed.ResourceRequestError: (a ``ParamsError``) no node of the
            cluster has ``resources.train_num_cpus`` CPUs and ``train_num_gpus`` GPUs, or
            the cluster cannot hold ``train.workers`` of them at once (checked before
            anything is submitted).
        pipeline.distributed.ClusterError: ``RAY_ADDRESS`` is set and cannot be joined.
    """
    state_path = cache / "last.pt"
    state = load_torch(state_path) if state_path.is_file() else None
    start_epoch = state["epoch"] + 1 if state else 0
    history: list[dict] = state["history"] if state else []
    if state:
        log.info("resuming from epoch %d (%s)", start_epoch, state_path)

    init_ray()
    workers = int(cfg.workers or 1)
    check_resources(resources.train_num_cpus, effective_gpus(resources.train_num_gpus),
                    cpu_param="resources.train_num_cpus", gpu_param="resources.train_num_gpus",
                    count=workers, count_param="train.workers")
    data_refs = ray.put(train), ray.put(test)
    args = (spec, data_refs, cfg, seed, resources, horizontal_flip)
    source = _RayTrainEpochs(*args, workers=workers, storage=cache) if workers > 1 else _ActorEpochs(*args)
    epochs = cfg.epochs
    with stage_run(stage, experiment, section, {**tags, "train_workers": str(workers)},
                   run_id=state["mlflow_run_id"] if state else None) as run:
        bar = tqdm(initial=start_epoch, total=epochs, desc=desc, unit="epoch", dynamic_ncols=True)
        trainer_state = state["trainer"] if state else None
        for epoch, m, epoch_state, (t0, t1) in source.epochs(start_epoch, trainer_state):
            trainer_state = epoch_state
            record_compute(t0, t1)
            m["epoch_seconds"] = t1 - t0
            if epoch == start_epoch:  # where it runs, once the workers have said
                set_tags(source.tags())
            history.append({"epoch": epoch, **m})
            save_torch({"epoch": epoch, "trainer": trainer_state, "history": history,
                        "mlflow_run_id": run.info.run_id}, state_path)
            log_metrics(m, step=epoch)
            bar.update(1)
            bar.set_postfix(loss=f"{m['train_loss']:.3f}", test_acc=f"{m['test_accuracy']:.4f}")
            extra = "".join(f", {k.replace('_', ' ')} {m[k]:.4f}" for k in ("train_penalty", "test_robust_accuracy")
                            if k in m)
            log.info("epoch %d/%d: loss %.4f, train acc %.4f, test acc %.4f%s (%.0f s)", epoch + 1, epochs,
                     m["train_loss"], m["train_accuracy"], m["test_accuracy"], extra, m["epoch_seconds"])
        bar.close()
        state_dict = dict(trainer_state["model"])  # the weights part of the last state (Trainer.state)
        run_id = run.info.run_id
    source.close()
    return state_dict, history, run_id


Epoch = tuple[int, dict[str, float], dict[str, Any], tuple[float, float]]
"""What an epoch source yields: ``(epoch, metrics, trainer state after it, (start, end)
wall-clock times)``."""


class _ActorEpochs:
    """Epochs run by one :class:`TrainingActor`; a lost actor is replaced from the last
    yielded state (the state the stage process checkpointed) and the epoch redone."""

    def __init__(self, spec, data_refs, cfg, seed, resources, horizontal_flip) -> None:
        self.make = lambda: TrainingActor.options(
            num_cpus=resources.train_num_cpus, num_gpus=effective_gpus(resources.train_num_gpus)
        ).remote(spec, *data_refs, cfg, seed, int(resources.train_num_cpus), horizontal_flip)
        self.actor = None
        self.node = self.precision = ""
        self.epochs_total = cfg.epochs

    def _start(self, trainer_state: dict[str, Any] | None) -> None:
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)
        self.actor = self.make()
        if trainer_state is not None:
            ray.get(self.actor.load_state.remote(trainer_state))

    def tags(self) -> dict[str, str]:
        """MLflow tags: the node the actor runs on and its precision."""
        return {"node_id": self.node, "precision": self.precision}

    def epochs(self, start_epoch: int, trainer_state: dict[str, Any] | None) -> Iterator[Epoch]:
        """Run epochs ``start_epoch .. epochs - 1`` from ``trainer_state``."""
        self._start(trainer_state)
        self.node, self.precision = ray.get([self.actor.node_id.remote(), self.actor.precision.remote()])
        for epoch in range(start_epoch, self.epochs_total):
            t0 = time.time()
            for attempt in range(MAX_ACTOR_RESTARTS + 1):
                try:
                    m = ray.get(self.actor.run_epoch.remote(epoch))
                    break
                except ray.exceptions.RayTaskError as exc:  # a bad recipe: one line, not a traceback
                    if isinstance(exc.cause, FloatingPointError):
                        raise ParamsError(f"{exc.cause}") from None
                    raise
                except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
                    if attempt == MAX_ACTOR_RESTARTS:
                        raise
                    log.warning("training actor lost during epoch %d (%s); restarting it from the last checkpoint",
                                epoch + 1, type(exc).__name__)
                    self._start(trainer_state)
            trainer_state = ray.get(self.actor.state.remote())
            yield epoch, m, trainer_state, (t0, time.time())

    def close(self) -> None:
        """Stop the actor."""
        if self.actor is not None:
            ray.kill(self.actor, no_restart=True)


class _RayTrainEpochs:
    """Epochs run data-parallel by a Ray Train ``TorchTrainer`` of ``workers`` workers.

    Every worker runs :func:`_data_parallel_loop` (a :class:`pipeline.train.Trainer`
    with ``shard=(rank, workers)``, DDP over gloo on CPUs or NCCL on GPUs); rank 0
    sends each finished epoch's metrics and state through a Ray queue to the stage
    process, which logs and checkpoints it as for one actor (no storage shared
    between nodes is needed; Ray Train's own checkpointing is not used). A failed
    worker group is started again from the last state received, at most
    ``MAX_ACTOR_RESTARTS`` times.
    """

    def __init__(self, spec, data_refs, cfg, seed, resources, horizontal_flip, *, workers: int, storage: Path):
        cpus, gpus = resources.train_num_cpus, effective_gpus(resources.train_num_gpus)
        self.workers, self.cpus, self.gpus, self.storage = workers, cpus, gpus, storage
        self.config = {"spec": spec, "train": data_refs[0], "test": data_refs[1], "cfg": cfg, "seed": seed,
                       "num_threads": max(1, int(cpus)), "horizontal_flip": horizontal_flip}
        self.epochs_total = cfg.epochs
        self.seen: dict[int, tuple[str, str]] = {}

    def tags(self) -> dict[str, str]:
        """MLflow tags: the nodes of the workers, their precision, the world size."""
        nodes = sorted({node for node, _ in self.seen.values()})
        precision = next(iter(self.seen.values()))[1] if self.seen else ""
        return {"node_id": nodes[0] if len(nodes) == 1 else "", "node_ids": ",".join(nodes), "precision": precision}

    def _fit(self, start_epoch: int, trainer_state: dict[str, Any] | None,
             queue: Any) -> tuple[threading.Thread, dict[str, BaseException]]:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        per_worker = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        trainer = TorchTrainer(
            _data_parallel_loop,
            train_loop_config={**self.config, "start_epoch": start_epoch, "state": trainer_state, "queue": queue},
            scaling_config=ScalingConfig(num_workers=self.workers, use_gpu=self.gpus > 0,
                                         resources_per_worker=per_worker),
            run_config=RunConfig(name=f"train-from-epoch-{start_epoch}", storage_path=str(self.storage.resolve()),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        outcome: dict[str, BaseException] = {}

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the stage's thread
                outcome["error"] = exc

        thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
        thread.start()
        return thread, outcome

    def epochs(self, start_epoch: int, trainer_state: dict[str, Any] | None) -> Iterator[Epoch]:
        """Run epochs ``start_epoch .. epochs - 1`` from ``trainer_state``."""
        from ray.util.queue import Empty, Queue

        for attempt in range(MAX_ACTOR_RESTARTS + 1):
            if start_epoch >= self.epochs_total:
                return
            queue = Queue(actor_options={"num_cpus": 0})
            thread, outcome = self._fit(start_epoch, trainer_state, queue)
            while True:
                try:
                    item = queue.get(timeout=1.0)
                except Empty:
                    if thread.is_alive():
                        continue
                    break  # every put happened before fit() returned: the queue is drained
                if item[0] == "worker":
                    _, rank, node, precision = item
                    self.seen[rank] = (node, precision)
                else:
                    _, epoch, m, trainer_state, t0, t1 = item
                    start_epoch = epoch + 1
                    yield epoch, m, trainer_state, (t0, t1)
            thread.join()
            ray.kill(queue.actor, no_restart=True)
            error = outcome.get("error")
            if error is None:
                return
            diverged = _find_cause(error, FloatingPointError)
            if diverged is not None:
                raise ParamsError(str(diverged)) from None
            if attempt == MAX_ACTOR_RESTARTS:
                raise error
            log.warning("data-parallel training failed during epoch %d (%s); restarting the workers from the last "
                        "checkpoint", start_epoch + 1, type(error).__name__)

    def close(self) -> None:
        """Nothing to stop: the Ray Train workers end with ``fit``."""


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``, its causes, Ray's wrapped causes and
    Ray Train's per-worker failures; None if there is none."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None),
                 *getattr(e, "worker_failures", {}).values()]
    return None


def _data_parallel_loop(config: dict[str, Any]) -> None:
    """The loop every Ray Train worker runs: a sharded :class:`pipeline.train.Trainer`
    (``shard=(world rank, world size)``) from ``config["state"]``, epochs
    ``config["start_epoch"]`` to the last; rank 0 puts ``("epoch", epoch, metrics,
    state, start, end)`` on ``config["queue"]`` after each, every rank
    ``("worker", rank, node id, precision)`` once."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train, test = ray.get(config["train"]), ray.get(config["test"])
    trainer = Trainer(config["spec"], train, test, config["cfg"], config["seed"], config["num_threads"],
                      config["horizontal_flip"], shard=(rank, world))
    if config["state"] is not None:
        trainer.load_state(config["state"])
    queue = config["queue"]
    queue.put(("worker", rank, node_id(), trainer.precision()))
    for epoch in range(config["start_epoch"], config["cfg"].epochs):
        t0 = time.time()
        m = trainer.run_epoch(epoch)
        if rank == 0:
            queue.put(("epoch", epoch, m, trainer.state(), t0, time.time()))
