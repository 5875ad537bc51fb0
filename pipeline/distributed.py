"""Ray plumbing shared by every stage: start or join a cluster, fan tasks out.

A stage calls :func:`init_ray` once, then :func:`ray_map` for each batch of
independent tasks. ``RAY_ADDRESS`` (an existing cluster, ``auto``, or a
``ray://`` client address) is honoured; without it a local Ray instance is
started with all CPU cores of this machine and stopped when the stage exits.
Tasks return their results through Ray's object store, and only the stage
process (the driver) writes files or logs to MLflow.

Joining a cluster fails in bounded time with one line (:class:`ClusterError`): the
address is probed over TCP first (``JOIN_PROBE_S``), and Ray's own connection
attempts are held to a few. A ``127.0.0.1`` address whose cluster listens on the
loopback interface only (:mod:`pipeline.local_cluster`) is joined as ``127.0.0.1``,
not as the machine's network address Ray would otherwise substitute, and with the
token that ``pipeline.local_cluster`` registered for it, so its printed
``RAY_ADDRESS=127.0.0.1:<port> dvc repro`` works as it stands.

Before tasks or actors are submitted, :func:`check_resources` compares what they
ask for with the cluster's nodes, so a request no node can hold (Ray would wait
for such a node forever) stops the stage in seconds with one line naming the
params to change (:class:`ResourceRequestError`).

``python -m pipeline.distributed`` joins ``RAY_ADDRESS`` (or starts a local
instance), prints the nodes and runs one small task per CPU: a check of a cluster.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline.config import ParamsError  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

JOIN_PROBE_S = 15.0
"""Seconds :func:`init_ray` keeps trying to open a TCP connection to ``RAY_ADDRESS``
before it gives up with :class:`ClusterError` (the head may still be starting)."""

JOIN_GCS_ATTEMPTS = "3"
"""Ray's connection attempts to a cluster's GCS when joining one (Ray's
``RAY_gcs_server_port_wait_time_s``; its default, 20 attempts of up to 40 s each,
kept a driver of an unresponsive address retrying for over ten minutes). A value
set in the environment is kept."""

RESOURCE_CHECK_ENV = "PIPELINE_RESOURCE_CHECK"
"""Set to ``0`` to skip :func:`check_resources` (an autoscaling cluster that adds
nodes on demand may have no node yet that fits a request)."""

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ClusterError(RuntimeError):
    """``RAY_ADDRESS`` names a cluster this process cannot join (one line: the address,
    why, and what to do); :func:`pipeline.cli.run_stage` prints it without a traceback."""


class ResourceRequestError(ParamsError):
    """Tasks or actors ask for more CPUs or GPUs than any node of the cluster (or the
    cluster as a whole) has; the message names the params to change."""

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

    Joining (``RAY_ADDRESS``): the address is probed over TCP for up to
    :data:`JOIN_PROBE_S` seconds; a loopback address whose cluster listens on
    127.0.0.1 only is joined as 127.0.0.1 (:func:`_join_settings`), with the token
    :mod:`pipeline.local_cluster` registered for that port unless ``RAY_AUTH_TOKEN``
    or ``RAY_AUTH_TOKEN_PATH`` is set; Ray's own connection attempts are held to
    :data:`JOIN_GCS_ATTEMPTS`. The SIGTERM handler in place before ``ray.init``
    (e.g. :func:`pipeline.cli.run_stage`'s) is put back after it.

    Args:
        num_cpus: CPUs of a local instance (default: all cores of this machine);
            ignored when joining a cluster.

    Returns:
        The cluster's total resources (``{"CPU": 2.0, ...}``).

    Raises:
        ClusterError: ``RAY_ADDRESS`` is malformed, nothing answers there, or Ray
            could not join the cluster (e.g. a missing or wrong auth token).
    """
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        handler = signal.getsignal(signal.SIGTERM)
        if address:
            _join(address)
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
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)  # ray.init put its own in place
    return dict(ray.cluster_resources())


def _join(address: str) -> None:
    """``ray.init(address)`` for :func:`init_ray`, failing in bounded time with one line."""
    log.info("joining Ray cluster at %s", address)
    _join_settings(address)
    wait_key = "RAY_gcs_server_port_wait_time_s"
    preset = os.environ.get(wait_key)
    os.environ[wait_key] = preset or JOIN_GCS_ATTEMPTS
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClusterError(
            f"RAY_ADDRESS={address}: could not join the Ray cluster ({reason}); if it uses token "
            "authentication (ray start's default), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to its token, "
            "or unset RAY_ADDRESS to run on this machine alone") from None
    finally:
        if preset is None:
            os.environ.pop(wait_key, None)


