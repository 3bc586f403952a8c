"""Training data in: the micro-batches of each optimizer step, loaded by a ``DataLoader``.

The training data of a fit is a map-style data set (any ``Dataset`` with a length, such as one
reading a memory-mapped file a sample at a time) or a stream (an ``IterableDataset``), given
as it is or inside the user's ``DataLoader`` (whose data set, ``collate_fn`` and
``batch_size`` are used; its sampler and workers are not). Each phase reads its remaining
micro-batches through one ``DataLoader`` (:meth:`TrainingSet.schedule`) with
``trainer.workers`` processes, each loading ``trainer.prefetch`` micro-batches ahead: workers
start at the phase's first step and load ahead across epoch boundaries. A data set that reads
a micro-batch at once (:class:`~kdistill.data.base.RowReadable`, such as ``ArrayDataset``) is
read that way, one gather per field, rather than item by item and collated.

**Order.** Which samples form which micro-batch is decided in the training process, from the
seed, the phase, the epoch and the position in the epoch alone (:mod:`kdistill.batching`);
workers only load and collate what they are handed. The number of workers therefore never
changes the batches, and a resume at (epoch, batch) draws exactly the batches the
uninterrupted run would have drawn: the checkpoint's position is the whole sampler state.
The loader's own generator (worker seeds) is seeded from (seed, phase, epoch) too, so it draws
nothing from the random state training uses. Random draws inside a data set's loading code
run in the training process (and are resumed exactly) with no workers, and in each worker from
its own seed with workers (reproducible from the start of a phase, not across a resume).

**Streams.** Each epoch reads the stream from its start (iterating it must start it over and
give the same samples in the same order each time) through a seeded shuffle buffer of
``trainer.shuffle_buffer`` samples (:func:`~kdistill.batching.buffer_shuffle`; 0 keeps the
stream's order). An epoch is ``trainer.steps_per_epoch`` optimizer steps of full global
batches when set; otherwise one pass over a stream with a length, cut like a data set of that
length. A stream without a length, or any stream under a labelled-only recipe (which passes
over the unlabelled samples, of unknown number), needs ``steps_per_epoch``. A resume reads the
samples of the steps already done again and drops them uncollated. Only the shuffle buffer and
the micro-batches in flight are held in memory. One worker at most reads a stream (its order is
one sequence); each process of a distributed run reads the whole stream and keeps its own
micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate

from kdistill.batch import collate
from kdistill.batching import (
    EpochBatches,
    buffer_shuffle,
    epoch_generator,
    global_batch_count,
    process_micro_batches,
)
from kdistill.data.base import (
    IndexedDataset,
    IndexedStream,
    RowReadable,
    has_label,
    labeled_indices,
)
from kdistill.engine.phases import Phase
from kdistill.errors import KdistillError
from kdistill.settings import TrainerSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Cut:
    """How one phase's samples become optimizer steps: global batches of ``micro_batch *
    accumulation * processes`` samples, of which process ``rank`` trains on ``accumulation``
    micro-batches (:func:`~kdistill.batching.process_micro_batches`), for ``epochs`` epochs of
    ``steps_per_epoch`` steps (set by :meth:`TrainingSet.schedule`), in an order drawn from
    (``seed``, ``phase``, epoch)."""

    micro_batch: int
    accumulation: int
    processes: int
    rank: int
    seed: int
    phase: int
    epochs: int
    steps_per_epoch: int = 0

    @property
    def shards(self) -> int:
        """Micro-batches per global batch (all processes)."""
        return self.accumulation * self.processes

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.shards

    def share(self, global_batch: Sequence[T]) -> list[list[T]]:
        """This process's micro-batches of one global batch."""
        return process_micro_batches(global_batch, self.processes, self.rank, self.accumulation)

    def generator(self, epoch: int) -> torch.Generator:
        return epoch_generator(self.seed, self.phase, epoch)

    def batches_from(self, start: tuple[int, int], epoch: int) -> range:
        """The batches of ``epoch`` a phase resumed at ``start`` (epoch, batch) trains."""
        return range(start[1] if epoch == start[0] else 0, self.steps_per_epoch)


class MicroBatchSampler(Sampler[list[int]]):
    """The batch sampler of a data set's phase loader: this process's micro-batches (sample
    indices) of every global batch (:class:`~kdistill.batching.EpochBatches`) from ``start``
    (epoch, batch) to the end of the phase. It runs in the training process."""

    def __init__(self, indices: torch.Tensor, cut: Cut, start: tuple[int, int]):
        self.indices, self.cut, self.start = indices, cut, start

    def __iter__(self) -> Iterator[list[int]]:
        cut = self.cut
        for epoch in range(self.start[0], cut.epochs):
            batches = EpochBatches(self.indices, cut.global_batch, cut.shards, cut.seed,
                                   cut.phase, epoch)
            for b in cut.batches_from(self.start, epoch):
                yield from cut.share(batches[b])


