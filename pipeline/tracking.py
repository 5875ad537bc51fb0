"""MLflow logging: one run per stage instance, tagged so runs compare side by side.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a SQLite store
``mlflow.db`` in the current directory (the project root under ``dvc repro``).
Only the stage process logs (never a Ray task), so a SQLite store never sees
concurrent writers.

A stage checks the store first (:func:`check_tracking_store`, called by
:func:`pipeline.cli.run_stage` before the stage's ``main``), so a dead server stops it in
seconds, before any compute. A store that fails later costs no work: :func:`stage_run`
lets the stage finish and write its outputs, and records what it could not log in
``.mlflow-pending/<stage>-<timestamp>.json``; ``python -m pipeline.tracking sync``
replays those records once the store answers again. Inside a :func:`stage_run` block,
log through :func:`log_metrics`, :func:`set_tags`, :func:`log_artifact`,
:func:`log_artifacts` and :func:`log_dict` (not ``mlflow.*`` directly), so that a failure
is recorded instead of raised.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

log = logging.getLogger(__name__)

PROCESS_START_MS = int(time.time() * 1000)
"""When this process imported the module (a stage imports it before any compute): the start
time of the stage's MLflow run, so that its duration is the stage's, not the logging's."""

PACKAGES = ("torch", "torchvision", "ray", "dvc", "mlflow", "pandas", "numpy", "pipeline")

PENDING_DIR = Path(".mlflow-pending")
"""Where :func:`stage_run` records what it could not log (relative to the working folder,
the project root under ``dvc repro``); ``python -m pipeline.tracking sync`` replays it."""

HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
"""Defaults for MLflow's HTTP client, set where the user has not set them: one retry and a
15 s timeout a request, instead of MLflow's 7 retries with backoff and 120 s (minutes of
waiting per call on a dead server)."""


class TrackingStoreError(SystemExit):
    """The MLflow tracking store does not answer or cannot be written; the message is one
    line naming ``MLFLOW_TRACKING_URI`` and the fix."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def limit_http_retries() -> None:
    """Set :data:`HTTP_LIMITS` in the environment where the user has not set them (MLflow
    reads them at every request)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def _store_name(uri: str) -> str:
    """How messages name the store: ``MLFLOW_TRACKING_URI=<uri>``, or the default local store."""
    return f"MLFLOW_TRACKING_URI={uri}" if os.environ.get("MLFLOW_TRACKING_URI") else f"the local MLflow store {uri}"


def _connection_reason(exc: Exception, timeout_s: float) -> str:
    """A short reason for a failed request: ``[Errno 111] Connection refused``, or a timeout."""
    import requests

    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout_s:g} s"
    return _first_line(exc)


def check_tracking_store(timeout_s: float = 5.0) -> None:
    """Check that the tracking store of :func:`tracking_uri` answers, in at most ``timeout_s``.

    For an ``http(s)`` URI: ``GET <uri>/health``, tried twice with half of ``timeout_s``
    each (not MLflow's client, which retries for minutes); any answer below HTTP 500
    counts as reachable. For a ``sqlite`` store: its folder exists and the database (or,
    before the first run, the folder) is writable. For a local ``file`` store: the nearest
    existing folder of its path is writable. Other stores are not checked. Also sets the
    HTTP limits of :data:`HTTP_LIMITS` (:func:`limit_http_retries`).

    Args:
        timeout_s: the most seconds the check may wait for a server.

    Raises:
        TrackingStoreError: (a ``SystemExit``) the server does not answer or answers
            HTTP 5xx, or the local store cannot be written; one line naming
            ``MLFLOW_TRACKING_URI``, the URI and the fix.
    """
    from urllib.parse import urlparse

    limit_http_retries()
    uri = tracking_uri()
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        import requests

        reason = ""
        for _ in range(2):
            try:
                answer = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s / 2)
            except requests.RequestException as exc:
                reason = _connection_reason(exc, timeout_s / 2)
                continue
            if answer.status_code < 500:
                return
            reason = f"HTTP {answer.status_code} from /health"
        raise TrackingStoreError(
            f"{_store_name(uri)}: no MLflow server answers ({reason}); start the server (mlflow server ...) "
            "or unset MLFLOW_TRACKING_URI to log to the local store mlflow.db")
    if scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if path in ("", ":memory:"):
            return
        db = Path(path)
        folder = db.parent
        if not folder.is_dir():
            problem = f"folder {folder} does not exist"
        elif not os.access(db if db.exists() else folder, os.W_OK):
            problem = f"{db if db.exists() else folder} is not writable"
        else:
            return
    elif scheme in ("", "file"):
        folder = Path(urlparse(uri).path if scheme == "file" else uri)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if os.access(folder, os.W_OK):
            return
        problem = f"{folder} is not writable"
    else:
        return
    raise TrackingStoreError(
        f"{_store_name(uri)}: {problem}; create the folder or make it writable, or point MLFLOW_TRACKING_URI at a "
        "store this user can write")


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


