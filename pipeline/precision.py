"""Automatic mixed precision: bf16 autocast where the device runs it natively.

Training (``train.amp``) and patch optimisation (``patch.amp``) may run their
forward passes under ``torch.autocast`` in bfloat16; weights, optimiser state,
gradients of the optimised tensors and the loss stay float32. Attacks and
evaluation always run in float32 (low-precision gradients can weaken an attack
and make a defense look stronger than it is).

bf16 is used only where it is fast: a CUDA device with bf16 support (Ampere and
later), or a CPU with native bf16 instructions (AVX512-BF16 or AMX; read from
``/proc/cpuinfo`` on Linux). Elsewhere a request for it falls back to float32
with a warning, since emulated bf16 is slower than float32 and gains nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["amp_dtype", "autocast", "cpu_has_native_bf16", "precision_name"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (the ``avx512_bf16`` or
    ``amx_bf16`` flag in ``/proc/cpuinfo``); False where that file is absent."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device | str, enabled: bool) -> torch.dtype | None:
    """The autocast dtype to use on ``device``: ``torch.bfloat16``, or ``None`` for float32.

    Args:
        device: where the forward passes run.
        enabled: the ``amp`` param; False always gives ``None``.

    Returns:
        ``torch.bfloat16`` if enabled and the device runs bf16 natively, else ``None``
        (with a warning when it was enabled but is not supported).
    """
    if not enabled:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        supported = cpu_has_native_bf16()
    else:
        supported = False
    if not supported:
        log.warning("amp: %s has no native bf16; running in float32 (set amp: false to silence this)", device)
        return None
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16-autocast"`` or ``"fp32"``: the MLflow tag ``precision`` of a run."""
    return "bf16-autocast" if dtype == torch.bfloat16 else "fp32"
