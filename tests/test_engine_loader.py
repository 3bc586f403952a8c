"""Training data through a DataLoader (kdistill.engine.feed): workers and prefetch never change
the batches, a resume inside an epoch is exact with and without workers, accumulation equals
one big batch, and a stream trains in its order, through a seeded shuffle buffer, for
``steps_per_epoch`` steps, and resumes exactly."""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kdistill import Distiller
from kdistill.batch import UNLABELED
from kdistill.batching import buffer_shuffle, epoch_global_batches
from kdistill.checkpoint import latest_checkpoint, load_checkpoint
from kdistill.data.base import ArrayDataset, IndexedStream
from kdistill.engine import feed
from kdistill.errors import KdistillError


class Killed(RuntimeError):
    """Stands for the process dying."""


class Recorder(nn.Module):
    """Wraps a model; records the marker pixel (the sample index) of every training forward and
    calls ``on_forward`` before each."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.seen: list[int] = []
        self.on_forward = lambda: None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.on_forward()
            self.seen += x[:, 0, 0, 0].detach().round().long().tolist()
        return self.inner(x)


def marked(data: ArrayDataset) -> ArrayDataset:
    """``data`` with each sample's index in its first pixel."""
    data.inputs[:, 0, 0, 0] = torch.arange(len(data), dtype=torch.float32)
    return data


def kill_on_forward(model: Recorder, count: int) -> None:
    """Make the ``count``-th training forward of ``model`` die (a kill in the middle of a step)."""
    calls = [0]

    def die() -> None:
        calls[0] += 1
        if calls[0] == count:
            raise Killed(f"forward {count}")

    model.on_forward = die


def same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class Stream(IterableDataset):
    """The samples of ``data`` in order, as a stream without their indices."""

    def __init__(self, data: ArrayDataset):
        self.data = data

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(len(self.data)):
            yield {"input": self.data.inputs[i], "labels": self.data.labels[i]}


class SizedStream(Stream):
    def __len__(self) -> int:
        return len(self.data)


class PidLogged(Dataset):
    """``data``, writing the id of the process that loads each sample to ``log``."""

    def __init__(self, data: ArrayDataset, log: Path):
        self.data, self.log = data, log

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with self.log.open("a") as out:
            out.write(f"{os.getpid()}\n")
        return self.data[i]


def hinton(student: nn.Module, teacher: nn.Module, run_dir: Path | None = None,
           **settings: Any) -> Distiller:
    return Distiller(student, teacher, "hinton", run_dir=run_dir, progress=False,
                     **{"optimizer": {"name": "adamw", "lr": 0.01}, **settings})


# --------------------------------------------------------------------------- data sets


def test_workers_load_the_batches_and_never_change_them(tmp_path, digits_subset, make_mlp):
    data = marked(digits_subset(64, labeled=20))
    teacher = make_mlp(seed=1, hidden=(32,))
    runs = {}
    for workers in (0, 2):
        log = tmp_path / f"pids-{workers}"
        student = Recorder(make_mlp(seed=0, dropout=0.3))
        hinton(student, teacher, epochs=2, batch_size=8, accumulation=2,
               workers=workers).fit(PidLogged(data, log))
        loads = Counter(log.read_text().split())
        runs[workers] = student
        # This process loads the recipe's first micro-batch (8 samples); the training batches
        # (64 samples x 2 epochs) come from the workers.
        trainer = loads.pop(str(os.getpid()))
        if workers:
            assert trainer == 8 and len(loads) == 2 and sum(loads.values()) == 128
        else:
            assert trainer == 8 + 128 and not loads
    expected = [i for epoch in (0, 1)
                for batch in epoch_global_batches(list(range(64)), 16, 2, 0, 0, epoch)
                for i in batch]
    assert runs[0].seen == runs[2].seen == expected
    assert same_state(runs[0], runs[2])  # bit for bit, dropout masks included


