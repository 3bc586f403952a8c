"""The stream feed, unit by unit: batch sizes, resumes in a later epoch and the schedule of a
stream with a length (exact micro-batches, computed by hand)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kdistill.batch import collate
from kdistill.data.base import ArrayDataset, IndexedStream
from kdistill.engine.feed import Cut, StreamMicroBatches, TrainingSet
from kdistill.engine.phases import Phase
from kdistill.recipes import build_recipe
from kdistill.settings import TrainerSettings


class Numbers(IterableDataset):
    """``count`` samples whose input is their position; a length."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return iter({"input": torch.tensor([float(i)]), "labels": torch.tensor(0)}
                    for i in range(self.count))


def cut(epochs: int, steps: int, micro_batch: int = 4) -> Cut:
    return Cut(micro_batch=micro_batch, accumulation=1, processes=1, rank=0, seed=3, phase=0,
               epochs=epochs, steps_per_epoch=steps)


def positions(feed: StreamMicroBatches) -> list[list[int]]:
    return [[int(s["index"]) for s in micro] for micro in feed]


def test_the_last_global_batch_of_an_epoch_has_the_last_size() -> None:
    feed = StreamMicroBatches(IndexedStream(Numbers(10)), cut(1, 3), last_size=2,
                              shuffle_buffer=0, labeled_only=False, start=(0, 0))
    assert positions(feed) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_stream_resumed_in_a_later_epoch_gives_the_rest_of_the_uninterrupted_run() -> None:
    def run(start: tuple[int, int]) -> list[list[int]]:
        return positions(StreamMicroBatches(IndexedStream(Numbers(12)), cut(3, 3), last_size=4,
                                            shuffle_buffer=5, labeled_only=False, start=start))

    whole = run((0, 0))
    assert len(whole) == 9 and whole[:3] != whole[3:6]  # the buffer reshuffles each epoch
    assert run((1, 1)) == whole[4:]
    assert run((2, 0)) == whole[6:]


def schedule(count: int, batch_size: int, accumulation: int = 1) -> Any:
    data = TrainingSet(Numbers(count), TrainerSettings(batch_size=batch_size,
                                                       accumulation=accumulation))
    return data.schedule(Phase(build_recipe("hinton"), 2, name="kd"),
                         Cut(batch_size, accumulation, 1, 0, 0, 0, 2))


def test_a_streams_length_sets_its_steps_and_its_last_batch() -> None:
    one = schedule(5, 4)  # one full batch of 4 and a last one of 1
    assert (one.cut.steps_per_epoch, one.last_size) == (2, 1)
    exact = schedule(4, 4)  # exactly one global batch: one step
    assert (exact.cut.steps_per_epoch, exact.last_size) == (1, 4)
    assert schedule(3, 4).cut.steps_per_epoch == 1  # a short last batch is kept
    with pytest.raises(ValueError) as error:  # 4 micro-batches of 1: 3 samples cannot fill one
        schedule(3, 1, accumulation=4)
    assert str(error.value) == ("phase 'kd': 3 training samples are too few for one global "
                                "batch of this size")


class CountedArrays(ArrayDataset):
    """An in-memory data set counting its micro-batch reads."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        super().__init__(inputs, labels)
        self.row_reads: list[int] = []

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        self.row_reads.append(len(indices))
        return super().rows(indices)


class Augmented(CountedArrays):
    """A subclass changing how an item is read (here: doubling its input)."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {**item, "input": 2 * item["input"]}


class ItemsOnly(Dataset):
    """The same samples, read only item by item."""

    def __init__(self, arrays: ArrayDataset):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.arrays[i]


def micro_batches(data: Dataset | DataLoader, workers: int = 0) -> list[dict[str, Any]]:
    settings = TrainerSettings(batch_size=3, accumulation=2, workers=workers, epochs=2)
    planned = TrainingSet(data, settings).schedule(Phase(build_recipe("hinton"), 2, name="kd"),
                                                   Cut(3, 2, 1, 0, 5, 0, 2))
    feed = planned.feed((0, 1))
    steps = [feed.step(e, b) for e in range(2) for b in range(planned.cut.steps_per_epoch)
             if (e, b) >= (0, 1)]
    feed.close()
    return [micro for step in steps for micro in step]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_row_readable_data_set_is_read_a_micro_batch_at_once_with_the_same_batches(
        workers: int) -> None:
    arrays = CountedArrays(torch.randn(13, 4), torch.arange(13) % 3)
    by_rows, by_items = micro_batches(arrays, workers), micro_batches(ItemsOnly(arrays))
    # 2 steps of 2 micro-batches of 3 an epoch (the 13th sample cannot fill 2 micro-batches),
    # from the second step of 2 epochs: 6 micro-batches
    assert len(by_rows) == len(by_items) == 6
    if not workers:  # (a worker counts in its own copy)
        assert arrays.row_reads == [3] * 6
    for rows, items in zip(by_rows, by_items, strict=True):
        assert rows.keys() == items.keys()
        assert all(torch.equal(rows[k], items[k]) for k in rows)


def test_a_users_collate_fn_reads_a_row_readable_data_set_item_by_item() -> None:
    arrays = CountedArrays(torch.randn(13, 4), torch.arange(13) % 3)
    seen: list[int] = []

    def counting_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        seen.append(len(samples))
        return collate(samples)

    batches = micro_batches(DataLoader(arrays, batch_size=3, collate_fn=counting_collate))
    assert seen == [3] * 6 and not arrays.row_reads and len(batches) == 6


def test_a_subclass_reading_items_its_own_way_is_read_item_by_item() -> None:
    augmented = Augmented(torch.randn(13, 4), torch.arange(13) % 3)
    assert not augmented.reads_rows and CountedArrays(torch.zeros(1), torch.zeros(1)).reads_rows
    batches = micro_batches(augmented)
    assert not augmented.row_reads
    for batch in batches:
        assert torch.equal(batch["input"], 2 * augmented.inputs[batch["index"]])
