"""Helpers the benchmark scripts share: interleaved timing and JSON output.

Not part of the package: the scripts in ``benchmarks/`` import it from their own
folder (``python benchmarks/<script>.py`` puts that folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def time_once(fn: Callable[[], object], device: str) -> tuple[float, float]:
    """Wall and process CPU seconds of one ``fn()`` call (CUDA synchronised)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function: one warm-up call each, then
    ``repeats`` rounds calling every function once per round, so that a change
    in the machine's load affects all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(time_once(fn, device))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}


def device_name(device: str) -> str:
    """``"NVIDIA H200"`` or ``"cpu, 2 threads"``."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU count, torch version, platform."""
    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's result as one JSON document on stdout (the human-readable
    lines go to stderr, so ``python benchmarks/x.py > x.json`` keeps only the JSON)."""
    json.dump(result, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def say(line: str) -> None:
    """One human-readable line on stderr."""
    print(line, file=sys.stderr, flush=True)
