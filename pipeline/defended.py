"""A defended model of ``defended``, built (the stage ``train_defended@<name>``).

From the baseline (or from scratch), insert the defenses trained with the network
(``defenses``: BlurNet, PRM), train where the section has ``train`` (resumable, one Ray
actor: :func:`pipeline.training_run.train_resumable`), then insert ``insert_after`` (FNC,
input transforms) and adjust (BatchNorm recalibration or classifier fine-tuning) in one Ray
task (:func:`pipeline.tasks.defend_task`), which also measures clean accuracy before
insertion, after it and after the adjustment.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.cached import shared
from pipeline.checkpoint import apply_defenses, build_from_spec
from pipeline.cli import resume_dir
from pipeline.config import DefendedConfig, Params, TrainConfig
from pipeline.distributed import init_ray, ray_map
from pipeline.io import sha256_file
from pipeline.layout import model_path
from pipeline.tasks import defend_task
from pipeline.training_run import train_resumable


def build_defended(params: Params, defense: str, cfg: DefendedConfig, base: dict[str, Any], meta: dict[str, Any],
                   train_cfg: TrainConfig | None, data: tuple[tuple[torch.Tensor, torch.Tensor], ...],
                   horizontal_flip: bool, section: dict[str, Any], tags: dict[str, str],
                   ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], str | None]:
    """Defended model ``defense`` from ``base`` (a checkpoint dict; ``state_dict`` None to train from scratch).

    Args:
        cfg: the model's section; train_cfg: its ``train`` merged over the profile's, None when not trained.
        meta: the prepared dataset's meta; data: ``((x_train, y_train), (x_test, y_test))``, uint8 images.
        horizontal_flip: whether the training augmentation flips (the dataset's).
        section, tags: the MLflow params and tags of the training run.

    Returns:
        ``(checkpoint dict, task result, per-epoch history, MLflow run id of the training or None)``;
        the checkpoint's ``defenses`` list is ``cfg.defenses + cfg.insert_after``; the result has
        ``clean_accuracy``, ``clean_accuracy_unadjusted``, ``baseline_clean_accuracy``, ``seconds``, ``node_id``.
    """
    (x_train, y_train), (x_test, y_test) = data
    spec = {**base, "defenses": list(cfg.defenses)}
    history, run_id = [], None
    if cfg.defenses:  # defenses trained with the network: fresh defense weights, the base weights kept
        torch.manual_seed(params.seed)
        model = apply_defenses(build_from_spec({**base, "defenses": []}), cfg.defenses)
        spec["state_dict"] = None if base["state_dict"] is None else {
            k: v.detach().cpu() for k, v in model.state_dict().items()}
    if train_cfg is not None:
        key = {**section, "init": cfg.init, "defenses": cfg.defenses, "data": meta["source"]["sha256"],
               "subset": meta["subset"], "splits": meta["splits"],
               "base": None if cfg.init == "scratch" else sha256_file(model_path(params.model.name))}
        state_dict, history, run_id = train_resumable(
            f"train_defended@{defense}", spec, (x_train, y_train), (x_test, y_test), train_cfg,
            params.seed, params.resources, horizontal_flip,
            resume_dir(f"train_defended/{defense}", key), params.mlflow.experiment, section, tags,
            desc=f"train {defense}")
        spec["state_dict"] = state_dict

    init_ray()
    item = {
        "spec": spec,
        "defenses": list(cfg.insert_after),
        "adjustment": cfg.adjustment,
        "adjust_batches": cfg.adjust_batches,
        "finetune_epochs": cfg.finetune_epochs,
        "finetune_lr": cfg.finetune_lr,
        "batch_size": cfg.batch_size,
        "seed": params.seed,
        "horizontal_flip": horizontal_flip,
        "train": shared((x_train, y_train)),
        "test": shared((x_test, y_test)),
        "num_threads": params.resources.train_num_cpus,
    }
    (result,) = ray_map(defend_task, [item], num_cpus=params.resources.train_num_cpus,
                        num_gpus=params.resources.train_num_gpus, desc=f"{defense}: insert + adjust",
                        resource_params=("resources.train_num_cpus", "resources.train_num_gpus"))
    out = {**spec, "state_dict": result.pop("state_dict"), "defenses": list(cfg.defenses) + list(cfg.insert_after)}
    return out, result, history, run_id
