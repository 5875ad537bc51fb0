"""Atomic writes: the file appears whole or not at all, with a plain file's permissions."""

from __future__ import annotations

import os

import pytest

from pipeline.io import atomic_write


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = atomic_write(tmp_path / "report.md", lambda f: f.write(b"# report\n"))
        with open(tmp_path / "plain.md", "w") as f:  # what any other tool's output gets
            f.write("x")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"# report\n"
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
