"""Deterministic global batches, split across processes and accumulation micro-batches.

Each epoch draws one permutation of the training indices from (seed, phase, epoch) alone, cuts
it into global batches of ``batch_size * accumulation * processes`` samples and gives process r
micro-batches r*k .. r*k + k - 1 of each (k = accumulation). The same seed therefore yields the
same global batches whatever the number of processes, and a resumed run can skip the batches
already done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdistill.batch import label_mask


def epoch_global_batches(indices: Sequence[int], global_batch: int, min_size: int, seed: int,
                         phase: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch; a last batch smaller than ``min_size`` is dropped."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)
    order = torch.randperm(len(indices), generator=generator).tolist()
    shuffled = [indices[i] for i in order]
    batches = [shuffled[i:i + global_batch] for i in range(0, len(shuffled), global_batch)]
    return [b for b in batches if len(b) >= min_size]


def process_micro_batches(global_batch: Sequence[int], processes: int, rank: int,
                          accumulation: int) -> list[list[int]]:
    """This process's ``accumulation`` micro-batches of one global batch."""
    chunks = np.array_split(np.asarray(global_batch), processes * accumulation)
    return [c.tolist() for c in chunks[rank * accumulation:(rank + 1) * accumulation]]


def unit_counts(batch: Mapping[str, Any]) -> dict[str, float]:
    """How many examples, known labels (:func:`~kdistill.data.base.label_mask`; per token for
    token labels), valid tokens and valid (query, key) token pairs a batch holds (without a mask
    every sample counts as one token)."""
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    examples = float(len(batch["index"]) if "index" in batch else len(first))
    labels = batch.get("labels")
    labeled = float(label_mask(labels).sum()) if isinstance(labels, torch.Tensor) else 0.0
    mask = batch.get("token_mask", batch.get("attention_mask"))
    if isinstance(mask, torch.Tensor):
        valid = mask.reshape(mask.shape[0], -1).sum(dim=1).double()
        tokens, pairs = float(valid.sum()), float((valid**2).sum())
    else:
        tokens = pairs = examples
    return {"examples": examples, "labeled": labeled, "tokens": tokens, "token_pairs": pairs}


def unit_scales(local: Mapping[str, float], totals: Mapping[str, float],
                processes: int) -> dict[str, float]:
    """Each unit's weight for one micro-batch whose counts are ``local``, in a global batch
    whose counts (all micro-batches, all processes) are ``totals``: local / total x processes,
    so that the sum over micro-batches of the averaged gradients of the processes is the
    gradient of the mean over the global batch; 0 for a unit the global batch lacks."""
    return {u: (local[u] / totals[u] * processes) if totals[u] else 0.0 for u in local}
