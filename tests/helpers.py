"""Stand-ins shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def serial_map(fn: Callable[[Any], Any], items: list, on_result: Callable[[int, Any], None] | None = None,
               **_: Any) -> list:
    """``pipeline.distributed.ray_map`` in this process: each result handed to ``on_result`` as it is made."""
    results = []
    for i, item in enumerate(items):
        results.append(fn(item))
        if on_result is not None:
            on_result(i, results[-1])
    return results
