"""What every stage entry point shares: logging, one-line errors, resume folders."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ParamsError, load_params

log = logging.getLogger("pipeline")

CACHE_ROOT = Path(".cache")
"""Resume state lives here, outside every stage's DVC ``outs`` (which
``dvc repro`` deletes before a stage runs)."""

STAGE_STATS = CACHE_ROOT / "stage_stats"
"""``<stage>.json`` per stage run (:func:`run_stage`): wall time, time computing on
Ray, the driver's peak resident memory. Read by ``benchmarks/bench_pipeline.py``."""


def setup_logging() -> None:
    """INFO-level, timestamped logs on stderr; quiet third-party loggers."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("alembic", "mlflow", "urllib3", "git", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def key_hash(obj: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_dir(stage: str, key: Any) -> Path:
    """``.cache/<stage>/<hash of key>``: where a stage keeps what a rerun can reuse."""
    path = CACHE_ROOT / stage / key_hash(key)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_stage(name: str, main: Callable[..., dict | None], params_path: str = "params.yaml", **kwargs: Any) -> None:
    """Validate the params, check the MLflow store, run ``main(params, **kwargs)``; exit 2 with
    one line on bad input.

    The store is checked (:func:`pipeline.tracking.check_tracking_store`) before ``main``, so a
    dead MLflow server stops the stage in seconds, before Ray starts or anything is computed.
    Known user errors (bad params, missing or corrupt data, missing inputs, a refused
    checkpoint, an unreachable store) print ``error: <stage>: <message>`` and exit with
    status 2; anything else is a bug and keeps its traceback.
    """
    from pipeline.data.sources import DatasetError
    from pipeline.io import RefusedFileError
    from pipeline.tracking import TrackingStoreError, check_tracking_store

    setup_logging()
    start, started_at = time.perf_counter(), time.time()
    try:
        params = load_params(params_path)
        check_tracking_store()
        main(params, **kwargs)
    except (ParamsError, DatasetError, FileNotFoundError, RefusedFileError, TrackingStoreError) as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        sys.exit(2)
    stats = stage_stats(name, started_at, time.perf_counter() - start)
    log.info("%s finished in %.1f s (%.1f s of it computing on Ray; driver peak RSS %.0f MiB)", name,
             stats["wall_seconds"], stats["compute_seconds"], stats["driver_peak_rss_mib"])


def stage_stats(name: str, started_at: float, wall_seconds: float) -> dict[str, Any]:
    """Write ``.cache/stage_stats/<name>.json`` and return it.

    Fields: ``wall_seconds`` (the stage's ``main``, after the interpreter and imports
    started), ``compute_seconds`` (seconds during which at least one Ray task or
    training epoch of this stage was computing: the union of
    :data:`pipeline.distributed.COMPUTE_INTERVALS`), ``task_seconds`` (their sum),
    ``driver_peak_rss_mib`` (peak resident memory of this process, MiB, from
    ``getrusage``), ``started_at`` (Unix time).
    """
    import resource

    from pipeline.distributed import COMPUTE_INTERVALS, busy_seconds
    from pipeline.io import save_json

    stats = {
        "stage": name,
        "started_at": started_at,
        "wall_seconds": round(wall_seconds, 3),
        "compute_seconds": round(busy_seconds(COMPUTE_INTERVALS), 3),
        "task_seconds": round(sum(end - start for start, end in COMPUTE_INTERVALS), 3),
        "tasks": len(COMPUTE_INTERVALS),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # KiB on Linux
    }
    save_json(stats, STAGE_STATS / f"{name}.json")
    return stats