@pytest.mark.parametrize(("killed", "resumed"), [(0, 0), (2, 2), (0, 2)])
def test_a_resume_inside_an_epoch_is_exact_with_workers(tmp_path, digits_subset, make_mlp,
                                                        killed, resumed):
    # 96 samples, micro-batches of 8, accumulation 2: 6 steps an epoch, 2 forwards a step.
    # Checkpoints every 4 steps; the run dies in step 6's first forward, so it resumes from
    # step 4, two thirds into the first epoch. The uninterrupted run has no workers.
    data = marked(digits_subset(96, labeled=30))
    teacher = make_mlp(seed=1, hidden=(32,))
    settings = {"epochs": 2, "batch_size": 8, "accumulation": 2, "checkpoint_every": 4}
    full = Recorder(make_mlp(seed=0, dropout=0.3))
    expected = hinton(full, teacher, tmp_path / "full", **settings).fit(data)

    stopped = Recorder(make_mlp(seed=0, dropout=0.3))
    kill_on_forward(stopped, 11)
    with pytest.raises(Killed):
        hinton(stopped, teacher, tmp_path / "run", workers=killed, **settings).fit(data)
    position = load_checkpoint(latest_checkpoint(tmp_path / "run")).trainer
    assert (position["global_step"], position["epoch"], position["batch"]) == (4, 0, 4)

    fresh = Recorder(make_mlp(seed=5, dropout=0.3))
    resumed_run = hinton(fresh, teacher, tmp_path / "run", workers=resumed,
                         **settings).fit(data, resume=True)
    assert same_state(fresh, full)
    assert resumed_run.history == expected.history
    assert fresh.seen == full.seen[4 * 16:]  # the batches after the checkpoint, in order


@pytest.mark.parametrize("workers", [0, 2])
def test_accumulation_equals_one_big_batch_with_workers(digits_subset, make_mlp, weights_diff,
                                                        take_snapshot, workers):
    # Labelled counts differ between micro-batches: the CE term must be normalised by the
    # labelled samples of the whole global batch. Four SGD steps of 16 samples.
    data = digits_subset(64, labeled=20)
    teacher = make_mlp(seed=1, hidden=(32,))
    initial = make_mlp(seed=0)
    sgd = {"name": "sgd", "lr": 0.5, "momentum": 0.0}
    big = copy.deepcopy(initial)
    hinton(big, teacher, epochs=1, batch_size=16, optimizer=sgd).fit(data)
    accumulated = copy.deepcopy(initial)
    hinton(accumulated, teacher, epochs=1, batch_size=8, accumulation=2, optimizer=sgd,
           workers=workers).fit(data)
    assert weights_diff(take_snapshot(big), take_snapshot(initial)) > 1e-2
    assert weights_diff(take_snapshot(accumulated), take_snapshot(big)) < 1e-6


def test_prefetch_sets_how_far_workers_load_ahead(digits_subset, make_mlp, monkeypatch):
    # The sampler hands each micro-batch's indices to a worker: at the first training forward,
    # workers x prefetch were handed out to start with plus one for the batch taken, then one
    # more per batch taken, until the 8 micro-batches of the phase are out.
    handed = [0]
    real = feed.MicroBatchSampler.__iter__

    def counting(self: feed.MicroBatchSampler) -> Iterator[list[int]]:
        for micro in real(self):
            handed[0] += 1
            yield micro

    monkeypatch.setattr(feed.MicroBatchSampler, "__iter__", counting)
    data = digits_subset(32)
    for workers, prefetch, expected in [(0, 2, [1, 2, 3, 4, 5, 6, 7, 8]),
                                        (2, 1, [3, 4, 5, 6, 7, 8, 8, 8]),
                                        (2, 3, [7, 8, 8, 8, 8, 8, 8, 8])]:
        handed[0] = 0
        student = Recorder(make_mlp(seed=0))
        at_forward: list[int] = []
        student.on_forward = lambda at=at_forward: at.append(handed[0])
        Distiller(student, None, "ce", epochs=1, batch_size=4, workers=workers,
                  prefetch=prefetch, progress=False).fit(data)
        assert at_forward == expected, (workers, prefetch)


