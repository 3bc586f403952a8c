"""Sample conventions: every sample is a dict with ``input`` (or model-specific keys such as
``input_ids``), ``labels`` (``UNLABELED`` = -100 when the label is hidden) and ``index``, the
sample's position in its data set, on which memory banks and caches key."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

UNLABELED = -100


class ArrayDataset(Dataset):
    """In-memory inputs and integer labels; item i is ``{"input", "labels", "index"}``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if len(inputs) != len(labels):
            raise ValueError(f"inputs have {len(inputs)} rows but labels have {len(labels)}")
        self.inputs = inputs
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.inputs[i], "labels": self.labels[i], "index": torch.tensor(i)}

    def with_labels(self, labels: torch.Tensor) -> ArrayDataset:
        """The same inputs with other labels (for example with most of them hidden)."""
        return ArrayDataset(self.inputs, labels)


class IndexedDataset(Dataset):
    """Wraps any data set so each item is a dict carrying its ``index``.

    Items that are dicts gain an ``index``; ``(input, label)`` pairs become
    ``{"input", "labels", "index"}``; a lone tensor becomes ``{"input", "index"}``.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            sample = dict(item)
        elif isinstance(item, tuple | list) and len(item) == 2:
            sample = {"input": item[0], "labels": torch.as_tensor(item[1])}
        elif isinstance(item, torch.Tensor):
            sample = {"input": item}
        else:
            raise TypeError(
                f"data set item {i} is a {type(item).__name__}; expected a dict, an "
                "(input, label) pair or a tensor"
            )
        sample.setdefault("index", torch.tensor(i))
        return sample


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts into one batch dict (torch's default collation)."""
    return default_collate(list(samples))


def labeled_indices(dataset: Dataset) -> list[int]:
    """Positions of the samples whose label is known (not ``UNLABELED``)."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in range(len(dataset))])
    return torch.nonzero(torch.as_tensor(labels) != UNLABELED).flatten().tolist()


def keep_labels(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Hide all but ``count`` labels, keeping as equal a number per class as possible.

    Returns a copy of ``labels`` where hidden labels are ``UNLABELED``. The choice depends only
    on ``seed``.
    """
    classes = torch.unique(labels).tolist()
    if not 0 < count <= len(labels):
        raise ValueError(f"labeled count must be between 1 and {len(labels)}, got {count}")
    rng = np.random.default_rng(seed)
    per_class = {c: rng.permutation(np.flatnonzero(labels.numpy() == c)) for c in classes}
    chosen: list[int] = []
    rank = 0
    while len(chosen) < count:
        for c in classes:
            if rank < len(per_class[c]) and len(chosen) < count:
                chosen.append(int(per_class[c][rank]))
        rank += 1
    hidden = torch.full_like(labels, UNLABELED)
    hidden[chosen] = labels[chosen]
    return hidden


@dataclass
class DataSplits:
    """A training and a test split plus what models need to know to fit them."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
