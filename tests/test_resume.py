"""Resume per task: every finished task's result is cached as soon as it arrives
(``ray_map(on_result=...)``), so a stage stopped in the middle of a phase reruns only
the tasks that had not finished, and ends with the metrics of an uninterrupted run.

The fast test stops the evaluate stage (serial, in this process) by an exception after a
few tasks of each phase; the e2e test kills the real stage process of the smoke
project, and its Ray workers, with SIGKILL once a task of the per-image phase has
finished."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from tests import test_adaptive_patches as adaptive
from tests.conftest import local_ray
from tests.test_fault_tolerance import _descends_from

project = adaptive.project  # a tiny prepared project: data, a baseline, an FNC model, one patch


def _use_map(monkeypatch, ray_map) -> None:
    """Every fan-out of the evaluation (the matrix's own and :func:`pipeline.cached.cached_map`'s) through ``ray_map``."""
    from pipeline import cached, matrix

    for module in (matrix, cached):
        monkeypatch.setattr(module, "ray_map", ray_map)
        monkeypatch.setattr(module, "init_ray", lambda: None)


class Stopped(Exception):
    """What stops the stage in the fast test, in place of SIGKILL."""


def _map(calls: list[tuple[str, int]], stop: tuple[str, int] | None = None):
    """A serial ``ray_map`` recording ``(task name, number of items)`` per call; with
    ``stop=(name, n)``, a call of task ``name`` stops the stage after ``n`` results."""

    def ray_map(fn, items, on_result=None, **_):
        calls.append((fn.__name__, len(items)))
        results = []
        for i, item in enumerate(items):
            if stop is not None and fn.__name__ == stop[0] and i == stop[1]:
                raise Stopped(f"{fn.__name__} stopped after {i} of {len(items)} tasks")
            results.append(fn(item))
            if on_result is not None:
                on_result(i, results[-1])
        return results

    return ray_map


def test_a_stopped_evaluation_reruns_only_the_unfinished_tasks(project, monkeypatch):
    stage = project["stage"]
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["evaluate"].update(attacks=["none", "advp", "occlusion", "fgsm", "pgd"], num_shards=2)
    raw["attacks"]["pgd"].update(steps=2)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params("params.yaml")

    calls: list[tuple[str, int]] = []
    _use_map(monkeypatch, _map(calls))
    stage.main(params)  # uninterrupted: 2 defenses x 2 shards, then 2 defenses x 2 attacks x 2 shards
    assert calls == [("evaluate_task", 4), ("attack_task", 8)]
    want = json.loads(Path("metrics/evaluate.json").read_text())
    shutil.rmtree(".cache/evaluate")
    Path("metrics/evaluate.json").unlink()

    calls.clear()
    _use_map(monkeypatch, _map(calls, stop=("evaluate_task", 1)))
    with pytest.raises(Stopped):
        stage.main(params)
    assert calls == [("evaluate_task", 4)]

    calls.clear()
    _use_map(monkeypatch, _map(calls, stop=("attack_task", 3)))
    with pytest.raises(Stopped):
        stage.main(params)
    assert calls == [("evaluate_task", 3), ("attack_task", 8)]  # the finished patch task is not redone

    calls.clear()
    _use_map(monkeypatch, _map(calls))
    stage.main(params)
    assert calls == [("attack_task", 5)]  # every patch cell complete, 3 of 8 attack shards reused
    assert json.loads(Path("metrics/evaluate.json").read_text()) == want

    calls.clear()
    stage.main(params)  # everything cached: no task at all
    assert calls == []
    assert json.loads(Path("metrics/evaluate.json").read_text()) == want


def test_adaptive_starts_are_cached_as_each_ends(project, monkeypatch):
    stage = project["stage"]
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["evaluate"].update(attacks=["none", "advp", "advp_adaptive"])
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params("params.yaml")
    calls: list[tuple[str, int]] = []
    _use_map(monkeypatch, _map(calls, stop=("patch_task", 1)))
    with pytest.raises(Stopped):
        stage.main(params)
    assert calls == [("patch_task", 2)]  # fnc x advp_adaptive x seed 0 x (warm, random_1)
    assert len(list(Path(".cache/evaluate_patches").glob("*/result.pt"))) == 1
    calls.clear()
    _use_map(monkeypatch, _map(calls))
    stage.main(params)
    assert calls[0] == ("patch_task", 1)


def test_patches_are_cached_as_each_ends(project, monkeypatch):
    import stages.generate_patches as stage

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["patch"].update(seeds=[0, 1])
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params("params.yaml")
    calls: list[tuple[str, int]] = []
    _use_map(monkeypatch, _map(calls, stop=("patch_task", 1)))
    with pytest.raises(Stopped):
        stage.main(params)
    assert calls == [("patch_task", 2)]  # advp x seeds 0, 1
    calls.clear()
    _use_map(monkeypatch, _map(calls))
    stage.main(params)
    assert calls == [("patch_task", 1)]
    assert sorted(p.name for p in Path("patches/resnet20/advp").glob("seed_*.pt")) == ["seed_0.pt", "seed_1.pt"]


# --- e2e: SIGKILL of the real stage process ------------------------------------------------

PER_IMAGE = ["fgsm", "pgd", "mask_fgsm", "deepfool"]
TO_RUN = re.compile(r"per-image attacks \(defense x attack x shard\): (\d+) task\(s\) to run")


def _descendants(ancestor: int) -> set[int]:
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    return {p for p in pids if p != ancestor and _descends_from(p, ancestor)}


def _kill_tree(root: int) -> int:
    """SIGSTOP ``root`` and every process under it (until no new one appears, so that none
    forks away), then SIGKILL them all, ``root`` first. Only ``root``'s descendants are
    touched. Returns how many processes were killed."""
    os.kill(root, signal.SIGSTOP)
    stopped = {root}
    while True:
        new = _descendants(root) - stopped
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
            stopped.add(pid)
    for pid in [root, *(stopped - {root})]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(stopped)


def _cache_files(work: Path) -> int:
    return sum(1 for _ in (work / ".cache" / "evaluate").rglob("*.pt"))


@pytest.mark.e2e
def test_evaluate_killed_mid_phase_reruns_only_unfinished_tasks(smoke_project, tmp_path):
    work = tmp_path / "project"
    shutil.copytree(smoke_project["dir"], work, symlinks=True)
    shutil.rmtree(work / ".cache" / "evaluate")  # every cell recomputed
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["evaluate"]["attacks"] = PER_IMAGE
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**local_ray(smoke_project["env"]), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'side.db'}",
           "PYTHONPATH": str(work)}  # its own Ray instance: killing the stage kills its workers

    with (work / "killed.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stages.evaluate"], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    killed = 0
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:
        if _cache_files(work) > 0:  # a task of the phase has finished and been cached
            killed = _kill_tree(proc.pid)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    first = (work / "killed.log").read_text()
    assert killed, f"the stage ended before any task was cached (rc {proc.returncode}):\n{first[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    total = int(TO_RUN.search(first).group(1))
    cached_at_kill = _cache_files(work)

    rerun = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=1200)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    again = int(TO_RUN.search(log).group(1))
    print(f"killed {killed} process(es) with {cached_at_kill} shard(s) cached; "
          f"the rerun ran {again} of {total} per-image tasks")
    assert 1 <= again < total, (again, total)

    got = json.loads((work / "metrics" / "evaluate.json").read_text())["resnet20"]
    want = json.loads((smoke_project["dir"] / "metrics" / "evaluate.json").read_text())["resnet20"]
    for defense in ("none", "fnc"):
        for attack in PER_IMAGE:
            assert got[defense][attack] == want[defense][attack], (defense, attack)
