"""Pipeline overhead and memory: one ``dvc repro`` of a profile in a fresh copy of the project.

Run on demand (not a test):

    python benchmarks/bench_pipeline.py [--profile params/smoke.yaml] [--set train.epochs=1 ...] > pipeline.json

Copies the project (tracked and untracked, not ignored, files) into a temporary
folder, writes ``--profile`` as its ``params.yaml`` with ``data.root`` set to
``--data-root`` and any ``--set dotted.key=value`` overrides (YAML values),
commits it in a new git repository and runs, with its own MLflow SQLite store and
Ray temp folder:

* ``dvc repro`` (timed): every stage writes ``.cache/stage_stats/<stage>.json``
  (:func:`pipeline.cli.stage_stats`): its wall time, the seconds during which at
  least one of its Ray tasks or training epochs was computing, and the driver's
  peak resident memory;
* ``dvc repro`` again, ``--noop-repeats`` times: nothing to do, timed.

Prints, as JSON on stdout: the whole ``dvc repro`` wall time, the summed compute
time of all stages and their ratio (the pipeline's overhead: interpreter start-up,
imports, Ray start, data movement, MLflow logging, DVC hashing), per stage the
same figures and the driver's peak RSS, and the no-op times. Targets (README,
Benchmarks): smoke wall time at most 1.5x its compute time; a no-op ``dvc repro``
under 5 s; no stage of the default profile above 4 GiB resident on the driver
(``--profile params.yaml`` with shortened schedules, such as ``--set
train.epochs=1 --set patch.epochs=1``, measures the default profile's memory,
which depends on the data and model sizes, not on the number of epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from timing import emit, machine, say

ROOT = Path(__file__).resolve().parents[1]


def copy_project(dst: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored project files into ``dst``."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)


def set_dotted(params: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML).

    Raises:
        SystemExit: no ``=`` in the assignment, or a key path that is not in the profile.
    """
    key, sep, value = assignment.partition("=")
    if not sep:
        sys.exit(f"--set {assignment!r}: expected dotted.key=value")
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            sys.exit(f"--set {assignment!r}: {part!r} is not a section of the profile")
        node = node[part]
    if leaf not in node:
        sys.exit(f"--set {assignment!r}: {leaf!r} is not a key of the profile")
    node[leaf] = yaml.safe_load(value)


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Run ``cmd``; its wall seconds. Exits with its log on failure."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    (cwd / "bench.log").open("a").write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return seconds


def main() -> None:
    """Parse the arguments, run the profile and the no-op, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="params/smoke.yaml")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpeg"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--noop-repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the project copy (its path is printed)")
    args = parser.parse_args()

    params = yaml.safe_load((ROOT / args.profile).read_text())
    params["data"]["root"] = str(Path(args.data_root).resolve())
    for assignment in args.overrides:
        set_dotted(params, assignment)
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths are length-limited
    try:
        copy_project(work)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        git_env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                   "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
            subprocess.run(cmd, cwd=work, env=git_env, check=True, capture_output=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "RAY_TMPDIR": ray_tmp,
               "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PYTHONPATH": str(work)}
        dvc = [sys.executable, "-m", "dvc", "repro"]
        say(f"dvc repro of {args.profile} in {work} ...")
        wall = run(dvc, work, env)
        noops = [run(dvc, work, env) for _ in range(args.noop_repeats)]
        stages = {}
        for path in sorted((work / ".cache" / "stage_stats").glob("*.json"), key=lambda p: p.stat().st_mtime):
            s = json.loads(path.read_text())
            stages[s["stage"]] = {k: s[k] for k in ("wall_seconds", "compute_seconds", "task_seconds", "tasks",
                                                    "driver_peak_rss_mib")}
        compute = sum(s["compute_seconds"] for s in stages.values())
        result = {
            "benchmark": "pipeline", "profile": args.profile, "overrides": args.overrides, "machine": machine(),
            "repro_wall_seconds": round(wall, 1),
            "stage_wall_seconds": round(sum(s["wall_seconds"] for s in stages.values()), 1),
            "compute_seconds": round(compute, 1),
            "wall_over_compute": round(wall / compute, 3) if compute else None,
            "noop_repro_seconds": [round(t, 2) for t in noops],
            "noop_repro_seconds_median": round(statistics.median(noops), 2) if noops else None,
            "max_driver_peak_rss_mib": max((s["driver_peak_rss_mib"] for s in stages.values()), default=None),
            "stages": stages,
        }
        for name, s in stages.items():
            say(f"{name:28s} wall {s['wall_seconds']:7.1f} s  computing {s['compute_seconds']:7.1f} s  "
                f"driver peak RSS {s['driver_peak_rss_mib']:6.0f} MiB")
        say(f"dvc repro {wall:.1f} s for {compute:.1f} s of compute ({result['wall_over_compute']}x); "
            f"no-op dvc repro {result['noop_repro_seconds_median']} s")
        emit(result)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep:
            say(f"project copy kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
