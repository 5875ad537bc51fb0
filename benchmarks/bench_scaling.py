"""Scaling of independent Ray tasks: the same 8 patch tasks on 1 and 2 workers.

Run on demand (not a test):

    python benchmarks/bench_scaling.py [--tasks 8] [--images 2000] [--workers 1 2] > scaling.json

Starts a private local Ray instance (127.0.0.1, its own temp dir) with ``W`` CPUs
for each ``W`` of ``--workers``, and runs ``--tasks`` independent universal-patch
optimisations (:func:`pipeline.tasks.patch_task`, the generate_patches stage's
task: one epoch over ``--images`` random CIFAR-size images, batch 80, ResNet-20)
through :func:`pipeline.distributed.ray_map` with one CPU and one torch thread
each. Every setting runs the task set twice: ``cold`` includes starting Ray's
worker processes (as a stage does), ``warm`` reuses them. With a GPU
(``--gpu-fractions 1 0.25``) the tasks run on the GPU, each asking for that
fraction of it (1: one task at a time; 0.25: four share it).

Prints the wall times and the speed-ups over the first setting as JSON on stdout.
Target (README, Benchmarks): 2 workers at least 1.7x faster than 1 on this
machine's 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import ray
import torch
from timing import emit, machine, say

from pipeline.attacks.patch import PatchTrainingConfig
from pipeline.checkpoint import model_spec
from pipeline.data import DATASETS
from pipeline.distributed import init_ray, ray_map
from pipeline.models import build_model
from pipeline.tasks import patch_task


def run_set(num_cpus: int, num_gpus: float, make_items: Callable[[], list[dict]]) -> dict[str, float]:
    """Cold and warm wall seconds of the task set on a fresh local Ray instance with
    ``num_cpus`` CPUs (``make_items`` runs once Ray is up: the items' shared data goes
    into that instance's object store)."""
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        os.environ["RAY_TMPDIR"] = tmp
        init_ray(num_cpus=num_cpus)
        try:
            items = make_items()
            out = {}
            for label in ("cold", "warm"):
                start = time.perf_counter()
                results = ray_map(patch_task, items, num_cpus=1, num_gpus=num_gpus, desc=f"{label}, {num_cpus} CPUs")
                out[f"{label}_seconds"] = round(time.perf_counter() - start, 2)
            out["task_seconds_mean"] = round(sum(r["seconds"] for r in results) / len(results), 2)
            return out
        finally:
            ray.shutdown()


def main() -> None:
    """Parse the arguments, run the task set per setting, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpu-fractions", type=float, nargs="+", default=None,
                        help="GPU per task for each setting (needs a GPU); CPUs stay at --workers[-1]")
    args = parser.parse_args()
    info = DATASETS["cifar10"]
    model = build_model("resnet20", 10, info.mean, info.std)
    spec = model_spec("resnet20", 10, info.mean, info.std, model.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 5, (args.images,), generator=gen)
    cfg = PatchTrainingConfig(side=10, target=5, epochs=1, batch_size=80)

    settings: list[tuple[str, int, float]]
    if args.gpu_fractions:
        settings = [(f"gpu_fraction_{f:g}", args.workers[-1], f) for f in args.gpu_fractions]
    else:
        settings = [(f"workers_{w}", w, 0.0) for w in args.workers]
    result: dict = {"benchmark": "scaling", "tasks": args.tasks, "images_per_task": args.images,
                    "task": "patch_task, 1 epoch, batch 80, ResNet-20, 1 torch thread", "machine": machine(),
                    "settings": {}}
    def make_items() -> list[dict]:
        data = ray.put((x, y))
        return [{"spec": spec, "data": data, "cfg": cfg, "seed": s, "num_threads": 1} for s in range(args.tasks)]

    for label, cpus, gpus in settings:
        result["settings"][label] = run_set(cpus, gpus, make_items)
        say(f"{label}: {result['settings'][label]}")
    first = next(iter(result["settings"].values()))
    for r in result["settings"].values():
        for k in ("cold", "warm"):
            r[f"{k}_speedup"] = round(first[f"{k}_seconds"] / r[f"{k}_seconds"], 2)
    emit(result)


if __name__ == "__main__":
    main()
