"""Fault tolerance: a Ray worker killed (SIGKILL, by the pid of the process running the
task) in the middle of the evaluate stage of the smoke pipeline; Ray retries the task
(``max_retries``) and the stage ends with the same metrics as the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import local_ray

pytestmark = pytest.mark.e2e


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _task_pids(name: str, ancestor: int) -> list[int]:
    """Pids of the Ray workers under ``ancestor`` (the stage process) running ``name``
    now; Ray titles them ``ray::<name>``. Other Ray instances on the machine are left alone."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    rows = [line.strip().split(None, 1) for line in out.splitlines()]
    return [int(r[0]) for r in rows if len(r) == 2 and r[1].startswith(f"ray::{name}")
            and _descends_from(int(r[0]), ancestor)]


def test_killed_worker_is_retried_with_the_same_metrics(smoke_project, tmp_path):
    work = tmp_path / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True)
    shutil.rmtree(work / ".cache" / "evaluate")  # every cell recomputed
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["attacks"] = ["none", "advp", "lavan", "occlusion"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**local_ray(smoke_project["env"]), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'side.db'}",
           "PYTHONPATH": str(work)}  # its own Ray instance: the workers are the stage's descendants
    proc = subprocess.Popen([sys.executable, "-m", "stages.evaluate"], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and killed is None and time.monotonic() < deadline:
        pids = _task_pids("evaluate_task", proc.pid)
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=900)
    assert killed is not None, f"no evaluate_task worker was seen running:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    got = json.loads((work / "metrics" / "evaluate.json").read_text())["resnet20"]
    want = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    for defense in ("none", "fnc"):
        for attack in params["evaluate"]["attacks"]:
            assert got[defense][attack] == want[defense][attack], (defense, attack)
