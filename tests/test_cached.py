"""``pipeline.cached.cached_map``: the one "cache key -> run the missing jobs -> save as each
finishes" of every stage. The Ray fan-out is replaced by an in-process map."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import cached
from pipeline.io import load_torch, save_torch
from tests.helpers import serial_map


@pytest.fixture
def calls(monkeypatch):
    """The task inputs each map ran, in order (one list per map)."""
    runs: list[list] = []

    def fake_map(fn, items, on_result=None, **kw):
        runs.append(list(items))
        return serial_map(fn, items, on_result=on_result)

    monkeypatch.setattr(cached, "init_ray", lambda: None)
    monkeypatch.setattr(cached, "ray_map", fake_map)
    return runs


def square(item: dict) -> dict:
    return {"value": torch.tensor(item["n"] ** 2)}


def test_computes_only_missing_keys_and_saves_each_result(tmp_path, calls):
    path = lambda k: tmp_path / f"{k}.pt"  # noqa: E731
    save_torch({"value": torch.tensor(-1)}, path(2))  # a result a killed run had saved
    out = cached.cached_map(square, [1, 2, 3], path, item=lambda k: {"n": k}, desc="t")
    assert [int(out[k]["value"]) for k in (1, 2, 3)] == [1, -1, 9]  # 2 read back, not recomputed
    assert calls == [[{"n": 1}, {"n": 3}]]
    assert int(load_torch(path(3))["value"]) == 9
    again = cached.cached_map(square, [1, 2, 3], path, item=lambda k: {"n": k}, desc="t")
    assert len(calls) == 1 and [int(again[k]["value"]) for k in (1, 2, 3)] == [1, -1, 9]


def test_a_killed_map_keeps_what_had_finished(tmp_path, calls):
    def fails_on_three(item):
        if item["n"] == 3:
            raise RuntimeError("killed")
        return square(item)

    path = lambda k: tmp_path / f"{k}.pt"  # noqa: E731
    with pytest.raises(RuntimeError):
        cached.cached_map(fails_on_three, [1, 2, 3], path, item=lambda k: {"n": k}, desc="t")
    assert path(1).is_file() and path(2).is_file() and not path(3).is_file()
    cached.cached_map(square, [1, 2, 3], path, item=lambda k: {"n": k}, desc="t")
    assert calls[-1] == [{"n": 3}]


def test_keys_sharing_a_file_are_computed_once(tmp_path, calls):
    out = cached.cached_map(square, ["a", "b", "c"], lambda k: tmp_path / ("ab" if k in "ab" else k),
                            item=lambda k: {"n": len(calls) + ord(k)}, desc="t")
    assert len(calls[0]) == 2 and out["a"] is out["b"]


def test_group_runs_several_keys_a_task_and_split_files_each(tmp_path, calls):
    def pairs(missing):
        return [({"n": [k for k in missing if k[0] == g]}, [k for k in missing if k[0] == g])
                for g in dict.fromkeys(k[0] for k in missing)]

    def task(item):
        return {k: torch.tensor(k[1]) for k in item["n"]}

    keys = [("x", 1), ("x", 2), ("y", 3)]
    out = cached.cached_map(task, keys, lambda k: tmp_path / f"{k[0]}{k[1]}.pt", group=pairs,
                            split=lambda k, r: r[k], desc="t")
    assert len(calls[0]) == 2 and {k: int(v) for k, v in out.items()} == {("x", 1): 1, ("x", 2): 2, ("y", 3): 3}
    assert int(load_torch(tmp_path / "x2.pt")) == 2


def test_misuse_is_one_clear_error(tmp_path, calls):
    path = lambda k: Path(tmp_path) / f"{k}.pt"  # noqa: E731
    with pytest.raises(ValueError, match="exactly one of item="):
        cached.cached_map(square, [1], path, desc="t")
    with pytest.raises(ValueError, match="left out"):
        cached.cached_map(square, [1, 2], path, group=lambda missing: [({"n": 1}, [1])], desc="t")
    assert calls == []  # nothing ran before the error


def test_shared_once_builds_its_input_at_the_first_missing_job_only(tmp_path, calls, monkeypatch):
    made: list[int] = []
    monkeypatch.setattr(cached, "shared", lambda obj: ("ref", obj))  # stands for ray.put
    data = cached.shared_once(lambda: made.append(1) or torch.arange(3))

    def item(k):
        return {"n": k, "data": data()}

    path = lambda k: tmp_path / f"{k}.pt"  # noqa: E731
    cached.cached_map(square, [1, 2, 3], path, item=item, desc="t")
    assert made == [1]  # one put for three jobs
    assert all(run["data"][0] == "ref" and run["data"][1] is calls[0][0]["data"][1] for run in calls[0])
    made.clear()
    again = cached.shared_once(lambda: made.append(1) or torch.arange(3))
    cached.cached_map(square, [1, 2, 3], path, item=lambda k: {"n": k, "data": again()}, desc="t")
    assert made == []  # everything cached: nothing built, nothing put
