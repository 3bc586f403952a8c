"""Batch conventions shared by every layer of kdistill.

A sample is a dict with ``input`` (or model-specific keys such as ``input_ids``), ``labels`` and
``index``, the sample's position in its data set, on which memory banks and caches key. A batch
is the same dict with stacked tensors.

Labels are integer class ids for classification, per token for token classification, and floats
for regression. ``UNLABELED`` (-100, the value PyTorch's and Hugging Face's losses ignore) marks
an integer label that is hidden or a padding token that has none; NaN marks a hidden regression
score. :func:`label_mask` tells the known labels of either kind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import default_collate

UNLABELED = -100
Task = Literal["classification", "regression", "token_classification"]


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the known labels: integer labels other than ``UNLABELED``, float
    (regression) labels that are not NaN. Same shape as ``labels``."""
    if labels.is_floating_point():
        return ~torch.isnan(labels)
    return labels != UNLABELED


def hidden_like(labels: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``labels`` with every label hidden (``UNLABELED`` or NaN)."""
    return torch.full_like(labels, float("nan") if labels.is_floating_point() else UNLABELED)


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts into one batch dict (torch's default collation)."""
    return default_collate(list(samples))


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
