"""Ray plumbing shared by every stage: start or join a cluster, fan tasks out.

A stage calls :func:`init_ray` once, then :func:`ray_map` for each batch of
independent tasks. ``RAY_ADDRESS`` (an existing cluster, ``auto``, or a
``ray://`` client address) is honoured; without it a local Ray instance is
started with all CPU cores of this machine and stopped when the stage exits.
Tasks return their results through Ray's object store, and only the stage
process (the driver) writes files or logs to MLflow.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

COMPUTE_INTERVALS: list[tuple[float, float]] = []
"""``(start, end)`` wall-clock times (``time.time()``, seconds) of the work this
stage process ran on Ray: each task of :func:`ray_map` as measured inside the task,
and each training epoch (:func:`record_compute`). Read by
:func:`pipeline.cli.run_stage` for the stage's overhead figures."""


def record_compute(start: float, end: float) -> None:
    """Add one interval of remote computation (``time.time()`` seconds) to :data:`COMPUTE_INTERVALS`."""
    COMPUTE_INTERVALS.append((start, end))


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` (seconds during which at least one ran)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _timed_call(fn: Callable[[Any], R], item: Any) -> tuple[R, float, float]:
    """``fn(item)`` with the wall-clock interval it took inside the worker."""
    start = time.time()
    result = fn(item)
    return result, start, time.time()


def init_ray(num_cpus: int | None = None) -> dict[str, float]:
    """Connect to ``RAY_ADDRESS`` if set, else start a local Ray instance.

    The local instance binds to 127.0.0.1 (:func:`_loopback_only`), has the dashboard UI off, and keeps its
    session files under ``RAY_TMPDIR`` when that is set. Calling it twice is
    harmless.

    Args:
        num_cpus: CPUs of a local instance (default: all cores of this machine);
            ignored when joining a cluster.

    Returns:
        The cluster's total resources (``{"CPU": 2.0, ...}``).
    """
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            kwargs: dict[str, Any] = {}
            _loopback_only()
            if os.environ.get("RAY_TMPDIR"):
                kwargs["_temp_dir"] = os.environ["RAY_TMPDIR"]
            ray.init(
                num_cpus=num_cpus or os.cpu_count(),
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=True,
                logging_level=logging.WARNING,
                **kwargs,
            )
    return dict(ray.cluster_resources())


def _loopback_only() -> None:
    """Keep a local, single-machine Ray instance on 127.0.0.1.

    Ray resolves ``_node_ip_address="127.0.0.1"`` to the machine's reachable address
    unless its cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when
    ``ray`` is imported); the stage may have imported ``ray`` before this module, so the
    constant is also set here. A cluster (``RAY_ADDRESS``) is not affected.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # a Ray without the switch: its own default
        log.warning("this Ray version has no loopback switch; the local instance may bind to the machine's address")


def effective_gpus(requested: float) -> float:
    """``requested`` GPUs per task, or 0 with a warning when the cluster has none."""
    if requested <= 0:
        return 0.0
    available = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    if available <= 0:
        warnings.warn(
            f"num_gpus={requested} requested but the Ray cluster has no GPU; running on CPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0.0
    return requested


def ray_map(
    fn: Callable[..., R],
    items: Sequence[Any],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    desc: str = "tasks",
    max_retries: int = 3,
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """Run ``fn(item)`` for every item as a Ray task; results in input order.

    Args:
        fn: a picklable, module-level function; each call must be independent.
        items: the arguments, one task each (put large shared inputs in the
            object store with ``ray.put`` and pass the references inside items:
            Ray resolves top-level ``ObjectRef`` arguments only).
        num_cpus, num_gpus: resources of each task (GPUs fall back to 0 on a
            cluster without one).
        desc: label of the progress bar.
        max_retries: retries of a task whose worker died.
        on_result: called in the driver as ``on_result(i, fn(items[i]))`` as soon as
            task ``i`` has finished, in the order tasks finish, before the next wait:
            a stage persists each result there (its resume cache), so a stage killed
            mid-phase reruns only the tasks that had not finished.

    Returns:
        ``[fn(item) for item in items]``, computed in parallel.

    Raises:
        Whatever ``fn`` raised, re-raised in the driver (as ``ray.exceptions.RayTaskError``),
        and whatever ``on_result`` raised (the results not yet passed to it are then lost).
    """
    init_ray()
    remote = ray.remote(_timed_call).options(
        num_cpus=num_cpus, num_gpus=effective_gpus(num_gpus), max_retries=max_retries,
        name=getattr(fn, "__name__", "task"),
    )
    refs = [remote.remote(fn, item) for item in items]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", dynamic_ncols=True) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                results[i], start, end = ray.get(ref)
                record_compute(start, end)
                bar.update(1)
                if on_result is not None:
                    on_result(i, results[i])
    return results


def node_id() -> str:
    """The Ray node the caller runs on ("local" outside a Ray worker).

    Never starts Ray: ``ray.get_runtime_context()`` would start a local instance
    when called in a process that is not connected.
    """
    if not ray.is_initialized():
        return "local"
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected to Ray
        return "local"


def torch_threads(num_cpus: float) -> int:
    """Set torch's intra-op threads to the CPUs a task was given (at least 1)."""
    import torch

    n = max(1, int(num_cpus))
    torch.set_num_threads(n)
    return n