def test_a_users_data_loader_gives_its_batch_size_and_collate(digits_subset, make_mlp):
    # Its data set, batch size and collate function are used; the engine draws the order.
    data = marked(digits_subset(32))
    collated: list[int] = []

    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        collated.append(len(samples))
        return torch.utils.data.default_collate(samples)

    student = Recorder(make_mlp(seed=0))
    Distiller(student, None, "ce", epochs=1, progress=False).fit(
        DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate))
    assert collated == [8] * 5  # the recipe's first batch, then 4 steps
    assert student.seen == [i for batch in epoch_global_batches(list(range(32)), 8, 1, 0, 0, 0)
                            for i in batch]


# --------------------------------------------------------------------------- streams


def test_a_stream_trains_in_its_order_and_numbers_its_samples(digits_subset, make_mlp):
    data = marked(digits_subset(64))
    student = Recorder(make_mlp(seed=0))
    result = Distiller(student, make_mlp(seed=1), "hinton", epochs=2, batch_size=12,
                       progress=False).fit(SizedStream(data))
    # 64 samples make 5 global batches of 12 and a last one of 4, each epoch from the start.
    assert [r["step"] for r in result.history if r["kind"] == "train"] == list(range(1, 13))
    assert student.seen == list(range(64)) * 2
    samples = list(IndexedStream(Stream(data)))
    assert [int(s["index"]) for s in samples] == list(range(64))  # positions in the stream
    given = list(IndexedStream([{"input": torch.zeros(1), "index": torch.tensor(7)}]))
    assert int(given[0]["index"]) == 7


def test_the_shuffle_buffer_shuffles_a_stream_locally_by_seed(digits_subset, make_mlp):
    data = marked(digits_subset(64))

    def order(seed: int, buffer: int) -> list[int]:
        student = Recorder(make_mlp(seed=0))
        Distiller(student, make_mlp(seed=1), "hinton", epochs=2, batch_size=16, seed=seed,
                  shuffle_buffer=buffer, progress=False).fit(SizedStream(data))
        return student.seen

    shuffled = order(seed=0, buffer=8)
    epochs = shuffled[:64], shuffled[64:]
    for epoch in epochs:
        assert sorted(epoch) == list(range(64)) and epoch != list(range(64))
        # A sample leaves the buffer at most buffer - 1 = 7 places before it came in.
        assert all(position >= sample - 7 for position, sample in enumerate(epoch))
    assert max(sample - position for position, sample in enumerate(epochs[0])) > 0
    assert epochs[0] != epochs[1]  # each epoch its own draw
    assert order(seed=0, buffer=8) == shuffled
    assert order(seed=1, buffer=8) != shuffled
    assert order(seed=0, buffer=0) == list(range(64)) * 2


def test_buffer_shuffle_holds_at_most_its_size() -> None:
    held: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            held.append(i)
            yield i

    out = []
    for item in buffer_shuffle(items(), 10, torch.Generator().manual_seed(0)):
        out.append(item)
        assert len(held) - len(out) <= 10  # read but not yet given out
    assert sorted(out) == list(range(100))
    everything = list(buffer_shuffle(range(20), 50, torch.Generator().manual_seed(0)))
    assert sorted(everything) == list(range(20)) and everything != list(range(20))


