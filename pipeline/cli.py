"""What every stage entry point shares: logging, one-line errors, resume folders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ParamsError, load_params
from pipeline.layout import CACHE_ROOT  # resume state: outside every stage's DVC ``outs``, which dvc repro deletes

log = logging.getLogger("pipeline")

SIGTERM_GRACE_S = 10.0
"""Seconds a stage has, after SIGTERM, to stop by itself (the ``SystemExit`` its handler
raises unwinds it and Ray's exit hooks run) before :func:`stop_on_sigterm`'s watchdog ends
it: Python runs signal handlers only between bytecodes, and a call blocked inside Ray's
C++ code (e.g. waiting for a cluster's GCS) returns only after tens of seconds."""

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
    # mlflow >= 3.x sets its own loggers' level when first imported (to INFO, e.g. "Creating initial MLflow
    # database tables" on stderr); this is the level it reads then
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def key_hash(obj: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


FORCED = False
"""True while a stage runs under ``dvc repro -f`` / ``dvc exp run -f`` (:func:`forced_by_dvc`,
set by :func:`run_stage`): :func:`resume_dir` then empties each entry it hands out, once, so
the stage recomputes instead of reusing what an earlier run cached."""

_EMPTIED: set[Path] = set()


def resume_dir(stage: str, key: Any) -> Path:
    """``.cache/<stage>/<hash of key>``: where a stage keeps what a rerun can reuse.

    Under :data:`FORCED`, the folder is emptied the first time this process asks for it, so
    ``dvc repro -f`` recomputes what it forces (and a forced run killed midway resumes from
    what it had itself written).
    """
    import shutil

    path = CACHE_ROOT / stage / key_hash(key)
    if FORCED and path not in _EMPTIED:
        _EMPTIED.add(path)
        if path.exists():
            log.info("dvc repro -f: not reusing %s", path)
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dvc_forces(argv: list[str]) -> bool | None:
    """For the argv of a process: None when it is not ``dvc repro`` / ``dvc exp run``, else
    whether it was given ``-f`` / ``--force``."""
    names = [os.path.basename(a) for a in argv]
    if "dvc" in names:
        rest = argv[names.index("dvc") + 1:]
    elif "-m" in argv and argv.index("-m") + 1 < len(argv) and argv[argv.index("-m") + 1] == "dvc":
        rest = argv[argv.index("-m") + 2:]
    else:
        return None
    if rest[:1] == ["repro"] or rest[:2] == ["exp", "run"]:
        return any(a in ("-f", "--force") or (a.startswith("-") and not a.startswith("--") and "f" in a[1:]
                                               and a[1:].isalpha()) for a in rest)
    return None


def forced_by_dvc(pid: int | None = None) -> bool:
    """Whether the nearest ``dvc repro`` / ``dvc exp run`` among this process's ancestors was
    given ``-f`` (``--force``). DVC passes nothing to a stage's command that says so; every
    stage it runs under ``-f`` is forced (DVC's ``-f`` reruns every stage in scope), so the
    ancestor's arguments decide. Reads ``/proc`` (Linux); False elsewhere or when no DVC
    process is found.

    Args:
        pid: start from this process's parent (default: this process).
    """
    pid = os.getppid() if pid is None else _parent(pid)
    while pid and pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        verdict = _dvc_forces([a.decode(errors="replace") for a in argv if a])
        if verdict is not None:
            return verdict
        pid = _parent(pid)
    return False


def _parent(pid: int) -> int:
    """The parent pid of ``pid`` (0 when unknown)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def run_stage(name: str, main: Callable[..., dict | None], params_path: str = "params.yaml", **kwargs: Any) -> None:
    """Validate the params, check the MLflow store, run ``main(params, **kwargs)``; exit 2 with
    one line on bad input.

    The store is checked (:func:`pipeline.tracking.check_tracking_store`) before ``main``, so a
    dead MLflow server stops the stage in seconds, before Ray starts or anything is computed.
    Known user errors (bad params, resource requests no node of the Ray cluster can hold,
    missing or corrupt data, missing inputs, a refused checkpoint, an unreachable store or
    Ray cluster) print ``error: <stage>: <message>`` and exit with status 2; anything else is
    a bug and keeps its traceback. SIGTERM stops the stage promptly (:func:`stop_on_sigterm`).

    Args:
        name: the stage's name in messages and in ``.cache/stage_stats/<name>.json``.
        main: the stage's work, called as ``main(params, **kwargs)``.
        params_path: the params file.
        **kwargs: passed to ``main``.

    Raises:
        SystemExit: status 2 after a user error, 143 after SIGTERM.
    """
    global FORCED
    params = None
    setup_logging()
    restore = stop_on_sigterm(name)
    start, started_at = time.perf_counter(), time.time()
    try:
        from pipeline.tracking import check_tracking_store

        params = load_params(params_path)
        check_tracking_store()
        FORCED = forced_by_dvc()
        if FORCED:
            log.info("%s: forced by dvc repro -f; its caches in %s are not reused", name, CACHE_ROOT)
        main(params, **kwargs)
    except _user_errors() as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        _record_failure(name, params, exc)
        sys.exit(2)
    except BaseException as exc:  # a bug, SIGTERM or Ctrl-C: recorded, then raised on
        _record_failure(name, params, exc)
        raise
    finally:
        restore()
    stats = stage_stats(name, started_at, time.perf_counter() - start)
    log.info("%s finished in %.1f s (%.1f s of it computing on Ray; driver peak RSS %.0f MiB)", name,
             stats["wall_seconds"], stats["compute_seconds"], stats["driver_peak_rss_mib"])


def _record_failure(name: str, params: Any, exc: BaseException) -> None:
    """A FAILED MLflow run for a stage that failed after its params and the store were
    checked and before it opened its own run (:func:`pipeline.tracking.failed_stage_run`);
    nothing when the params or the store are what failed. Never raises."""
    from pipeline.tracking import TrackingStoreError

    if params is None or isinstance(exc, TrackingStoreError):
        return
    try:
        from pipeline.tracking import failed_stage_run

        failed_stage_run(name, params.mlflow.experiment, {"profile": params.profile}, exc)
    except Exception as err:  # the stage's own error is what the user needs to see
        log.warning("MLflow: the failed run of %s was not recorded (%s)", name, err)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions :func:`run_stage` prints as one line (evaluated when one is raised, so
    a stage that never imported Ray does not import it here)."""
    from pipeline.data.sources import DatasetError
    from pipeline.io import RefusedFileError
    from pipeline.tracking import TrackingStoreError

    errors: list[type[BaseException]] = [ParamsError, DatasetError, FileNotFoundError, RefusedFileError,
                                         TrackingStoreError]
    distributed = sys.modules.get("pipeline.distributed")
    if distributed is not None:  # ResourceRequestError is a ParamsError already
        errors.append(distributed.ClusterError)
    return tuple(errors)


def stop_on_sigterm(name: str, grace_s: float | None = None) -> Callable[[], None]:
    """Make SIGTERM stop this stage process promptly.

    The handler prints ``error: <name>: stopped by SIGTERM`` and raises
    ``SystemExit(143)``, which unwinds the stage (Ray's and MLflow's exit hooks run).
    Python runs it only between bytecodes, though, so a watchdog thread, woken through
    ``signal.set_wakeup_fd`` at the moment the signal arrives, ends the process with
    ``os._exit(143)`` if it is still alive ``grace_s`` seconds later (a call blocked in
    Ray's C++ code). :func:`pipeline.distributed.init_ray` puts this handler back after
    ``ray.init`` replaces it. Outside the main thread it does nothing.

    Args:
        name: the stage's name in the message.
        grace_s: seconds before the watchdog ends the process (default :data:`SIGTERM_GRACE_S`).

    Returns:
        A function that puts back the SIGTERM handler and wakeup fd found before and
        stops the watchdog (unless SIGTERM already came: then it still ends the process).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    grace = SIGTERM_GRACE_S if grace_s is None else grace_s

    def handler(signum: int, frame: Any) -> None:
        print(f"error: {name}: stopped by SIGTERM", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # no wakeup fd here: the handler alone
        reader.close()
        writer.close()
        signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def watchdog() -> None:
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                time.sleep(grace)
                print(f"error: {name}: still running {grace:g} s after SIGTERM (blocked in Ray?); exiting "
                      "without cleanup", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watchdog, name=f"{name}-sigterm-watchdog", daemon=True).start()
    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)
        try:
            signal.set_wakeup_fd(previous_fd)
        except (ValueError, OSError):
            pass
        writer.close()  # the watchdog reads EOF and ends
        reader.shutdown(socket.SHUT_RDWR)

    return restore


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
