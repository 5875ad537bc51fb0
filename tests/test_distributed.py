"""Ray plumbing: ``ray_map`` results and the compute intervals a stage reports; resource
requests no node can hold, addresses that cannot be joined, and SIGTERM, each stopping a
stage with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import distributed
from pipeline.distributed import busy_seconds


def test_busy_seconds_is_the_union_of_intervals():
    assert busy_seconds([]) == 0
    assert busy_seconds([(0, 2), (1, 3)]) == 3  # overlapping: counted once
    assert busy_seconds([(5, 6), (0, 1)]) == 2  # disjoint, in any order
    assert busy_seconds([(0, 10), (2, 3), (4, 5)]) == 10  # nested


def _sleep_and_title(seconds: float) -> tuple[float, str]:
    time.sleep(seconds)
    return seconds, open(f"/proc/{os.getpid()}/cmdline").read().replace("\0", " ")


def test_ray_map_keeps_order_names_tasks_and_records_intervals(ray_local, monkeypatch):
    monkeypatch.setattr(distributed, "COMPUTE_INTERVALS", [])
    results = distributed.ray_map(_sleep_and_title, [0.3, 0.1, 0.2], num_cpus=1, desc="sleep")
    assert [r[0] for r in results] == [0.3, 0.1, 0.2]
    # workers carry the function's name in their title (what the fault-tolerance test looks for)
    assert all(r[1].startswith("ray::_sleep_and_title") for r in results), results
    intervals = distributed.COMPUTE_INTERVALS
    assert len(intervals) == 3
    assert sorted(round(end - start, 1) for start, end in intervals) == [0.1, 0.2, 0.3]


def test_stage_stats_file(tmp_path, monkeypatch):
    from pipeline import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "STAGE_STATS", tmp_path / "stats")
    monkeypatch.setattr(distributed, "COMPUTE_INTERVALS", [(100.0, 101.0), (100.5, 102.0)])
    stats = cli.stage_stats("train_defended@fnc", 99.0, 4.0)
    on_disk = json.loads((tmp_path / "stats" / "train_defended@fnc.json").read_text())
    assert on_disk == stats
    assert stats["compute_seconds"] == 2.0 and stats["task_seconds"] == 2.5 and stats["tasks"] == 2
    peak_kib = int(subprocess.run(["grep", "VmHWM", f"/proc/{os.getpid()}/status"], capture_output=True,
                                  text=True).stdout.split()[1])
    assert stats["driver_peak_rss_mib"] == pytest.approx(peak_kib / 1024, rel=0.05)


def _sleep_then_square(item: tuple[int, float]) -> int:
    time.sleep(item[1])
    return item[0] ** 2


def test_ray_map_hands_each_result_to_on_result_as_its_task_ends(ray_local):
    seen: list[tuple[int, int, float]] = []
    items = [(1, 2.0), (2, 0.0), (3, 0.0)]  # 2 CPUs: the first task ends long after the other two
    results = distributed.ray_map(_sleep_then_square, items, num_cpus=1,
                                  on_result=lambda i, r: seen.append((i, r, time.monotonic())))
    returned = time.monotonic()
    assert results == [1, 4, 9]
    assert sorted((i, r) for i, r, _ in seen) == [(0, 1), (1, 4), (2, 9)]  # once per item, its own result
    assert seen[-1][0] == 0  # in the order tasks finish, not the input order
    assert returned - seen[0][2] > 1.0  # the first finished result was handed over while the slow task still ran


def test_ray_map_raises_what_on_result_raised(ray_local):
    def fail(i, r):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        distributed.ray_map(_sleep_then_square, [(1, 0.0)], num_cpus=1, on_result=fail)


# --- resource requests no node can hold, clusters that cannot be joined, SIGTERM ---------------------------

ROOT = Path(__file__).resolve().parents[1]


def _touch(path: str) -> None:
    Path(path).touch()


def test_a_request_no_node_can_hold_stops_before_submitting(ray_local, tmp_path, monkeypatch):
    from pipeline.config import ParamsError

    with pytest.raises(distributed.ResourceRequestError) as exc:
        distributed.check_resources(4, cpu_param="resources.train_num_cpus", gpu_param="resources.train_num_gpus")
    assert isinstance(exc.value, ParamsError)  # run_stage prints it as one line
    assert str(exc.value) == ("resources.train_num_cpus: 4 but the largest node has 2 CPUs; lower it or add a "
                              "bigger node")
    marker = tmp_path / "ran"
    with pytest.raises(distributed.ResourceRequestError, match=r"^resources.num_cpus: 3 but the largest node has 2"):
        distributed.ray_map(_touch, [str(marker)], num_cpus=3)
    assert not marker.exists()  # nothing was submitted
    with pytest.raises(distributed.ResourceRequestError,
                       match=r"^train.workers=3 with 1 CPU each \(resources.train_num_cpus\) needs 3 CPUs; the Ray "
                             r"cluster has 2: lower train.workers or resources.train_num_cpus$"):
        distributed.check_resources(1, cpu_param="resources.train_num_cpus", count=3, count_param="train.workers")
    distributed.check_resources(1, count=2, count_param="train.workers")  # fits: no error
    monkeypatch.setenv(distributed.RESOURCE_CHECK_ENV, "0")  # an autoscaling cluster: left to Ray
    distributed.check_resources(4)


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's new shell: none of the tests' Ray settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_an_address_where_nothing_answers_is_one_line():
    from pipeline.local_cluster import free_port

    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "pipeline.distributed"], env=_user_env(RAY_ADDRESS=address),
                          capture_output=True, text=True, timeout=120)  # a hang fails here
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: RAY_ADDRESS={address}: nothing answers at {address} (Connection refused); "
                           "start the cluster there"), proc.stderr[-3000:]


def test_run_stage_prints_a_cluster_error_as_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.cli import run_stage

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:notaport")
    with pytest.raises(SystemExit) as stop:
        run_stage("evaluate", lambda params: distributed.init_ray())
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: evaluate: RAY_ADDRESS=127.0.0.1:notaport: expected <host>:<port> (e.g. 127.0.0.1:6379); "
                   "fix or unset it")


STAGE = """
import sys, time
from pipeline.cli import run_stage
from pipeline.distributed import init_ray

def main(params):
    print("main started", file=sys.stderr, flush=True)
    init_ray() if sys.argv[1] == "join" else time.sleep(600)

run_stage("probe", main)
"""


@pytest.fixture
def silent_listener():
    """A TCP port of 127.0.0.1 that accepts connections and never answers (Ray's GCS client
    then waits in C++ code, where Python runs no signal handler, for tens of seconds)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("where", ["sleep", "join"])
def test_sigterm_stops_a_stage(where, silent_listener, tmp_path):
    """SIGTERM stops a stage in Python code (its handler) and one blocked inside Ray's
    C++ code joining a cluster (the watchdog), each with one line and status 143."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "stage.py").write_text(STAGE)
    env = _user_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}", RAY_ADDRESS=f"127.0.0.1:{silent_listener}")
    log_path = tmp_path / "stage.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "stage.py", where], cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        wait_for = "main started" if where == "sleep" else "Connecting to existing Ray cluster"
        deadline = time.monotonic() + 120
        while wait_for not in log_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(2)  # well inside the blocking call
        proc.terminate()
        code = proc.wait(timeout=90)  # a stage that ignores SIGTERM fails here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert code == 143, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    want = "error: probe: stopped by SIGTERM" if where == "sleep" else \
        "error: probe: still running 10 s after SIGTERM (blocked in Ray?); exiting without cleanup"
    assert errors == [want], out[-3000:]