class StreamMicroBatches(IterableDataset):
    """The data set of a stream's phase loader: this process's micro-batches (lists of
    samples) of every global batch from ``start`` (epoch, batch) to the end of the phase.

    Each epoch reads ``stream`` from its start (passing over unlabelled samples when
    ``labeled_only``) through a shuffle buffer of ``shuffle_buffer`` samples seeded from (seed,
    phase, epoch), and cuts it into global batches of ``cut.global_batch`` samples (the last
    one ``last_size``); the batches before ``start`` are read and dropped. It stops early when
    the stream runs out."""

    def __init__(self, stream: IndexedStream, cut: Cut, last_size: int, shuffle_buffer: int,
                 labeled_only: bool, start: tuple[int, int]):
        self.stream, self.cut, self.last_size = stream, cut, last_size
        self.shuffle_buffer, self.labeled_only, self.start = shuffle_buffer, labeled_only, start

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        cut = self.cut
        for epoch in range(self.start[0], cut.epochs):
            samples = (s for s in self.stream if not self.labeled_only or has_label(s))
            shuffled = buffer_shuffle(samples, self.shuffle_buffer, cut.generator(epoch))
            trained = cut.batches_from(self.start, epoch)
            for b in range(cut.steps_per_epoch):
                size = self.last_size if b == cut.steps_per_epoch - 1 else cut.global_batch
                batch = list(islice(shuffled, size))
                if len(batch) < size:
                    return
                if b in trained:
                    yield from cut.share(batch)


class RowBatches(Dataset):
    """A :class:`~kdistill.data.base.RowReadable` data set read by micro-batch: item
    ``indices`` (a list drawn by the phase's sampler) is their batch."""

    def __init__(self, dataset: RowReadable):
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> dict[str, Any]:
        return self.dataset.rows(indices)


def as_read(batch: dict[str, Any]) -> dict[str, Any]:
    """The ``collate_fn`` of :class:`RowBatches`' loader: a batch is read collated."""
    return batch


class PhaseFeed:
    """This process's micro-batches of a phase's remaining optimizer steps, ``accumulation`` a
    step, from the phase's loader (iterated once: the workers start at the first step)."""

    def __init__(self, loader: DataLoader, accumulation: int, shortage: str):
        self.loader, self.accumulation, self.shortage = loader, accumulation, shortage
        self.iterator: Iterator[dict[str, Any]] | None = None

    def step(self, epoch: int, batch: int) -> list[dict[str, Any]]:
        """The micro-batches of ``batch`` (0-based) of ``epoch``, the next step."""
        if self.iterator is None:
            self.iterator = iter(self.loader)
        micro = list(islice(self.iterator, self.accumulation))
        if len(micro) < self.accumulation:
            raise KdistillError(self.shortage.format(epoch=epoch + 1, step=batch + 1))
        return micro

    def close(self) -> None:
        """Stop the loader's workers now rather than when the iterator is collected (a run
        stopped by an error may keep its frames, and so the iterator, alive)."""
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.iterator = None


