"""Deterministic global batches, split across processes and accumulation micro-batches.

Each epoch draws one permutation of the training indices from (seed, phase, epoch) alone, cuts
it into global batches of ``batch_size * accumulation * processes`` samples and gives process r
micro-batches r*k .. r*k + k - 1 of each (k = accumulation). The same seed therefore yields the
same global batches whatever the number of processes, and a resumed run can skip the batches
already done. A stream, which cannot be permuted, is shuffled by a seeded buffer
(:func:`buffer_shuffle`) drawn from the same (seed, phase, epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from kdistill.batch import label_mask

T = TypeVar("T")


def epoch_generator(seed: int, phase: int, epoch: int) -> torch.Generator:
    """The random generator of one epoch's order: a function of (seed, phase, epoch) alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)


def global_batch_count(samples: int, global_batch: int, min_size: int) -> int:
    """How many global batches ``samples`` samples make: the full ones, plus the rest when it
    holds at least ``min_size`` (one sample per micro-batch of every process)."""
    return samples // global_batch + int(samples % global_batch >= min_size)


class EpochBatches:
    """The global batches of one epoch, cut on demand from one seeded permutation of
    ``indices`` (an int64 tensor: 8 bytes a sample, whatever the data set holds); a last batch
    smaller than ``min_size`` is dropped."""

    def __init__(self, indices: torch.Tensor, global_batch: int, min_size: int, seed: int,
                 phase: int, epoch: int):
        order = torch.randperm(len(indices), generator=epoch_generator(seed, phase, epoch))
        self.shuffled = indices[order]
        self.global_batch = global_batch
        self.count = global_batch_count(len(indices), global_batch, min_size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, batch: int) -> list[int]:
        if not 0 <= batch < self.count:
            raise IndexError(f"global batch {batch} of an epoch of {self.count}")
        start = batch * self.global_batch
        return self.shuffled[start:start + self.global_batch].tolist()


def epoch_global_batches(indices: Sequence[int], global_batch: int, min_size: int, seed: int,
                         phase: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch (:class:`EpochBatches`) as lists."""
    batches = EpochBatches(torch.as_tensor(list(indices), dtype=torch.long), global_batch,
                           min_size, seed, phase, epoch)
    return [batches[b] for b in range(len(batches))]


def buffer_shuffle(items: Iterable[T], size: int, generator: torch.Generator) -> Iterator[T]:
    """``items`` in a seeded, locally shuffled order, holding at most ``size`` of them.

    The buffer fills with the first ``size`` items; then each further item takes the place of
    one drawn uniformly from the buffer, which is yielded; the items left at the end come out
    in a random order. An item therefore comes out at most ``size - 1`` places earlier than it
    went in (later without bound). ``size`` 0 or 1 keeps the order of ``items``.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        drawn = int(torch.randint(size, (1,), generator=generator))
        yield buffer[drawn]
        buffer[drawn] = item
    for drawn in torch.randperm(len(buffer), generator=generator).tolist():
        yield buffer[drawn]


def process_micro_batches(global_batch: Sequence[T], processes: int, rank: int,
                          accumulation: int) -> list[list[T]]:
    """This process's ``accumulation`` micro-batches of one global batch (indices, or the
    samples themselves)."""
    bounds = np.array_split(np.arange(len(global_batch)), processes * accumulation)
    return [[global_batch[i] for i in chunk.tolist()]
            for chunk in bounds[rank * accumulation:(rank + 1) * accumulation]]


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