def _store_errors() -> tuple[type[BaseException], ...]:
    """What a failing store raises: MLflow's errors (requests that failed after their
    retries, database errors), ``requests``' and the OS's connection errors."""
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, OSError


def _first_line(exc: BaseException) -> str:
    """A short reason for ``exc``: the OS error inside a failed request (``[Errno 111]
    Connection refused``), else the first line of its message, at most 200 characters."""
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(exc))
    if errno:
        return errno.group(0).strip()
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


class _StageLog:
    """The logging of one :func:`stage_run` block: to MLflow while the store answers; after
    its first failure, into a pending record written to :data:`PENDING_DIR` on exit.

    The record (JSON) holds ``stage``, ``experiment``, ``tracking_uri``, ``run_id`` (the
    run if one was opened, else null), ``params`` and ``tags`` (all of them: a replay logs
    the ones the run lacks), ``metrics`` (``{"values", "step", "timestamp"}`` batches),
    ``artifacts`` (``{"path", "source", "artifact_path", "dir"}``: ``path`` a snapshot of
    the file or folder ``source`` in a folder of the record's name beside it, so that a
    temporary folder, or an output a later run replaces, replays as it was), ``dicts``
    (``{"data", "artifact_file"}``), ``children`` (nested runs, :func:`log_child_runs`),
    ``inputs`` (datasets, :func:`log_dataset`),
    ``status`` and ``start_time`` / ``end_time`` (ms).
    """

    def __init__(self, stage: str, experiment: str, params: dict[str, str], tags: dict[str, str]) -> None:
        self.online = True
        self.path = PENDING_DIR / f"{stage}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}.json"
        self.record: dict[str, Any] = {
            "stage": stage, "experiment": experiment, "tracking_uri": tracking_uri(), "run_id": None,
            "params": params, "tags": tags, "metrics": [], "artifacts": [], "dicts": [], "children": [], "inputs": [],
            "status": None, "start_time": PROCESS_START_MS, "end_time": None,
        }

    def failed(self, exc: BaseException) -> None:
        """Go offline after the store's first failure (one warning line)."""
        if self.online:
            self.online = False
            log.warning("MLflow store %s failed (%s); the stage goes on and records what it cannot log in %s "
                        "(replay: python -m pipeline.tracking sync)", tracking_uri(), _first_line(exc), self.path)

    def try_online(self, call: Callable[[], Any]) -> bool:
        """``call()`` while online; True when it ran, False when offline or the store failed
        (which takes this log offline)."""
        if self.online:
            try:
                call()
                return True
            except _store_errors() as exc:
                self.failed(exc)
        return False

    def send(self, kind: str, entry: dict[str, Any], call: Callable[[], Any]) -> None:
        """``call()`` while online; on a store failure, or once offline, add ``entry`` to
        ``record[kind]`` instead (``tags``: merged into the record's tags)."""
        if self.try_online(call):
            return
        if kind == "tags":
            self.record["tags"].update(entry)
        elif kind == "artifacts":
            self.record[kind].append({**entry, "path": self.snapshot(Path(entry["source"]), entry["dir"])})
        else:
            self.record[kind].append(entry)

    def snapshot(self, source: Path, is_dir: bool) -> str:
        """Hard-link (or, across file systems, copy) ``source`` into ``<record>/<n>/``; the
        absolute path of the snapshot, or of ``source`` itself if that fails (one warning)."""

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        dest = (self.path.with_suffix("") / str(len(self.record["artifacts"])) / source.name).resolve()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if is_dir:
                shutil.copytree(source, dest, copy_function=link)
            else:
                link(str(source), str(dest))
        except OSError as exc:
            log.warning("MLflow: cannot keep a copy of %s (%s); its path is recorded instead", source, exc)
            return str(source)
        return str(dest)

    def open(self, run_id: str | None) -> Any:
        """Open (or resume) the run: set experiment, start the run, log tags and params.

        Returns:
            The ``mlflow.ActiveRun``, or, when the store failed before a run was opened,
            a stand-in whose ``info.run_id`` is None.
        """
        import mlflow

        stage = self.record["stage"]
        try:
            mlflow.set_tracking_uri(tracking_uri())
            mlflow.set_experiment(self.record["experiment"])
            if run_id is not None:
                try:
                    mlflow.get_run(run_id)
                except mlflow.exceptions.MlflowException as exc:
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    log.warning("MLflow run %s of the resumed stage is not in %s; opening a new run", run_id,
                                tracking_uri())
                    run_id = None
            if run_id is None:
                client = mlflow.MlflowClient()
                exp_id = mlflow.get_experiment_by_name(self.record["experiment"]).experiment_id
                name = run_name(stage, self.record["params"], previous_params(client, exp_id, stage))
                run_id = client.create_run(exp_id, start_time=self.record["start_time"], run_name=name,
                                           tags={"stage": stage}).info.run_id
                run = mlflow.start_run(run_id=run_id)
                mlflow.set_tags(self.record["tags"])
                items = list(self.record["params"].items())
                for i in range(0, len(items), 100):  # MLflow's batch limit
                    mlflow.log_params(dict(items[i : i + 100]))
            else:
                run = mlflow.start_run(run_id=run_id)
            self.record["run_id"] = run.info.run_id
        except _store_errors() as exc:
            self.failed(exc)
        active = mlflow.active_run()
        return active if active is not None else SimpleNamespace(info=SimpleNamespace(run_id=None))

    def close(self, status: str) -> None:
        """End the run with ``status``; when offline, write the pending record (one warning line)."""
        import mlflow

        self.record["status"], self.record["end_time"] = status, int(time.time() * 1000)
        if mlflow.active_run() is not None:
            try:
                mlflow.end_run(status)  # leaves no active run even when the store fails
            except _store_errors() as exc:
                self.failed(exc)
        if self.online:
            return
        from pipeline.io import save_json

        save_json(self.record, self.path)
        r = self.record
        log.warning("MLflow: %d metric batches, %d artifacts and %d dicts of %s not logged, recorded in %s; once %s "
                    "answers, run: python -m pipeline.tracking sync", len(r["metrics"]), len(r["artifacts"]),
                    len(r["dicts"]), r["stage"], self.path, tracking_uri())


