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


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, workdir: Path, artifacts: Path | None = None,
                  timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``mlflow server`` on a free port of 127.0.0.1 for the duration of the block.

    The server runs in its own process group (a new session); leaving the block stops
    that group, and nothing else.

    Args:
        backend_store_uri: its run store, e.g. ``sqlite:///<path>/mlflow.db``.
        workdir: its working folder; ``server.log`` is written there.
        artifacts: where it stores uploaded artifacts (``--artifacts-destination``); None:
            MLflow's default under ``workdir``.
        timeout_s: how long to wait for ``/health`` to answer.

    Yields:
        The tracking URI ``http://127.0.0.1:<port>``.

    Raises:
        RuntimeError: the server exited or did not answer within ``timeout_s`` (the end
            of its log in the message).
    """
    import signal
    import sys
    import time
    import urllib.request

    from pipeline.local_cluster import free_port

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_store_uri]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    logfile = Path(workdir) / "server.log"
    with logfile.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{logfile.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the group started here, nothing else
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
