"""A multi-node Ray cluster on this machine, every process bound to 127.0.0.1.

To try (and test) the cluster path of the pipeline without a second machine:
``ray start --head`` plus ``nodes - 1`` more ``ray start --address=...`` nodes, each
with its own CPUs, all with a private ``--temp-dir``, then ``RAY_ADDRESS=... dvc repro``
or ``ray job submit``. Run it from the command line::

    python -m pipeline.local_cluster --nodes 2 --cpus-per-node 1

which prints a ``RAY_ADDRESS=127.0.0.1:<port> dvc repro`` line to paste as it
stands into another shell of this machine (:meth:`LocalCluster.driver_command`), a
``python -m pipeline.submit --address http://127.0.0.1:<port>`` line that runs the
same as a Ray job (:meth:`LocalCluster.submit_command`; the plain ``ray job submit``
equivalent: :meth:`LocalCluster.job_command`), and stops the cluster's processes
(only those) on Ctrl-C or SIGTERM.

Loopback only. On Linux, Ray turns ``--node-ip-address=127.0.0.1`` into the machine's
reachable address as soon as multi-node clusters are enabled
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``), and its servers then listen on every
interface. Here the head starts with that switch off (so it keeps 127.0.0.1 and
binds there), and every further node starts through ``ray start`` with the switch on
but with Ray's localhost resolution (``ray._private.services.resolve_ip_for_localhost``,
a private function: checked against Ray 2.60) left out, so that it, too, joins as
127.0.0.1. A real cluster needs none of this: plain ``ray start`` on each machine.

A driver in another shell needs nothing more than ``RAY_ADDRESS``:
:func:`pipeline.distributed.init_ray` sees that ``127.0.0.1:<port>`` listens on the
loopback interface only and joins it as 127.0.0.1 (Ray would substitute the machine's
address, where nothing listens, and retry for minutes).

Token authentication: ``ray start`` enables Ray's token authentication; the cluster
gets a fresh random token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), which
:attr:`LocalCluster.env` carries for drivers and ``ray job submit``. The token is also
registered for the head's port and the dashboard's in a folder of this user only
(:func:`registry_dir`: mode 0700, the files 0600), where
:func:`pipeline.distributed.init_ray` finds it for a driver given just
``RAY_ADDRESS=127.0.0.1:<port>`` (and ``python -m pipeline.submit`` for
``--address http://127.0.0.1:<dashboard port>``); :meth:`LocalCluster.stop` removes them.

Stopping: each ``ray start`` runs in a new session (``setsid``), and every process it
launches (GCS, raylet, agents, workers) stays in that session; :meth:`LocalCluster.stop`
signals exactly the processes of the cluster's sessions (read from ``/proc/<pid>/stat``,
so Linux only), never a machine-wide ``ray stop``. (The environment is no way to
recognise them: Ray's processes rewrite their title over it.)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "free_port", "registered_token", "registry_dir", "use_registered_token"]

JOB_EXCLUDES = [".venv", "mlflow*.db", "mlruns"]
"""What ``ray job submit`` leaves out of the project upload (README, Cluster)."""

_JOIN_AS_LOOPBACK = (
    "import sys, ray._private.services as services\n"
    "services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 (see pipeline.local_cluster)\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "main()\n"
)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_dir() -> Path:
    """Where local clusters register their tokens: ``<tmp>/pipeline-ray-<uid>``."""
    return Path(tempfile.gettempdir()) / f"pipeline-ray-{os.getuid()}"


def registered_token(port: int) -> Path | None:
    """The token file a :class:`LocalCluster` of this user registered for ``port``.

    Args:
        port: the port of the head (the ``RAY_ADDRESS`` port) or of its dashboard.

    Returns:
        The file's path, or None when there is none, or when the folder or the file
        is not this user's alone (then it is not trusted).
    """
    folder, path = registry_dir(), registry_dir() / f"{port}.token"
    try:
        for entry, mode in ((folder, 0o077), (path, 0o077)):
            st = entry.lstat()
            if st.st_uid != os.getuid() or st.st_mode & mode or entry.is_symlink():
                return None
    except OSError:
        return None
    return path


def use_registered_token(port: int) -> Path | None:
    """Authenticate this process to Ray with the token registered for ``port``
    (:func:`registered_token`), unless it has one in ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``.

    Sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``; when Ray is already imported
    it read both at import, so its config and token cache are reloaded (as ``ray.init``
    does for a token it creates).

    Args:
        port: the head's port (``RAY_ADDRESS``) or the dashboard's.

    Returns:
        The token file used, or None (a token of this shell, or none registered).
    """
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = registered_token(port)
    if path is None:
        return None
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    if "ray._raylet" in sys.modules:
        try:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except (ImportError, AttributeError):  # another Ray: the variables alone
            pass
    return path


class LocalCluster:
    """``nodes`` Ray nodes on 127.0.0.1, each with ``cpus_per_node`` CPUs (a context manager).

    Args:
        nodes: number of nodes (>= 1); the first is the head.
        cpus_per_node: CPUs each node offers (>= 1).
        temp_dir: Ray's session folder of the head; node ``i`` > 0 uses ``<temp_dir>/n<i>``
            (short paths only: Ray's socket paths are length-limited); default a fresh
            folder under /tmp, removed by :meth:`stop`.
        dashboard: start the dashboard on the head (needed by ``ray job submit``).

    Attributes (after :meth:`start`):
        address: ``127.0.0.1:<port>``, the ``RAY_ADDRESS`` of drivers.
        dashboard_url: ``http://127.0.0.1:<port>``, the ``--address`` of ``ray job submit``
            (None without the dashboard).
        env: environment for drivers and the ``ray`` CLI: the auth token and usage
            stats off (``RAY_ADDRESS`` is not set in it).

    Raises:
        ValueError: ``nodes`` or ``cpus_per_node`` below 1.
        RuntimeError: a ``ray start`` failed (its output in the message); the nodes
            already started are stopped first.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, temp_dir: str | None = None,
                 dashboard: bool = True) -> None:
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError(f"LocalCluster: nodes and cpus_per_node must be >= 1, got {nodes}, {cpus_per_node}")
        self.nodes, self.cpus_per_node, self.dashboard = nodes, cpus_per_node, dashboard
        self._own_temp = temp_dir is None
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="rayc", dir="/tmp")
        self._sessions: set[int] = set()
        self._token_files: list[Path] = []
        self.address = ""
        self.dashboard_url: str | None = None
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)

    def _ray_start(self, argv: list[str], cluster_switch: str, join_as_loopback: bool) -> None:
        cmd = [sys.executable, "-c", _JOIN_AS_LOOPBACK, *argv] if join_as_loopback else \
            [sys.executable, "-m", "ray.scripts.scripts", *argv]
        env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": cluster_switch}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self._sessions.add(proc.pid)  # the new session's id is its leader's pid
        output, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"`ray {' '.join(argv)}` failed:\n{output[-3000:]}")

    def start(self) -> LocalCluster:
        """Start the head, then the other nodes; return ``self``."""
        port = free_port()
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
                  "--disable-usage-stats"]
        # fixed default ports (the agent's HTTP server: 52365) would clash with another Ray on this machine
        own_ports = lambda: [f"--dashboard-agent-listen-port={free_port()}"]  # noqa: E731
        head = ["start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={free_port()}", *common, *own_ports()]
        if self.dashboard:
            dash = free_port()
            head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
            self.dashboard_url = f"http://127.0.0.1:{dash}"
        else:
            head += ["--include-dashboard=false"]
        self._ray_start(head, "0", join_as_loopback=False)
        self.address = f"127.0.0.1:{port}"
        self._register_token(port)
        if self.dashboard_url:  # for python -m pipeline.submit --address <dashboard_url>
            self._register_token(int(self.dashboard_url.rsplit(":", 1)[1]))
        for i in range(1, self.nodes):  # each node its own session folder, as on separate machines (a shared
            # one would let one node's runtime-env cleanup delete a working_dir another node is using)
            node_dir = Path(self.temp_dir) / f"n{i}"
            node_dir.mkdir(exist_ok=True)
            self._ray_start(["start", f"--address={self.address}", f"--temp-dir={node_dir}", *common, *own_ports()],
                            "1", join_as_loopback=True)
        return self

    def _register_token(self, port: int) -> None:
        """Write the token to ``registry_dir()/<port>.token`` (this user only)."""
        folder = registry_dir()
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.lstat().st_uid != os.getuid() or folder.is_symlink():
            return  # someone else's folder: no registration, drivers need RAY_AUTH_TOKEN
        os.chmod(folder, 0o700)
        path = folder / f"{port}.token"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.env["RAY_AUTH_TOKEN"])
        self._token_files.append(path)

    def driver_command(self, command: str = "dvc repro") -> str:
        """The shell line that runs ``command`` as a driver of this cluster from any shell
        of this machine: ``RAY_ADDRESS=127.0.0.1:<port> <command>`` (what :func:`main` prints).

        Args:
            command: the driver's command line.

        Returns:
            The line; it needs the cluster's token registered (:meth:`start` does that).
        """
        return f"RAY_ADDRESS={self.address} {command}"

    def job_command(self, command: str = "dvc repro", env_vars: dict[str, str] | None = None) -> str:
        """The shell line that submits ``command`` as a Ray job from the project's root: the
        token, the upload of ``.git`` and the DVC outputs (README, Cluster) and the job's
        environment, then ``ray job submit`` (what :func:`main` prints).

        Args:
            command: the job's command line.
            env_vars: more variables of the job's environment (e.g. ``MLFLOW_TRACKING_URI``:
                the job gets none of the submitting shell's).

        Returns:
            The line (its ``--address`` is :attr:`dashboard_url`: start the cluster with the dashboard).
        """
        runtime_env = {"excludes": JOB_EXCLUDES,
                       "env_vars": {"DVC_NO_ANALYTICS": "1", "PYTHONPATH": ".", **(env_vars or {})}}
        return (f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']} "
                "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES= RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 "
                f"ray job submit --address {self.dashboard_url} --working-dir . "
                f"--runtime-env-json '{json.dumps(runtime_env)}' -- {command}")

    def submit_command(self, command: str = "") -> str:
        """The shell line that runs ``dvc repro`` (or ``command``) as a Ray job on this cluster
        and brings ``dvc.lock``, ``metrics/`` and ``plots/`` back (:mod:`pipeline.submit`;
        what :func:`main` prints).

        Args:
            command: the job's command line; empty: ``dvc repro``.

        Returns:
            The line; it needs the dashboard's token registered (:meth:`start` does that).
        """
        return f"python -m pipeline.submit --address {self.dashboard_url}" + (f" -- {command}" if command else "")

    def pids(self) -> list[int]:
        """Pids of the live (not zombie) processes in this cluster's sessions (Linux ``/proc``)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                state, session = _state_and_session(int(entry.name))
                if session in self._sessions and state != "Z":
                    found.append(int(entry.name))
        return found

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM this cluster's processes, SIGKILL what is left after ``grace_s``,
        and remove the temp dir if this object made it."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                time.sleep(0.2)
                pids = [p for p in pids if _state_and_session(p)[0] not in ("", "Z")]
        for path in self._token_files:
            path.unlink(missing_ok=True)
        self._token_files = []
        if self._own_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _state_and_session(pid: int) -> tuple[str, int]:
    """``(state letter, session id)`` of ``pid`` from ``/proc/<pid>/stat``; ``("", -1)`` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, IndexError, ValueError):
        return "", -1


