"""Cached, resumable fan-out: "cache key -> run the missing jobs on Ray -> save atomically".

Every stage that computes many independent results (patches per seed, evaluation cells per
shard, adaptive starts, RP2 stickers) does the same four things, here once:

1. for every job key, look for its result file (a ``.cache/<stage>/<hash>/`` path of
   :func:`pipeline.cli.resume_dir`, keyed by everything the result depends on);
2. run the jobs without one as Ray tasks (:func:`pipeline.distributed.ray_map`, with its
   progress bar), building their inputs only then (so nothing is ``ray.put`` when all is cached);
3. save each result atomically as soon as its task finishes, so a killed stage redoes only
   the tasks that had not finished;
4. return every result, cached or new, by key.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ray

from pipeline.distributed import init_ray, ray_map
from pipeline.io import load_torch, save_torch

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("pipeline.cached")


def shared(obj: Any) -> Any:
    """``ray.put(obj)`` when Ray is up (:func:`cached_map` starts it before it builds any task
    input), else ``obj`` itself (an in-process map): for inputs many tasks read, sent once."""
    return ray.put(obj) if ray.is_initialized() else obj


def shared_once(make: Callable[[], Any]) -> Callable[[], Any]:
    """A function returning ``shared(make())``, computed at its first call and the same reference
    after: for an input that many items of a :func:`cached_map` read (the training images), put
    in Ray's object store once, and only when some job is missing (a fully cached map puts nothing)."""
    return functools.cache(lambda: shared(make()))


def cached_map(
    fn: Callable[[Any], Any],
    keys: Sequence[K],
    cache_file: Callable[[K], Path],
    *,
    item: Callable[[K], Any] | None = None,
    group: Callable[[list[K]], list[tuple[Any, list[K]]]] | None = None,
    split: Callable[[K, Any], Any] | None = None,
    desc: str,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    resource_params: tuple[str, str] = ("resources.num_cpus", "resources.num_gpus"),
) -> dict[K, Any]:
    """The result of every job in ``keys``: read from its cache file, else computed by ``fn`` on Ray.

    Args:
        fn: the Ray task (a module-level function of :mod:`pipeline.tasks`), called as ``fn(item)``.
        keys: the jobs, hashable and distinct (e.g. ``(attack, seed)``).
        cache_file: the file a job's result is saved to and read from (torch's format,
            :func:`pipeline.io.save_torch`); two keys may share a file, which then is computed once.
        item: one task per missing key, its input ``item(key)`` (a dict of tensors and
            settings; large shared inputs as ``ray.put`` references made inside ``item``).
        group: instead of ``item``, several keys per task: ``group(missing keys)`` returns
            ``[(task input, the keys it computes), ...]`` covering every missing key.
        split: the part of a task's result that is ``key``'s, ``split(key, result)``;
            default: the whole result (one key per task).
        desc: label of the progress bar and the log lines.
        num_cpus, num_gpus, resource_params: as :func:`pipeline.distributed.ray_map`.

    Returns:
        ``{key: result}`` for every key, in ``keys`` order.

    Raises:
        ValueError: neither or both of ``item`` and ``group`` are given, or ``group`` leaves
            a missing key out.
        Whatever :func:`pipeline.distributed.ray_map` raises; the results saved before the
        failure stay cached.
    """
    if (item is None) == (group is None):
        raise ValueError("cached_map: give exactly one of item= (one task per key) and group= (several keys a task)")
    out: dict[K, Any] = {}
    for key in keys:
        if key not in out and cache_file(key).is_file():
            out[key] = load_torch(cache_file(key))
    missing = list(dict.fromkeys(k for k in keys if k not in out))
    by_file: dict[Path, list[K]] = {}
    for key in missing:  # keys sharing a file: computed once, for the first of them
        by_file.setdefault(cache_file(key), []).append(key)
    todo = [ks[0] for ks in by_file.values()]
    if not todo:
        log.info("%s: all %d cached", desc, len(keys))
    else:
        init_ray()
        tasks = [(item(k), [k]) for k in todo] if item is not None else group(todo)
        covered = {k for _, ks in tasks for k in ks}
        if not set(todo) <= covered:
            raise ValueError(f"cached_map ({desc}): group() left out {sorted(map(str, set(todo) - covered))}")
        log.info("%s: %d task(s) to run, %d of %d cached", desc, len(tasks), len(keys) - len(missing), len(keys))

        def finished(i: int, result: Any) -> None:
            for key in tasks[i][1]:
                part = result if split is None else split(key, result)
                save_torch(part, cache_file(key))
                for same in by_file[cache_file(key)]:
                    out[same] = part

        ray_map(fn, [t for t, _ in tasks], num_cpus=num_cpus, num_gpus=num_gpus, desc=desc,
                on_result=finished, resource_params=resource_params)
    return {k: out[k] for k in keys}
