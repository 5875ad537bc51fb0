"""MLflow logging: one run per stage instance, tagged so runs compare side by side.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite store
``mlflow.db`` in the current directory (the project root under ``dvc repro``).
Only the stage process logs (never a Ray task), so a SQLite store never sees
concurrent writers.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "ray", "dvc", "mlflow", "pandas", "numpy", "pipeline")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def git_commit() -> str:
    """The current git commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict[str, str]:
    """CPU model, core count and GPU model (or ``none``) of this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = "none"
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return {"hw.cpu": cpu, "hw.cpu_count": str(os.cpu_count()), "hw.gpu": gpu}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide the results."""
    out = {}
    for pkg in PACKAGES:
        try:
            out[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open (or resume, with ``run_id``) the MLflow run of one stage instance.

    Tags: ``stage`` (e.g. ``train_defended@fnc``), the git commit, package
    versions, hardware, plus ``tags`` (profile, model, defense, attack, ...).
    Params: ``params`` flattened to dotted keys.

    Yields:
        The active ``mlflow.ActiveRun``.
    """
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            log.warning("MLflow run %s of the resumed stage is not in %s; opening a new run", run_id, tracking_uri())
            run_id = None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else stage) as run:
        if run_id is None:
            mlflow.set_tags(
                {"stage": stage, "git_commit": git_commit(), **package_versions(), **hardware(), **(tags or {})}
            )
            flat = {k: str(v) for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow's batch limit
                mlflow.log_params(dict(items[i : i + 100]))
        yield run


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log the numeric leaves of a nested dict under dotted names (NaN skipped)."""
    import math

    import mlflow

    flat = {
        f"{prefix}{k}": float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(float(v))
    }
    if flat:
        mlflow.log_metrics(flat, step=step)
