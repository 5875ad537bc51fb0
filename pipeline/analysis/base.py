"""One interface for the analyses of ``analyze@<name>``: a registry filled by package discovery.

An analysis is three steps (:class:`Analysis`): ``inputs`` (in the stage's process: the
tensors every model's task reads, e.g. a seeded test subset), ``compute`` (one Ray task per
model of ``analysis.defenses``: plain tensors and lists back), and ``write`` (in the stage's
process: CSV tables, PNG figures and a flat dict of MLflow metrics from every model's
result). Register one with :func:`register_analysis` in any module of :mod:`pipeline.analysis`
(found by importing the package's modules, no list to keep) and add its name to
``dvc.yaml``'s ``analyze`` ``foreach`` list; recipe in ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.registry import Registry

Inputs = dict[str, Any]
"""What every model's task of an analysis reads (tensors on the CPU, uint8 images as prepared)."""


@dataclass(frozen=True)
class Analysis:
    """A registered analysis.

    Attributes:
        name: its name in ``analyze@<name>`` and under ``analysis/<model>/<name>/``.
        compute: ``compute(model, inputs, cfg) -> result`` for one model (eval mode, float
            images in [0, 1] -> logits); ``cfg`` is the ``analysis`` section as a dict, plus
            ``defense`` (the model's name in ``analysis.defenses``); runs in a Ray task.
        write: ``write(results, out_dir, params, specs, inputs) -> metrics``: ``results`` per
            defense, ``out_dir`` ``analysis/<model>/<name>`` (empty), ``specs`` the models'
            checkpoint dicts; writes its files and returns a flat dict of floats for MLflow.
        inputs: ``inputs(params, meta, specs) -> Inputs`` (``meta`` the prepared dataset's);
            the default is ``x``/``y``, the seeded test subset of ``analysis.images``.
        note: ``note(params, specs) -> str | None``: a reason this profile or model cannot run
            the analysis; the stage then writes it as ``README.md`` and computes nothing.
        tags: ``tags(results) -> dict`` of extra MLflow tags of the stage run.
        source: the paper, section or figure it reproduces.
    """

    name: str
    compute: Callable[[nn.Module, Inputs, dict[str, Any]], dict[str, Any]]
    write: Callable[..., dict[str, float]]
    inputs: Callable[..., Inputs] | None = None
    note: Callable[..., str | None] | None = None
    tags: Callable[[dict[str, Any]], dict[str, str]] | None = None
    source: str = ""


ANALYSES: Registry[Analysis] = Registry("analysis", "pipeline.analysis", ordered=True)
"""The analyses, found by importing every module of :mod:`pipeline.analysis`, in registration order."""


def register_analysis(analysis: Analysis) -> Analysis:
    """Register ``analysis`` under its name; returns it.

    Raises:
        ValueError: the name is taken by another analysis, or is not a lower-case identifier.
    """
    if not analysis.name.isidentifier() or analysis.name != analysis.name.lower():
        raise ValueError(f"analysis name {analysis.name!r}: use a lower-case identifier")
    return ANALYSES.add(analysis.name, analysis, same=lambda old, new: old == new)


def list_analyses() -> list[str]:
    """The registered analyses' names, in registration order (the built-in six first)."""
    return ANALYSES.names()


def get_analysis(name: str) -> Analysis:
    """The registered analysis ``name``.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return ANALYSES.get(name)