def test_steps_per_epoch_sets_a_streams_epoch(digits_subset, make_mlp):
    data = marked(digits_subset(64))

    def run(**settings: Any) -> tuple[Recorder, list[dict[str, Any]]]:
        student = Recorder(make_mlp(seed=0))
        result = Distiller(student, make_mlp(seed=1), "hinton", epochs=2, batch_size=8,
                           progress=False, **settings).fit(Stream(data))
        return student, result.history

    student, history = run(steps_per_epoch=3)
    assert [r["step"] for r in history if r["kind"] == "train"] == list(range(1, 7))
    assert student.seen == list(range(24)) * 2  # each epoch reads the stream from its start

    with pytest.raises(KdistillError) as error:
        run()
    assert str(error.value) == ("the training stream has no length: set trainer.steps_per_epoch "
                                "(each epoch reads the stream from its start for that many "
                                "optimizer steps)")
    with pytest.raises(KdistillError) as error:
        run(steps_per_epoch=9)  # 72 samples an epoch; the stream holds 64
    assert str(error.value) == ("the training stream ran out in epoch 1 before step 9 of 9: "
                                "each epoch reads 9 global batches of 8 samples from the "
                                "stream's start")


def test_a_labelled_only_recipe_reads_the_labelled_samples_of_a_stream(digits_subset,
                                                                       make_mlp):
    data = marked(digits_subset(64, labeled=20))
    labelled = [i for i in range(64) if int(data.labels[i]) != UNLABELED]
    student = Recorder(make_mlp(seed=0))
    Distiller(student, None, "ce", epochs=1, batch_size=5, steps_per_epoch=4,
              progress=False).fit(SizedStream(data))
    assert student.seen == labelled
    with pytest.raises(KdistillError) as error:
        Distiller(make_mlp(seed=0), None, "ce", epochs=1, progress=False).fit(SizedStream(data))
    assert str(error.value) == ("recipe 'ce' trains on labelled samples only, and how many "
                                "samples of the training stream are labelled is not known "
                                "ahead: set trainer.steps_per_epoch")


@pytest.mark.parametrize(("killed", "resumed"), [(0, 0), (1, 0)])
def test_a_stream_resumes_exactly_inside_an_epoch(tmp_path, digits_subset, make_mlp, killed,
                                                  resumed):
    # 96 samples through a shuffle buffer of 10; micro-batches of 8, accumulation 2: 6 steps
    # an epoch. The run dies in step 6 and resumes from the checkpoint of step 4.
    data = marked(digits_subset(96, labeled=30))
    teacher = make_mlp(seed=1, hidden=(32,))
    settings = {"epochs": 2, "batch_size": 8, "accumulation": 2, "checkpoint_every": 4,
                "shuffle_buffer": 10}
    full = Recorder(make_mlp(seed=0, dropout=0.3))
    expected = hinton(full, teacher, tmp_path / "full", **settings).fit(SizedStream(data))
    assert full.seen[:96] != list(range(96))

    stopped = Recorder(make_mlp(seed=0, dropout=0.3))
    kill_on_forward(stopped, 11)
    with pytest.raises(Killed):
        hinton(stopped, teacher, tmp_path / "run", workers=killed,
               **settings).fit(SizedStream(data))
    fresh = Recorder(make_mlp(seed=5, dropout=0.3))
    resumed_run = hinton(fresh, teacher, tmp_path / "run", workers=resumed,
                         **settings).fit(SizedStream(data), resume=True)
    assert same_state(fresh, full)
    assert resumed_run.history == expected.history
    assert fresh.seen == full.seen[4 * 16:]


def test_settings_that_do_not_apply_to_the_data_are_refused(digits_subset, make_mlp):
    data = digits_subset(32)
    with pytest.raises(KdistillError) as error:
        Distiller(make_mlp(seed=0), None, "ce", workers=2, steps_per_epoch=2,
                  progress=False).fit(Stream(data))
    assert str(error.value) == ("trainer.workers is 2, but a training stream is read in order "
                                "by one worker: set workers to 0 or 1 (more workers load a data "
                                "set with a length, such as a memory-mapped one)")
    for name, value in [("steps_per_epoch", 2), ("shuffle_buffer", 16)]:
        with pytest.raises(KdistillError) as error:
            Distiller(make_mlp(seed=0), None, "ce", progress=False, **{name: value}).fit(data)
        assert str(error.value) == (f"trainer.{name} applies to a training stream (an "
                                    "IterableDataset); an epoch of a data set with a length is "
                                    "one pass over it in a new random order")
