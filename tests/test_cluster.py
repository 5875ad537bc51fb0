"""A real two-node Ray cluster on 127.0.0.1 (:class:`pipeline.local_cluster.LocalCluster`:
``ray start --head`` plus ``ray start --address``, one CPU each, private temp dirs) runs
the smoke project's evaluate stage through both entry points, logging to the tests'
``mlflow server``:

* ``RAY_ADDRESS=... dvc repro``: the driver and the outputs stay here;
* ``ray job submit --working-dir``: the driver runs on the head node, in the copy of the
  project that Ray uploads; the outputs are written there.

Both must put tasks on both nodes (the node ids recorded in the MLflow run) and give
the numbers of the one-machine run. The cluster is stopped by the pids of its own
processes; nothing else on the machine is touched.

These tests meet the cluster as a user does: without the tests' own
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (``tests/conftest.py``), and drivers start from
the line ``python -m pipeline.local_cluster`` prints, in the environment of a new shell
(no token, no Ray settings). A resource request no node can hold stops a stage with one
line naming the param."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.local_cluster import LocalCluster, registered_token

pytestmark = pytest.mark.e2e
CELLS = ["none", "advp", "occlusion"]  # the cells recomputed on the cluster
EXPERIMENT = "cluster-test"  # on the same server as the smoke run, but not among its runs
ROOT = Path(__file__).resolve().parents[1]
NOT_IN_A_NEW_SHELL = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                      "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="module", autouse=True)
def as_users_meet_it():
    """This module runs without the Ray settings of tests/conftest.py (the loopback switch)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in NOT_IN_A_NEW_SHELL:
            mp.delenv(var, raising=False)
        yield


