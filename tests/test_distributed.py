"""Ray plumbing: ``ray_map`` results and the compute intervals a stage reports."""

from __future__ import annotations

import json
import os
import subprocess
import time

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