def _finite(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The int and float values of a flat dict as floats, keys prefixed; bools and NaN left out."""
    import math

    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(float(v))}


def _experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name`` in ``client``'s store, created when missing."""
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def _call_or_record(call: Callable[[], Any], offline: Callable[[], Any]) -> None:
    """``call()`` outside a :func:`stage_run` block or while its store answers; inside one,
    after the store's first failure (this call's included), ``offline()`` instead."""
    if _ACTIVE is None:
        call()
    elif not _ACTIVE.try_online(call):
        offline()


def previous_params(client: Any, experiment_id: str, stage: str) -> dict[str, str] | None:
    """The params of the latest top-level run of ``stage`` in the experiment (None: none yet)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.stage = '{stage}'", max_results=20,
                              order_by=["attributes.start_time DESC"])
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return dict(top[0].data.params) if top else None


def run_name(stage: str, params: Mapping[str, str], previous: Mapping[str, str] | None, most: int = 3) -> str:
    """The name of a stage's run, telling reruns apart: the stage, then the DVC experiment
    (``DVC_EXP_NAME``, set by ``dvc exp run``) when there is one, else up to ``most`` params
    that differ from the stage's previous run, as ``key=value``.

    Example: ``evaluate [exp-3f2a1]`` or ``train_defended@fnc fnc.alpha=1.2``.
    """
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        return f"{stage} [{exp}]"
    if not previous:
        return stage
    changed = [f"{k}={v}" for k, v in params.items() if previous.get(k) != v]
    if not changed:
        return stage
    more = f" +{len(changed) - most}" if len(changed) > most else ""
    return f"{stage} {' '.join(changed[:most])}{more}"


def run_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """Tags every run gets to be found and grouped by: ``git_commit`` (``-dirty`` when the
    working tree has uncommitted changes), ``git_dirty`` (``true``/``false``), ``params_hash``
    (16 hex digits of the params logged) and ``dvc_experiment`` (``DVC_EXP_NAME`` under
    ``dvc exp run``, else ``workspace``)."""
    import hashlib

    commit = git_commit()
    digest = hashlib.sha256(json.dumps(flatten(params), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"git_commit": commit, "git_dirty": str(commit.endswith("-dirty")).lower(), "params_hash": digest,
            "dvc_experiment": os.environ.get("DVC_EXP_NAME") or "workspace"}


def _log_child(client: Any, experiment_id: str, parent_id: str, child: Mapping[str, Any], time_ms: int) -> str:
    """Create one finished nested run under ``parent_id``; its id."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, start_time=time_ms, run_name=child["name"],
                            tags={"mlflow.parentRunId": parent_id, **child.get("tags", {})})
    params = [Param(k, str(v)) for k, v in child.get("params", {}).items()]
    metrics = [Metric(k, float(v), time_ms, 0) for k, v in child.get("metrics", {}).items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params[:100])
    client.set_terminated(run.info.run_id, "FINISHED", end_time=time_ms)
    return run.info.run_id


