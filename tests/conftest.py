"""Shared fixtures. Nothing here reaches the network: DVC analytics and Ray
usage stats are off, Ray binds to 127.0.0.1 with its own temporary folder,
MLflow writes to a SQLite file in a temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipeline import tracking
from pipeline.local_cluster import LocalCluster

os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray instances on 127.0.0.1 only (pipeline.distributed)

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"


def _copy_project(dst: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored project files into ``dst``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def stage_env(workdir: Path) -> dict[str, str]:
    """Environment of a pipeline run inside ``workdir``: its own MLflow store and Ray folder."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow-test.db'}",
        "RAY_TMPDIR": str(ray_tmp),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(workdir),
    }




@pytest.fixture
def ray_local(monkeypatch):
    """A private local Ray instance (2 CPUs, 127.0.0.1, its own temp dir), shut down after the test."""
    import ray

    from pipeline import distributed

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are length-limited
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    distributed.init_ray(num_cpus=2)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on a free port of 127.0.0.1, with its own SQLite store and
    artifact folder; stopped at the end by the process group it was started in."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    try:
        with tracking.mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder, folder / "artifacts") as uri:
            yield uri
    except RuntimeError as exc:
        pytest.fail(str(exc))


def _write_profile(work: Path, profile: str) -> dict:
    """Copy ``params/<profile>.yaml`` over ``params.yaml`` in ``work``, reading the shared CIFAR-10."""
    params = yaml.safe_load((work / "params" / f"{profile}.yaml").read_text())
    params["data"]["root"] = str(SHARED_CIFAR)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def _repro(work: Path, env: dict[str, str], *targets: str) -> str:
    """``dvc repro [targets]`` in ``work``; its log (also written to ``work/repro.log``). Fails the test on an error."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], cwd=work, env=env,
                          capture_output=True, text=True, timeout=2400)
    log = proc.stdout + proc.stderr
    (work / "repro.log").write_text(log)
    assert proc.returncode == 0, f"dvc repro failed:\n{log[-5000:]}"
    return log


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head on 127.0.0.1 (:class:`pipeline.local_cluster.LocalCluster`, every core of
    this machine, no dashboard) that the DAG fixtures' stages join through ``RAY_ADDRESS``,
    as on a cluster, instead of each starting and stopping its own instance (about 5-10 s a
    stage, over some 50 stage runs). Stopped at the end by the pids of its own processes.
    Tests of a stage on a machine alone use :func:`local_ray` on the environment."""
    with LocalCluster(nodes=1, cpus_per_node=os.cpu_count() or 2, dashboard=False) as cluster:
        yield cluster


HEAD_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
"""The variables that make a stage join the shared head (:func:`joined`, :func:`local_ray`)."""


def joined(env: dict[str, str], cluster: LocalCluster) -> dict[str, str]:
    """``env`` with ``RAY_ADDRESS`` and the auth token of ``cluster``: stages join it."""
    return {**env, "RAY_ADDRESS": cluster.address, **{k: cluster.env[k] for k in HEAD_ENV[1:]}}


def local_ray(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the shared head: a stage started with it runs its own local Ray instance
    (the tests that kill a stage's workers find them among the stage's own processes)."""
    return {k: v for k, v in env.items() if k not in HEAD_ENV}


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory, mlflow_server, ray_head):
    """One ``dvc repro`` of the smoke profile on the shared CIFAR-10 archives,
    in a copy of the project, shared by every test that needs a finished run; every
    stage logs to the real MLflow server of :func:`mlflow_server` (``MLFLOW_TRACKING_URI``)."""
    if not (SHARED_CIFAR / "train.zip").is_file():
        pytest.skip(f"{SHARED_CIFAR} not found (the shared CIFAR-10 archives)")
    work = tmp_path_factory.mktemp("smoke")
    _copy_project(work)
    params = _write_profile(work, "smoke")
    git(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "smoke")
    env = joined({**stage_env(work), "MLFLOW_TRACKING_URI": mlflow_server}, ray_head)
    log = _repro(work, env)
    yield {"dir": work, "env": env, "params": params, "log": log}
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)  # the Ray session folder this fixture made


@pytest.fixture(scope="session")
def defenses_project(smoke_project, tmp_path_factory, ray_head):
    """The smoke project copied after its run, switched to ``params/smoke-defenses.yaml``
    (every defense as a defended model) and reproduced up to ``evaluate``: data and baseline
    are reused; the patches (one seed), the defended models and evaluate run. The analyses and
    the report are left out (CI time): the smoke run covers those stages, and the masking
    analysis is tested on its own models (tests/test_masking.py)."""
    work = tmp_path_factory.mktemp("defenses") / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True)
    params = _write_profile(work, "smoke-defenses")
    env = joined(stage_env(work), ray_head)  # its own SQLite store in the copy
    log = _repro(work, env, "evaluate")
    yield {"dir": work, "env": env, "params": params, "log": log}
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
