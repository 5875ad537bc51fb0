"""A multi-node Ray cluster on this machine, every process bound to 127.0.0.1.

To try (and test) the cluster path of the pipeline without a second machine:
``ray start --head`` plus ``nodes - 1`` more ``ray start --address=...`` nodes, each
with its own CPUs, all with a private ``--temp-dir``, then ``RAY_ADDRESS=... dvc repro``
or ``ray job submit``. Run it from the command line::

    python -m pipeline.local_cluster --nodes 2 --cpus-per-node 1

which prints the ``RAY_ADDRESS`` and the job-submission address, and stops the
cluster's processes (only those) on Ctrl-C.

Loopback only. On Linux, Ray turns ``--node-ip-address=127.0.0.1`` into the machine's
reachable address as soon as multi-node clusters are enabled
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``), and its servers then listen on every
interface. Here the head starts with that switch off (so it keeps 127.0.0.1 and
binds there), and every further node starts through ``ray start`` with the switch on
but with Ray's localhost resolution (``ray._private.services.resolve_ip_for_localhost``,
a private function: checked against Ray 2.60) left out, so that it, too, joins as
127.0.0.1. A real cluster needs none of this: plain ``ray start`` on each machine.

Token authentication: ``ray start`` enables Ray's token authentication; the cluster
gets a fresh random token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``), which
:attr:`LocalCluster.env` carries for drivers and ``ray job submit``.

Stopping: each ``ray start`` runs in a new session (``setsid``), and every process it
launches (GCS, raylet, agents, workers) stays in that session; :meth:`LocalCluster.stop`
signals exactly the processes of the cluster's sessions (read from ``/proc/<pid>/stat``,
so Linux only), never a machine-wide ``ray stop``. (The environment is no way to
recognise them: Ray's processes rewrite their title over it.)
"""

from __future__ import annotations

import argparse
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

__all__ = ["LocalCluster", "free_port"]

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
        for i in range(1, self.nodes):  # each node its own session folder, as on separate machines (a shared
            # one would let one node's runtime-env cleanup delete a working_dir another node is using)
            node_dir = Path(self.temp_dir) / f"n{i}"
            node_dir.mkdir(exist_ok=True)
            self._ray_start(["start", f"--address={self.address}", f"--temp-dir={node_dir}", *common, *own_ports()],
                            "1", join_as_loopback=True)
        return self

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


def main() -> None:
    """Start a local cluster, print how to use it, stop it on Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args()
    with LocalCluster(args.nodes, args.cpus_per_node) as cluster:
        print(f"{args.nodes} nodes on 127.0.0.1, session files in {cluster.temp_dir}\n"
              f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.env['RAY_AUTH_TOKEN']}\n"
              f"  RAY_ADDRESS={cluster.address} dvc repro\n"
              f"  ray job submit --address {cluster.dashboard_url} --working-dir . -- dvc repro\n"
              "Ctrl-C stops it.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
