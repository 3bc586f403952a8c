"""Data: built-in data sets, loaders for user files and the sample conventions of kdistill."""

from kdistill.data.base import (
    UNLABELED,
    ArrayDataset,
    DataSplits,
    IndexedDataset,
    collate,
    hidden_like,
    holdout_split,
    keep_labels,
    label_mask,
    labeled_indices,
)
from kdistill.data.builtin import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "UNLABELED",
    "ArrayDataset",
    "DataSplits",
    "IndexedDataset",
    "collate",
    "hidden_like",
    "holdout_split",
    "keep_labels",
    "label_mask",
    "labeled_indices",
    "load_dataset",
]
