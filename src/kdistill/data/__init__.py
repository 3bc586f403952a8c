"""Data: built-in data sets, loaders for user files, label subsets and splits.

The sample and batch conventions (``UNLABELED``, ``label_mask``, ``collate``) live in
:mod:`kdistill.batch`.
"""

from kdistill.data.base import (
    ArrayDataset,
    DataSplits,
    IndexedDataset,
    IndexedStream,
    LabeledDataset,
    holdout_split,
    keep_labels,
    labeled_indices,
)
from kdistill.data.builtin import DATASETS, LM_DATASETS, TEXT_DATASETS, load_dataset
from kdistill.data.sequences import SequenceDataset
from kdistill.data.text import TextDataset, WordTagDataset
from kdistill.data.text_corpora import UNLABELED_CORPORA, add_unlabeled

__all__ = [
    "DATASETS",
    "LM_DATASETS",
    "TEXT_DATASETS",
    "UNLABELED_CORPORA",
    "ArrayDataset",
    "DataSplits",
    "IndexedDataset",
    "IndexedStream",
    "LabeledDataset",
    "SequenceDataset",
    "TextDataset",
    "WordTagDataset",
    "add_unlabeled",
    "holdout_split",
    "keep_labels",
    "labeled_indices",
    "load_dataset",
]
