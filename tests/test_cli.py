"""``dvc repro -f`` means recompute: a stage run by a forced DVC process does not reuse its
caches in ``.cache/``; any other run does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, forced", [
    (["/venv/bin/dvc", "repro", "-f", "evaluate"], True),
    (["/venv/bin/python3", "/venv/bin/dvc", "repro", "--force"], True),
    (["python", "-m", "dvc", "repro", "-sf", "evaluate"], True),
    (["dvc", "exp", "run", "-f", "-S", "fnc.alpha=1.1"], True),
    (["dvc", "repro", "evaluate"], False),
    (["dvc", "exp", "run", "-S", "fnc.alpha=1.1", "-n", "f"], False),
    (["dvc", "status"], None),
    (["python", "-m", "stages.evaluate"], None),
])
def test_the_force_flag_is_read_from_dvc_s_arguments(argv, forced):
    assert cli._dvc_forces(argv) is forced


def _child_verdict(*parent_args: str) -> str:
    """``forced_by_dvc()`` as seen by a child of a process whose argv ends with ``parent_args``."""
    child = "from pipeline.cli import forced_by_dvc; print(forced_by_dvc())"
    outer = f"import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', {child!r}]))"
    proc = subprocess.run([sys.executable, "-c", outer, *parent_args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_stage_under_a_forced_dvc_process_knows_it():
    assert _child_verdict("dvc", "repro", "-f", "evaluate") == "True"
    assert _child_verdict("dvc", "repro", "evaluate") == "False"
    assert _child_verdict() == "False"  # no DVC process among the ancestors


def test_a_forced_stage_empties_each_cache_entry_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_EMPTIED", set())
    entry = cli.resume_dir("evaluate", {"cell": 1})
    (entry / "cell.pt").write_bytes(b"old")
    assert (cli.resume_dir("evaluate", {"cell": 1}) / "cell.pt").is_file()  # not forced: reused
    monkeypatch.setattr(cli, "FORCED", True)
    again = cli.resume_dir("evaluate", {"cell": 1})
    assert again == entry and not (again / "cell.pt").exists()  # forced: recomputed
    (again / "cell.pt").write_bytes(b"new")  # what the forced run writes stays for its own later reads
    assert (cli.resume_dir("evaluate", {"cell": 1}) / "cell.pt").read_bytes() == b"new"
