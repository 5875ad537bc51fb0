"""Reproducible experiments on adversarial patches and defenses for image classifiers.

Subpackages: ``data`` (sources, preparation), ``models`` (registry),
``defenses`` (feature norm clipping, ...), ``attacks`` (universal adversarial
patch, ...); modules ``train``, ``metrics``, ``evaluation``, ``tracking``
(MLflow), ``distributed`` (Ray), ``config`` (params schema).

Python API (:mod:`pipeline.api`, imported on first use, so ``import pipeline`` stays
cheap): :func:`evaluate_model` (the evaluate stage's matrix for a model in memory) and
:func:`train_patch` (generate_patches' universal patches).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate_model", "train_patch"]

_API = ("evaluate_model", "train_patch")


def __getattr__(name: str) -> Any:
    """``pipeline.evaluate_model`` and ``pipeline.train_patch``, from :mod:`pipeline.api` on first access."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("pipeline.api"), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
