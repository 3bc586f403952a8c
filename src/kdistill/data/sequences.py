"""Sequence-recognition samples for CTC: an input and its target sequence of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdistill.batch import TARGET_LENGTHS, UNLABELED
from kdistill.data.base import ArrayDataset


class SequenceDataset(ArrayDataset):
    """Inputs [N, ...] with target sequences ``labels`` [N, S]: token ids padded at the end with
    ``UNLABELED``. Item i is ``{"input", "labels", "target_lengths", "index"}`` (the CTC
    convention of :mod:`kdistill.batch`); a row of padding alone is a hidden target (length 0).
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if labels.dim() != 2 or labels.is_floating_point():
            raise ValueError(f"target sequences must be integer token ids [samples, tokens], "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")
        super().__init__(inputs, labels)
        known = self.labels != UNLABELED
        self.target_lengths = known.sum(dim=1)
        # Padding only at the end: the first `length` entries of each row are the tokens.
        prefix = torch.arange(labels.shape[1]).unsqueeze(0) < self.target_lengths.unsqueeze(1)
        gaps = (known != prefix).any(dim=1)
        if gaps.any():
            row = int(gaps.nonzero()[0])
            raise ValueError(f"target sequence {row} has a token after padding ({UNLABELED}): "
                             f"{self.labels[row].tolist()}; pad only at the end")

    def columns(self) -> dict[str, torch.Tensor]:
        return {**super().columns(), TARGET_LENGTHS: self.target_lengths}

    def with_labels(self, labels: torch.Tensor) -> SequenceDataset:
        """The same inputs with other target sequences (e.g. some hidden)."""
        return SequenceDataset(self.inputs, labels)

    def select(self, indices: Sequence[int]) -> SequenceDataset:
        """The samples at ``indices``, in that order."""
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return SequenceDataset(self.inputs[rows], self.labels[rows])