def _split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address; None for ``auto``
    and the like, which Ray resolves itself.

    Raises:
        ClusterError: a ``host:port`` address whose port is not a number.
    """
    rest = address.split("://", 1)[1] if "://" in address else address
    if address in ("auto", "local") or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not host:
        raise ClusterError(f"RAY_ADDRESS={address}: expected <host>:<port> (e.g. 127.0.0.1:6379); fix or unset it")
    return host, int(port)


def _answers(host: str, port: int, timeout: float = 2.0) -> OSError | None:
    """None if a TCP connection to ``host:port`` opens within ``timeout`` s, else the error."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc


def _join_settings(address: str) -> None:
    """Probe ``address`` and prepare this process to join it.

    A loopback host (``127.0.0.1``, ``localhost``) is what Ray replaces by the
    machine's network address (``ray._private.services.resolve_ip_for_localhost``)
    before it connects. A cluster whose head listens there too (plain ``ray start``)
    is left to Ray. One that listens on 127.0.0.1 only (``pipeline.local_cluster``,
    whose nodes registered as 127.0.0.1) is joined as 127.0.0.1
    (:func:`_loopback_only`), and with the token ``pipeline.local_cluster`` registered
    for its port (:func:`pipeline.local_cluster.use_registered_token`).

    Raises:
        ClusterError: nothing accepts a connection at the address within :data:`JOIN_PROBE_S` s.
    """
    parts = _split_address(address)
    if parts is None:
        return
    host, port = parts
    deadline = time.monotonic() + JOIN_PROBE_S
    while (error := _answers(host, port)) is not None and time.monotonic() < deadline:
        time.sleep(1.0)
    if error is not None:
        raise ClusterError(
            f"RAY_ADDRESS={address}: nothing answers at {host}:{port} ({error.strerror or error}); start the "
            "cluster there (ray start --head, or python -m pipeline.local_cluster), fix the address, or unset "
            "RAY_ADDRESS to run on this machine alone")
    if host not in _LOOPBACK_HOSTS or "://" in address:
        return
    try:
        from ray._private.services import resolve_ip_for_localhost

        ray_host = resolve_ip_for_localhost(host)
    except (ImportError, AttributeError, ValueError):
        return
    if ray_host not in _LOOPBACK_HOSTS and _answers(ray_host, port, timeout=1.0) is not None:
        log.info("%s listens on the loopback interface only: joining as 127.0.0.1, not %s", address, ray_host)
        _loopback_only()
    from pipeline.local_cluster import use_registered_token

    if use_registered_token(port) is not None:
        log.info("using the auth token that pipeline.local_cluster registered for port %d", port)


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


