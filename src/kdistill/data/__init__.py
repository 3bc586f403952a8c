"""Data: built-in data sets, loaders for user files, label subsets and splits.

The sample and batch conventions (``UNLABELED``, ``label_mask``, ``collate``) live in
:mod:`kdistill.batch`.
"""

from kdistill.data.base import (
    ArrayDataset,
    DataSplits,
    IndexedDataset,
    holdout_split,
    keep_labels,
    labeled_indices,
)
from kdistill.data.builtin import DATASETS, load_dataset

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DataSplits",
    "IndexedDataset",
    "holdout_split",
    "keep_labels",
    "labeled_indices",
    "load_dataset",
]