def log_child_runs(children: list[Mapping[str, Any]]) -> None:
    """Log one finished nested run per entry under the active :func:`stage_run` run, so the
    runs table can filter and compare them one by one (e.g. one per evaluation cell).

    Args:
        children: ``{"name": str, "params": {str: scalar}, "metrics": {str: float},
            "tags": {str: str}}`` each (params at most 100; NaN metrics are dropped).

    Inside :func:`stage_run`, a store failure records the children instead (replayed by
    ``python -m pipeline.tracking sync`` under the replayed parent).
    """

    import mlflow

    children = [{**c, "metrics": _finite(c.get("metrics", {}))} for c in children]

    def call() -> None:
        active = mlflow.active_run()
        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        for c in children:
            _log_child(client, active.info.experiment_id, active.info.run_id, c, now)

    _call_or_record(call, lambda: _ACTIVE.record["children"].extend(children))


_ACTIVE: _StageLog | None = None
"""The logging of the :func:`stage_run` block in progress (None outside one)."""


@contextlib.contextmanager
def stage_run(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open (or resume, with ``run_id``) the MLflow run of one stage instance.

    Tags: ``stage`` (e.g. ``train_defended@fnc``), :func:`run_tags` (git commit and
    whether the tree was dirty, params hash, DVC experiment), package versions, hardware,
    plus ``tags`` (profile, model, defense, attack, ...). Params: ``params`` flattened to
    dotted keys. A new run is named by :func:`run_name` (the stage, then the DVC experiment
    or the params that differ from the stage's previous run) and starts at
    :data:`PROCESS_START_MS`, so its duration is the stage process's.

    A failing store never stops the stage: from its first failure on (opening the run
    included), what :func:`log_metrics`, :func:`set_tags`, :func:`log_artifact`,
    :func:`log_artifacts` and :func:`log_dict` are given inside the block is recorded
    instead, written on exit to ``.mlflow-pending/<stage>-<timestamp>.json`` with one
    warning line, and replayed by ``python -m pipeline.tracking sync``. MLflow's HTTP
    client is held to :data:`HTTP_LIMITS` (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 1,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT`` 15 s, unless set), so a server that dies costs
    seconds, not minutes of retries. The run ends ``FINISHED``, or ``FAILED`` when the
    block raises (the exception goes on).

    Yields:
        The active ``mlflow.ActiveRun``; if the store failed before a run was opened, a
        stand-in with ``info.run_id`` None.
    """
    global _ACTIVE, STAGE_RUNS_OPENED

    STAGE_RUNS_OPENED += 1
    limit_http_retries()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    all_tags = {"stage": stage, **run_tags(params), **package_versions(), **hardware(), **(tags or {})}
    stage_log = _StageLog(stage, experiment, {k: str(v) for k, v in flatten(params).items()}, all_tags)
    run = stage_log.open(run_id)
    outer, _ACTIVE = _ACTIVE, stage_log
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        _ACTIVE = outer
        stage_log.close(status)


STAGE_RUNS_OPENED = 0
"""How many :func:`stage_run` blocks this process has opened (see :func:`failed_stage_run`)."""


def failed_stage_run(stage: str, experiment: str, tags: Mapping[str, str], exc: BaseException) -> str | None:
    """Record a stage that failed before it opened its run (stages open theirs after the
    compute): a run named after the stage, from the process's start to now, status FAILED,
    tagged ``stage``, ``error`` (the exception's first line) and ``tags``. Nothing when
    the stage had opened a :func:`stage_run` (which ended FAILED itself).

    Returns:
        The run id, or None when nothing was recorded.
    """
    import mlflow

    if STAGE_RUNS_OPENED:
        return None
    limit_http_retries()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    exp_id = _experiment_id(client, experiment)
    error = f"{type(exc).__name__}: {_first_line(exc)}" if str(exc) else type(exc).__name__
    run = client.create_run(exp_id, start_time=PROCESS_START_MS, run_name=stage,
                            tags={"stage": stage, "error": error[:500], **run_tags({}), **dict(tags)})
    client.set_terminated(run.info.run_id, "FAILED")
    return run.info.run_id


def log_metrics(metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> None:
    """Log the numeric leaves of a nested dict under dotted names (NaN skipped).

    Inside :func:`stage_run`, a store failure records them instead of raising.
    """

    import mlflow

    flat = _finite(flatten(metrics), prefix)
    if not flat:
        return
    if _ACTIVE is None:
        mlflow.log_metrics(flat, step=step)
        return
    entry = {"values": flat, "step": step, "timestamp": int(time.time() * 1000)}
    _ACTIVE.send("metrics", entry, lambda: mlflow.log_metrics(flat, step=step))


def set_tags(tags: Mapping[str, str]) -> None:
    """Set tags on the active run (inside :func:`stage_run`, recorded on a store failure)."""
    import mlflow

    tags = {k: str(v) for k, v in tags.items()}
    if _ACTIVE is None:
        mlflow.set_tags(tags)
    else:
        _ACTIVE.send("tags", tags, lambda: mlflow.set_tags(tags))


def _log_dataset(client: Any, run_id: str, entry: Mapping[str, Any]) -> None:
    """Log one :func:`log_dataset` entry as an input of run ``run_id``."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # a local path matches two equivalent local source kinds
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(entry["path"])
    dataset = MetaDataset(source=source, name=entry["name"], digest=entry["digest"][:36])
    tags = [InputTag("mlflow.data.context", entry["context"]), *(InputTag(k, str(v)) for k, v in entry["tags"].items())]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def log_dataset(name: str, path: str | Path, digest: str, context: str, tags: Mapping[str, Any] | None = None) -> None:
    """Log a dataset the stage read or wrote as an input of the active run (MLflow's
    Datasets: the runs table's "Dataset" column and the run page's inputs).

    Args:
        name: e.g. ``cifar10 test``.
        path: where it lies (the prepared data folder).
        digest: a content hash (at most 36 characters are kept), so two runs on the
            same data show the same digest.
        context: ``train``, ``validation`` or ``test``.
        tags: more input tags, e.g. ``{"n_images": 1000}``.

    Inside :func:`stage_run`, a store failure records it instead (replayed by ``sync``).
    """
    import mlflow

    entry = {"name": name, "path": str(Path(path).resolve()), "digest": digest, "context": context,
             "tags": {k: str(v) for k, v in (tags or {}).items()}}

    def call() -> None:
        _log_dataset(mlflow.MlflowClient(), mlflow.active_run().info.run_id, entry)

    if _ACTIVE is None:
        call()
    else:
        _ACTIVE.send("inputs", entry, call)


def log_model(checkpoint: str | Path, image_shape: tuple[int, int, int], name: str = "model") -> None:
    """Log a checkpoint as an MLflow PyTorch model with its signature, so that
    ``mlflow.pytorch.load_model(<the run's tag model_uri.<name>>)`` (a ``models:/`` URI)
    gives the (defended) network and the UI shows what it takes and returns.

    The signature: input float32 ``(-1, C, H, W)`` images in [0, 1] (the network
    normalises inside), output float32 ``(-1, num_classes)`` logits. The ``pipeline``
    package is stored beside the model (``code_paths``), so it loads without this
    checkout; the requirements are pinned to the running torch and torchvision (no pip
    inference).

    Args:
        checkpoint: a checkpoint file of :func:`pipeline.checkpoint.save_checkpoint`.
        image_shape: ``(C, H, W)`` of the prepared images.
        name: the model's artifact path in the run.

    Inside :func:`stage_run`, a store failure skips the model with one warning line (the
    checkpoint itself is logged as an artifact and recorded).
    """
    import torch

    from pipeline.checkpoint import build_from_spec, load_checkpoint

    def call() -> None:
        import mlflow.pytorch
        from mlflow.models import infer_signature

        model = build_from_spec(load_checkpoint(checkpoint)).float().eval()
        example = torch.rand(2, *image_shape)
        with torch.no_grad():
            logits = model(example)
        signature = infer_signature(example.numpy(), logits.numpy())
        requirements = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "torchvision")]
        info = mlflow.pytorch.log_model(model, name=name, signature=signature, pip_requirements=requirements,
                                        serialization_format="pickle",  # the defenses need not trace
                                        code_paths=[str(Path(__file__).resolve().parent)])
        mlflow.set_tag(f"model_uri.{name}", info.model_uri)

    _call_or_record(call, lambda: log.warning(
        "MLflow: model %s not logged (the store failed); its checkpoint is recorded as an artifact", checkpoint))


def _artifact(path: str | Path, artifact_path: str | None, is_dir: bool) -> None:
    import mlflow

    path = Path(path)
    if not (path.is_dir() if is_dir else path.is_file()):
        raise FileNotFoundError(f"{path}: no such {'folder' if is_dir else 'file'} to log to MLflow")
    call = mlflow.log_artifacts if is_dir else mlflow.log_artifact
    if _ACTIVE is None:
        call(str(path), artifact_path=artifact_path)
        return
    entry = {"source": str(path.resolve()), "artifact_path": artifact_path, "dir": is_dir}
    _ACTIVE.send("artifacts", entry, lambda: call(str(path), artifact_path=artifact_path))


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log one file as an artifact of the active run (``mlflow.log_artifact``); inside
    :func:`stage_run`, a store failure records a snapshot of it instead.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    _artifact(path, artifact_path, is_dir=False)


def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    """Log a folder's files as artifacts of the active run (``mlflow.log_artifacts``);
    inside :func:`stage_run`, a store failure records a snapshot of it instead.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    _artifact(folder, artifact_path, is_dir=True)


def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    """Log a JSON-serialisable dict as the artifact ``artifact_file`` (``mlflow.log_dict``);
    inside :func:`stage_run`, a store failure records the dict instead."""
    import mlflow

    if _ACTIVE is None:
        mlflow.log_dict(dict(data), artifact_file)
    else:
        entry = {"data": dict(data), "artifact_file": artifact_file}
        _ACTIVE.send("dicts", entry, lambda: mlflow.log_dict(dict(data), artifact_file))


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


def replay(record: Mapping[str, Any], save: Callable[[dict[str, Any]], Any] | None = None) -> str:
    """Log one pending record of :func:`stage_run` into the store of :func:`tracking_uri`.

    Into the record's run when the store has it (only the params that run lacks), else into
    a new run of the record's experiment, named after its stage; then its tags, metrics
    (with their steps and times), artifacts and dicts; then the run's end status.

    Args:
        record: the JSON of a ``.mlflow-pending`` file (see :class:`_StageLog`).
        save: called with the record, its ``run_id`` set, once a new run is made, so that
            a replay cut short continues in that run rather than making another.

    Returns:
        The run id logged into.

    Raises:
        FileNotFoundError: an artifact path of the record no longer exists.
        mlflow.exceptions.MlflowException, requests.RequestException, OSError: the store failed.
    """
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    limit_http_retries()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri())
    record = dict(record)
    run = None
    if record.get("run_id"):
        try:
            run = client.get_run(record["run_id"])
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    if run is None:
        run = client.create_run(_experiment_id(client, record["experiment"]), start_time=record.get("start_time"),
                                run_name=record["stage"], tags={"stage": record["stage"]})
        record["run_id"] = run.info.run_id
        if save is not None:
            save(record)
    run_id = run.info.run_id
    missing = [f for f in record["artifacts"] if not Path(f["path"]).exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]['path']}: recorded as an artifact but gone; rerun the stage to "
                                "log it again, or delete this pending record")
    params = [Param(k, v) for k, v in record["params"].items() if k not in run.data.params]
    tags = [RunTag(k, str(v)) for k, v in record["tags"].items()]
    for i in range(0, max(len(params), len(tags)), 100):  # MLflow's batch limits
        client.log_batch(run_id, params=params[i : i + 100], tags=tags[i : i + 100])
    metrics = [Metric(k, v, m["timestamp"], m["step"] or 0) for m in record["metrics"] for k, v in m["values"].items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    for a in record["artifacts"]:
        (client.log_artifacts if a["dir"] else client.log_artifact)(run_id, a["path"], a["artifact_path"])
    for d in record["dicts"]:
        client.log_dict(run_id, d["data"], d["artifact_file"])
    for entry in record.get("inputs", []):
        _log_dataset(client, run_id, entry)
    exp_id = client.get_run(run_id).info.experiment_id
    for child in record.get("children", []):
        _log_child(client, exp_id, run_id, child, record.get("end_time") or int(time.time() * 1000))
    client.set_terminated(run_id, record.get("status") or "FINISHED", end_time=record.get("end_time"))
    return run_id


def sync(folder: str | Path = PENDING_DIR) -> int:
    """Replay every pending record in ``folder`` (:func:`replay`), oldest first, removing
    each file (and its folder of artifact snapshots) once replayed; a record that fails
    stays for the next ``sync``.

    Args:
        folder: the pending records' folder.

    Returns:
        The number of records that failed (0: all replayed, or none pending).

    Raises:
        TrackingStoreError: the store does not answer (:func:`check_tracking_store`).
    """
    from pipeline.io import save_json

    files = sorted(Path(folder).glob("*.json"), key=lambda f: f.stat().st_mtime)
    if not files:
        log.info("no pending MLflow records in %s", folder)
        return 0
    check_tracking_store()
    failed = 0
    for f in files:
        try:
            run_id = replay(json.loads(f.read_text()), save=lambda rec, f=f: save_json(rec, f))
        except (*_store_errors(), ValueError, KeyError) as exc:
            failed += 1
            print(f"error: {f}: not replayed ({_first_line(exc)}); the file is kept, run sync again", file=sys.stderr)
            continue
        f.unlink()
        shutil.rmtree(f.with_suffix(""), ignore_errors=True)  # its artifacts' snapshots
        log.info("replayed %s into run %s of %s", f, run_id, tracking_uri())
    return failed


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.tracking sync [--folder F]``: replay pending MLflow records.

    Exits 2 with one line when the store does not answer, 1 when a record was not replayed
    (each named on its own line), 0 otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sync", help=f"replay {PENDING_DIR}/*.json into the store of MLFLOW_TRACKING_URI")
    p.add_argument("--folder", default=str(PENDING_DIR), help="the pending records' folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        failed = sync(args.folder)
    except TrackingStoreError as exc:
        print(f"error: sync: {exc}", file=sys.stderr)
        sys.exit(2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