def _count(n: float, unit: str) -> str:
    """``1 CPU``, ``2 CPUs``, ``0.5 GPUs``."""
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def check_resources(
    num_cpus: float,
    num_gpus: float = 0.0,
    *,
    cpu_param: str = "resources.num_cpus",
    gpu_param: str = "resources.num_gpus",
    count: int = 1,
    count_param: str = "",
) -> None:
    """Stop before submitting work that no node of the cluster can hold.

    Ray queues a task or actor whose request fits no node until such a node joins,
    which on a fixed cluster is forever (it logs "No available node types can
    fulfill resource request" every half minute). This compares the request with
    every live node's total resources (``ray.nodes()``) and the cluster's
    (``ray.cluster_resources()``). Skipped when :data:`RESOURCE_CHECK_ENV` is ``0``
    (an autoscaling cluster) or the node list cannot be read.

    Args:
        num_cpus, num_gpus: what each task or actor asks for (``num_gpus`` after
            :func:`effective_gpus`: 0 on a cluster without GPUs).
        cpu_param, gpu_param: the params these values come from, named in the message.
        count: tasks that must run at once (``train.workers`` data-parallel workers).
        count_param: the param ``count`` comes from (with ``count`` > 1).

    Raises:
        ResourceRequestError: no single node has ``num_cpus`` CPUs and ``num_gpus``
            GPUs, or the nodes cannot hold ``count`` of them at once; one line
            naming the params to lower.
    """
    if os.environ.get(RESOURCE_CHECK_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    init_ray()
    try:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    except Exception as exc:  # noqa: BLE001 - a client connection without the node table: let Ray decide
        log.debug("resource check skipped: %s", exc)
        return
    need = {"CPU": float(num_cpus), "GPU": float(num_gpus)}
    param = {"CPU": cpu_param, "GPU": gpu_param}
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    for kind in ("CPU", "GPU"):
        if need[kind] > largest[kind] + 1e-9 and largest[kind] == 0:
            raise ResourceRequestError(
                f"{param[kind]}: {need[kind]:g} but no node of the Ray cluster has a {kind}; add a node with "
                f"{kind}s (ray start --address=<head> --num-{kind.lower()}s=N) or lower it")
        if need[kind] > largest[kind] + 1e-9:
            raise ResourceRequestError(
                f"{param[kind]}: {need[kind]:g} but the largest node has {_count(largest[kind], kind)}; lower it "
                "or add a bigger node")

    def fits(node: dict[str, float]) -> int:
        """How many of the requests ``node`` holds at once."""
        shares = [node.get(k, 0.0) / v for k, v in need.items() if v > 0]
        return int(min(shares) + 1e-9) if shares else count

    if not any(fits(n) for n in nodes):
        raise ResourceRequestError(
            f"{cpu_param}: {need['CPU']:g} with {gpu_param}: {need['GPU']:g}, but no node has both "
            f"{_count(need['CPU'], 'CPU')} and {_count(need['GPU'], 'GPU')}; lower one or add such a node")
    if count > 1:
        total = ray.cluster_resources()
        for kind in ("CPU", "GPU"):
            have = total.get(kind, 0.0)
            if count * need[kind] > have + 1e-9:
                raise ResourceRequestError(
                    f"{count_param}={count} with {_count(need[kind], kind)} each ({param[kind]}) needs "
                    f"{_count(count * need[kind], kind)}; the Ray cluster has {have:g}: lower {count_param} or "
                    f"{param[kind]}")
        held = sum(fits(n) for n in nodes)
        if held < count:
            each = _count(need["CPU"], "CPU") + (f" and {_count(need['GPU'], 'GPU')}" if need["GPU"] else "")
            named = cpu_param + (f", {gpu_param}" if need["GPU"] else "")
            raise ResourceRequestError(
                f"{count_param}={count} with {each} each ({named}): the Ray cluster's nodes hold only {held} at "
                f"once; lower {count_param} or {cpu_param}")


def ray_map(
    fn: Callable[..., R],
    items: Sequence[Any],
    *,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    desc: str = "tasks",
    max_retries: int = 3,
    on_result: Callable[[int, R], None] | None = None,
    resource_params: tuple[str, str] = ("resources.num_cpus", "resources.num_gpus"),
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
        resource_params: the params ``num_cpus`` and ``num_gpus`` come from, named
            when no node can hold a task (:func:`check_resources`).

    Returns:
        ``[fn(item) for item in items]``, computed in parallel.

    Raises:
        ResourceRequestError: no node of the cluster has ``num_cpus`` CPUs and ``num_gpus``
            GPUs (checked before any task is submitted).
        ClusterError: ``RAY_ADDRESS`` is set and the cluster cannot be joined.
        Whatever ``fn`` raised, re-raised in the driver (as ``ray.exceptions.RayTaskError``),
        and whatever ``on_result`` raised (the results not yet passed to it are then lost).
    """
    init_ray()
    gpus = effective_gpus(num_gpus)
    check_resources(num_cpus, gpus, cpu_param=resource_params[0], gpu_param=resource_params[1])
    remote = ray.remote(_timed_call).options(
        num_cpus=num_cpus, num_gpus=gpus, max_retries=max_retries,
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


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.distributed``: join ``RAY_ADDRESS`` (or start a local
    instance), print every node's resources, run one task per CPU (``--tasks``) and
    print the nodes that ran them. Exits 2 with ``error: <message>`` on a cluster that
    cannot be joined or cannot hold the tasks.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description="Check a Ray cluster the way a stage uses it.")
    parser.add_argument("--tasks", type=int, default=None, help="tasks of 1 CPU to run (default: one per CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        total = init_ray()
        for node in ray.nodes():
            if node.get("Alive"):
                res = node.get("Resources", {})
                print(f"node {node['NodeID'][:12]} at {node['NodeManagerAddress']}: {_count(res.get('CPU', 0), 'CPU')}, "
                      f"{_count(res.get('GPU', 0), 'GPU')}", flush=True)
        n = args.tasks if args.tasks is not None else max(1, int(total.get("CPU", 1)))
        ran_on = ray_map(_sleep_on_node, [0.5] * n, num_cpus=1, desc="check",
                         resource_params=("python -m pipeline.distributed's tasks", "num_gpus"))
    except (ClusterError, ResourceRequestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"{n} tasks ran on {_count(len(set(ran_on)), 'node')} of {_count(total.get('CPU', 0), 'CPU')} in all",
          flush=True)


def _sleep_on_node(seconds: float) -> str:
    """Sleep ``seconds`` (so that tasks spread over the nodes) and return the node it ran on."""
    time.sleep(seconds)
    return node_id()


if __name__ == "__main__":
    main()
