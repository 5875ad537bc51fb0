"""Reproducible experiments on adversarial patches and defenses for image classifiers.

Subpackages: ``data`` (sources, preparation), ``models`` (registry),
``defenses`` (feature norm clipping, ...), ``attacks`` (universal adversarial
patch, ...); modules ``train``, ``metrics``, ``evaluation``, ``tracking``
(MLflow), ``distributed`` (Ray), ``config`` (params schema).
"""

__version__ = "0.1.0"