def new_shell(env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` as a user's new shell has it: none of the Ray settings, ``extra`` added."""
    return {**{k: v for k, v in env.items() if k not in NOT_IN_A_NEW_SHELL}, **extra}


def paste(line: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``line`` as pasted into a shell."""
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    if not Path("/proc/self/environ").exists():
        pytest.skip("LocalCluster finds its processes through /proc (Linux)")
    with LocalCluster(nodes=2, cpus_per_node=1) as c:
        yield c
    assert not c.pids(), "processes of the test cluster survived its stop"


def _project(smoke_project, tmp_path: Path) -> Path:
    """A copy of the finished smoke project whose evaluate recomputes three cells (their cache removed)."""
    work = tmp_path / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True, ignore=shutil.ignore_patterns("mlflow*.db", "mlruns"))
    shutil.rmtree(work / ".cache" / "evaluate", ignore_errors=True)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["attacks"] = CELLS
    params["mlflow"]["experiment"] = EXPERIMENT
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return work


def _evaluate_runs(uri: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    return [r for r in runs if r.data.tags.get("stage") == "evaluate"]


def _same_numbers(got: dict, want: dict) -> None:
    for defense in ("none", "fnc"):
        for attack in CELLS:
            assert got[defense][attack] == want[defense][attack], (defense, attack)


def test_ray_address_puts_tasks_on_both_nodes(cluster, smoke_project, mlflow_server, tmp_path):
    work = _project(smoke_project, tmp_path)
    before = {r.info.run_id for r in _evaluate_runs(mlflow_server)}
    # the line python -m pipeline.local_cluster prints, in a new shell: no token, no loopback switch
    env = new_shell(smoke_project["env"], MLFLOW_TRACKING_URI=mlflow_server, PYTHONPATH=str(work))
    proc = paste(cluster.driver_command("dvc repro evaluate"), work, env, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"joining Ray cluster at {cluster.address}" in proc.stderr
    (run,) = [r for r in _evaluate_runs(mlflow_server) if r.info.run_id not in before]
    assert len(run.data.tags["node_ids"].split(",")) == 2  # tasks landed on both nodes
    got = json.loads((work / "metrics" / "evaluate.json").read_text())["resnet20"]
    want = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    _same_numbers(got, want)


def test_ray_job_submit_runs_the_driver_on_the_head(cluster, smoke_project, mlflow_server, tmp_path):
    work = _project(smoke_project, tmp_path)
    before = {r.info.run_id for r in _evaluate_runs(mlflow_server)}
    # the line python -m pipeline.local_cluster prints, in a new shell; the job gets no variables of this
    # shell: the tracking server goes in the runtime env
    line = cluster.job_command("python -m dvc repro evaluate", env_vars={"MLFLOW_TRACKING_URI": mlflow_server})
    env = new_shell(cluster.env)
    for _ in range(24):  # the head's job agent takes a few seconds to come up after `ray start`
        proc = paste(line, work, env, timeout=1200)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(5)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    # the outputs were written in the job's copy on the head node; this copy is untouched
    assert not (work / ".cache" / "evaluate").exists()
    (copy,) = [p.parent.parent for p in Path(cluster.temp_dir).glob(
        "session_*/runtime_resources/working_dir_files/_ray_pkg_*/metrics/evaluate.json") if "session_latest" not in str(p)]
    got = json.loads((copy / "metrics" / "evaluate.json").read_text())["resnet20"]
    want = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    _same_numbers(got, want)
    lock = yaml.safe_load((copy / "dvc.lock").read_text())  # dvc.lock, too, is the job's copy's
    assert lock["stages"]["evaluate"]["params"]["params.yaml"]["evaluate"]["attacks"] == CELLS
    (run,) = [r for r in _evaluate_runs(mlflow_server) if r.info.run_id not in before]
    assert run.data.tags["attacks"] == ",".join(CELLS)  # the job logged to the same tracking server
    assert len(run.data.tags["node_ids"].split(",")) == 2
    assert os.environ.get("RAY_ADDRESS") is None  # nothing leaked into the test process


@pytest.mark.parametrize("stage, key, value", [("train_baseline", "train_num_cpus", 2), ("evaluate", "num_cpus", 8)])
def test_a_request_no_node_can_hold_stops_the_stage_with_one_line(cluster, smoke_project, mlflow_server, tmp_path,
                                                                   stage, key, value):
    work = _project(smoke_project, tmp_path)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["resources"][key] = value  # the smoke profile trains with 2 CPUs; these nodes have 1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = new_shell(smoke_project["env"], MLFLOW_TRACKING_URI=mlflow_server, PYTHONPATH=str(work))
    proc = paste(cluster.driver_command(f"python -m stages.{stage}"), work, env, timeout=600)  # a hang fails here
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {stage}: resources.{key}: {value} but the largest node has 1 CPU; lower it or add a bigger node")


def tiny_project(root: Path, env: dict[str, str]) -> Path:
    """A DVC project (in git) of one stage that runs two tasks on the cluster and writes
    ``metrics/check.txt``."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, env=env, check=True)
    (root / "metrics").mkdir()
    (root / "dvc.yaml").write_text(
        "stages:\n  check:\n    cmd: python -m pipeline.distributed --tasks 2 > metrics/check.txt\n"
        "    outs:\n      - metrics/check.txt:\n          cache: false\n")
    return root


def test_submit_runs_the_job_and_brings_its_results_back(cluster, tmp_path):
    """``python -m pipeline.submit --address <dashboard>``, as printed, from a new shell: the job's
    ``dvc repro`` ran on the head, and its ``dvc.lock`` and ``metrics/`` are here."""
    env = new_shell(cluster.env, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}")
    project = tiny_project(tmp_path / "project", env)
    proc = paste(cluster.submit_command(), project, env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Running stage 'check'" in proc.stdout  # the job's log, streamed
    assert "pipeline.submit results" not in out  # the packed results are not shown
    assert (project / "metrics" / "check.txt").read_text().splitlines()[-1] == \
        "2 tasks ran on 2 nodes of 2 CPUs in all"
    assert "check" in yaml.safe_load((project / "dvc.lock").read_text())["stages"]


def test_the_printed_lines_work_in_a_new_shell(tmp_path):
    """``python -m pipeline.local_cluster`` as the README says: the ``RAY_ADDRESS=...`` line it
    prints, pasted as it stands, runs ``dvc repro`` of a project whose stage joins the cluster;
    SIGTERM stops the cluster and removes its token."""
    env = new_shell(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    PYTHONPATH=str(ROOT))
    lines: list[str] = []
    cli = subprocess.Popen([sys.executable, "-m", "pipeline.local_cluster", "--nodes", "1", "--no-dashboard"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in cli.stdout:  # returns at EOF if it dies; the test's own timeout bounds a hang
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops it"):
                break
        drivers = [line.strip() for line in lines if line.strip().startswith("RAY_ADDRESS=")]
        assert len(drivers) == 1, "\n".join(lines)[-4000:]
        driver = drivers[0]
        address = shlex.split(driver)[0].split("=", 1)[1]
        assert driver == f"RAY_ADDRESS={address} dvc repro", lines

        project = tiny_project(tmp_path / "project", env)
        proc = paste(driver, project, env, timeout=600)  # exactly the printed line
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "joining as 127.0.0.1" in out and "using the auth token that pipeline.local_cluster registered" in out
        assert (project / "metrics" / "check.txt").read_text().splitlines()[-1] == \
            "2 tasks ran on 1 node of 1 CPU in all"
    finally:
        cli.terminate()  # SIGTERM: the command stops its cluster
        code = cli.wait(timeout=120)
    assert code == 0, lines
    port = int(address.rsplit(":", 1)[1])
    assert registered_token(port) is None
    with pytest.raises(OSError):  # the head is gone
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
