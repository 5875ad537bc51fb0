"""A real two-node Ray cluster on 127.0.0.1 (:class:`pipeline.local_cluster.LocalCluster`:
``ray start --head`` plus ``ray start --address``, one CPU each, private temp dirs) runs
the smoke project's evaluate stage through both entry points, logging to the tests'
``mlflow server``:

* ``RAY_ADDRESS=... dvc repro``: the driver and the outputs stay here;
* ``ray job submit --working-dir``: the driver runs on the head node, in the copy of the
  project that Ray uploads; the outputs are written there.

Both must put tasks on both nodes (the node ids recorded in the MLflow run) and give
the numbers of the one-machine run. The cluster is stopped by the pids of its own
processes; nothing else on the machine is touched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.local_cluster import LocalCluster

pytestmark = pytest.mark.e2e
CELLS = ["none", "advp", "occlusion"]  # the cells recomputed on the cluster
EXPERIMENT = "cluster-test"  # on the same server as the smoke run, but not among its runs


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
    env = {**smoke_project["env"], **{k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
           "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(work)}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
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
    # the job gets no variables of this shell: the tracking server goes in the runtime env
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": "."},
                   "excludes": [".venv", "mlflow*.db", "mlruns"]}
    # upload the DVC outputs (git-ignored) and .git (DVC needs it) with the code, as the README says
    env = {**cluster.env, "RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES": ""}
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(work),
           "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "dvc", "repro", "evaluate"]
    for _ in range(24):  # the head's job agent takes a few seconds to come up after `ray start`
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
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
