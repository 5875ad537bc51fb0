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
    """Validate the params, run ``main(params, **kwargs)``, exit 2 with one line on bad input.

    Known user errors (bad params, missing or corrupt data, missing inputs)
    print ``error: <stage>: <message>`` and exit with status 2; anything else
    is a bug and keeps its traceback.
    """
    from pipeline.data.sources import DatasetError

    setup_logging()
    start = time.perf_counter()
    try:
        params = load_params(params_path)
        main(params, **kwargs)
    except (ParamsError, DatasetError, FileNotFoundError) as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("%s finished in %.1f s", name, time.perf_counter() - start)
