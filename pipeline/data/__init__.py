"""Datasets: sources (layouts on disk), preparation (decode once), prepared splits."""

from pipeline.data.datasets import (
    DATASETS,
    DatasetInfo,
    LazyImageDataset,
    TensorImageDataset,
    dataset_name,
    horizontal_flip,
    load_meta,
    load_split,
    load_tensors,
    load_training_subset,
    load_validation,
    to_float,
)
from pipeline.data.sources import DatasetError

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetInfo",
    "LazyImageDataset",
    "TensorImageDataset",
    "dataset_name",
    "horizontal_flip",
    "load_meta",
    "load_split",
    "load_tensors",
    "load_training_subset",
    "load_validation",
    "to_float",
]