class TrainingSet:
    """The training data of a fit (see the module docstring): a data set read by index, or a
    stream; ``batch_size`` is the user's loader's (``None`` without one)."""

    def __init__(self, data: Dataset | DataLoader, settings: TrainerSettings):
        loader = data if isinstance(data, DataLoader) else None
        source = loader.dataset if loader is not None else data
        custom = loader is not None and loader.collate_fn is not default_collate
        self.collate_fn = loader.collate_fn if custom else collate  # type: ignore[union-attr]
        self.batch_size = loader.batch_size if loader is not None else None
        self.settings = settings
        self.dataset: IndexedDataset | IndexedStream = (
            IndexedStream(source) if isinstance(source, IterableDataset)
            else IndexedDataset(source))
        self.check_settings()

    @property
    def stream(self) -> bool:
        return isinstance(self.dataset, IndexedStream)

    @property
    def length(self) -> int | None:
        """The number of samples (``None`` for a stream without a length)."""
        if isinstance(self.dataset, IndexedStream):
            return self.dataset.length
        return len(self.dataset)

    def check_settings(self) -> None:
        """Refuse the settings that do not apply to this kind of training data."""
        settings = self.settings
        if self.stream and settings.workers > 1:
            raise KdistillError(f"trainer.workers is {settings.workers}, but a training stream "
                                "is read in order by one worker: set workers to 0 or 1 (more "
                                "workers load a data set with a length, such as a "
                                "memory-mapped one)")
        if not self.stream:
            for name in ("steps_per_epoch", "shuffle_buffer"):
                if getattr(settings, name):
                    raise KdistillError(f"trainer.{name} applies to a training stream (an "
                                        "IterableDataset); an epoch of a data set with a length "
                                        "is one pass over it in a new random order")

    def first_samples(self, count: int) -> list[dict[str, Any]]:
        """The first ``count`` samples (fewer when there are fewer), in the data's order."""
        if isinstance(self.dataset, IndexedStream):
            return list(islice(self.dataset, count))
        return [self.dataset[i] for i in range(min(count, len(self.dataset)))]

    def schedule(self, phase: Phase, cut: Cut) -> PhaseSchedule:
        """How ``phase`` reads this data: its steps per epoch (in the returned ``cut``) and its
        loaders; refuses data too small for one global batch."""
        if isinstance(self.dataset, IndexedStream):
            return self.stream_schedule(self.dataset, phase, cut)
        indices = train_indices(self.dataset, phase)
        steps = global_batch_count(len(indices), cut.global_batch, cut.shards)
        if steps == 0:
            raise ValueError(f"phase '{phase.name}': {len(indices)} training samples are too "
                             f"few for one global batch of this size")
        return PhaseSchedule(self, replace(cut, steps_per_epoch=steps), indices=indices)

    def stream_schedule(self, stream: IndexedStream, phase: Phase, cut: Cut) -> PhaseSchedule:
        labeled_only = not phase.recipe.uses_unlabeled
        steps, length = self.settings.steps_per_epoch, stream.length
        last = cut.global_batch
        if steps is None:
            if labeled_only:
                raise KdistillError(f"recipe '{phase.recipe.name}' trains on labelled samples "
                                    "only, and how many samples of the training stream are "
                                    "labelled is not known ahead: set trainer.steps_per_epoch")
            if length is None:
                raise KdistillError("the training stream has no length: set "
                                    "trainer.steps_per_epoch (each epoch reads the stream from "
                                    "its start for that many optimizer steps)")
            steps = global_batch_count(length, cut.global_batch, cut.shards)
            if steps == 0:
                raise ValueError(f"phase '{phase.name}': {length} training samples are too few "
                                 f"for one global batch of this size")
            last = min(cut.global_batch, length - (steps - 1) * cut.global_batch)
        return PhaseSchedule(self, replace(cut, steps_per_epoch=steps), last_size=last,
                             labeled_only=labeled_only)


@dataclass
class PhaseSchedule:
    """A phase's reading of the training data: ``cut`` (with its steps per epoch) and either
    the sample ``indices`` it trains on (a data set) or how it reads a stream."""

    data: TrainingSet
    cut: Cut
    indices: torch.Tensor | None = None
    last_size: int = 0
    labeled_only: bool = False

    def feed(self, start: tuple[int, int]) -> PhaseFeed:
        """The micro-batches of the phase from ``start`` (epoch, batch) on."""
        data, cut, settings = self.data, self.cut, self.data.settings
        workers = settings.workers
        options: dict[str, Any] = {
            "collate_fn": data.collate_fn, "num_workers": workers,
            "prefetch_factor": settings.prefetch if workers else None,
            # Worker seeds are drawn from this generator, not from the global one.
            "generator": cut.generator(start[0])}
        if isinstance(data.dataset, IndexedStream):
            stream = StreamMicroBatches(data.dataset, cut, self.last_size,
                                        settings.shuffle_buffer, self.labeled_only, start)
            loader = DataLoader(stream, batch_size=None, **options)
            shortage = (f"the training stream ran out in epoch {{epoch}} before step {{step}} of "
                        f"{cut.steps_per_epoch}: each epoch reads {cut.steps_per_epoch} global "
                        f"batches of {cut.global_batch} samples from the stream's start"
                        + (" (labelled samples only)" if self.labeled_only else ""))
        else:
            assert self.indices is not None
            sampler = MicroBatchSampler(self.indices, cut, start)
            source = data.dataset.dataset
            by_rows = isinstance(source, RowReadable) and source.reads_rows
            if data.collate_fn is collate and by_rows:
                options["collate_fn"] = as_read
                loader = DataLoader(RowBatches(source), sampler=sampler, batch_size=None,
                                    **options)
            else:
                loader = DataLoader(data.dataset, batch_sampler=sampler, **options)
            shortage = "the training data ran out in epoch {epoch} before step {step}"
        return PhaseFeed(loader, cut.accumulation, shortage)


def train_indices(dataset: IndexedDataset, phase: Phase) -> torch.Tensor:
    """The samples a phase trains on: all of them, or the labelled ones for a recipe that
    trains on labelled samples only."""
    if phase.recipe.uses_unlabeled:
        return torch.arange(len(dataset))
    indices = labeled_indices(dataset)
    if not indices:
        raise ValueError(f"recipe '{phase.recipe.name}' trains on labelled samples only and "
                         "the training data has none")
    return torch.tensor(indices, dtype=torch.long)