def main(argv: list[str] | None = None) -> None:
    """Start a local cluster, print how to use it, stop it on Ctrl-C, SIGTERM or SIGHUP.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--no-dashboard", action="store_true", help="no dashboard (and so no ray job submit)")
    args = parser.parse_args(argv)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop the cluster, not just this process
        signal.signal(sig, stop)
    cluster = LocalCluster(args.nodes, args.cpus_per_node, dashboard=not args.no_dashboard)
    try:  # not `with`: a signal during start() must stop the nodes already started, too
        cluster.start()
        nodes = f"{args.nodes} node" + ("" if args.nodes == 1 else "s")
        cpus = f"{args.cpus_per_node} CPU" + ("" if args.cpus_per_node == 1 else "s")
        lines = [f"{nodes} on 127.0.0.1 ({cpus} each), session files in {cluster.temp_dir}",
                 "Run the pipeline on it from the project's root, in any shell of this machine:",
                 f"  {cluster.driver_command()}"]
        if cluster.dashboard_url:
            lines += ["or as a Ray job, dvc.lock, metrics/ and plots/ brought back here:",
                      f"  {cluster.submit_command()}"]
        print("\n".join([*lines, "Ctrl-C stops it."]), flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        cluster.stop()


if __name__ == "__main__":
    main()
