"""In-memory data sets, label subsets and train/test splits, following the batch conventions
of :mod:`kdistill.batch` (samples are dicts with ``input``, ``labels`` and ``index``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from kdistill.batch import Task, hidden_like, label_mask


class LabeledDataset(Protocol):
    """What the label subsets and splits need of a data set: its ``labels`` (one entry per
    sample, 1-D, or [N, L] per token) and the same samples with other labels or a subset."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def with_labels(self, labels: torch.Tensor) -> Self: ...

    def select(self, indices: Sequence[int]) -> Self: ...


Data = TypeVar("Data", bound=LabeledDataset)


@runtime_checkable
class RowReadable(Protocol):
    """A data set that can read a micro-batch at once: when ``reads_rows`` is true,
    ``rows(indices)`` is the batch dict that collating the items ``indices`` (with
    :func:`kdistill.batch.collate`) would give, each sample's ``index`` included. The engine
    then reads it a micro-batch at a time instead of item by item, unless the user's
    ``DataLoader`` brings its own ``collate_fn``."""

    @property
    def reads_rows(self) -> bool: ...

    def rows(self, indices: Sequence[int]) -> dict[str, Any]: ...


class ArrayDataset(Dataset):
    """In-memory inputs and labels; item i is ``{"input", "labels", "index"}``, plus a row of
    each further column a subclass declares (:meth:`columns`).

    Integer labels are kept as int64 (classes), float labels as float32 (regression targets).
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor):
        if len(inputs) != len(labels):
            raise ValueError(f"inputs have {len(inputs)} rows but labels have {len(labels)}")
        self.inputs = inputs
        self.labels = labels.float() if labels.is_floating_point() else labels.long()

    def __len__(self) -> int:
        return len(self.inputs)

    def columns(self) -> dict[str, torch.Tensor]:
        """Every field of a sample but its ``index``, one row per sample."""
        return {"input": self.inputs, "labels": self.labels}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.columns().items()}, "index": torch.tensor(i)}

    @property
    def reads_rows(self) -> bool:
        """True unless a subclass changes how an item is read (augmenting it, say): then
        :meth:`rows` would bypass that, and the engine reads items one by one."""
        return type(self).__getitem__ is ArrayDataset.__getitem__

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Samples ``indices`` as one batch, equal to collating their items, read with one
        gather per column (see :class:`RowReadable`)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {**{k: v[index] for k, v in self.columns().items()}, "index": index}

    def with_labels(self, labels: torch.Tensor) -> ArrayDataset:
        """The same inputs with other labels (for example with most of them hidden)."""
        return ArrayDataset(self.inputs, labels)

    def select(self, indices: Sequence[int]) -> ArrayDataset:
        """The samples at ``indices``, in that order, as a data set of the same kind."""
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return ArrayDataset(self.inputs[rows], self.labels[rows])


def as_sample(item: Any, i: int) -> dict[str, Any]:
    """Item ``i`` of a data set as a sample dict carrying its ``index`` (``i`` unless it has
    one): a dict gains an ``index``; an ``(input, label)`` pair becomes
    ``{"input", "labels", "index"}``; a lone tensor becomes ``{"input", "index"}``."""
    if isinstance(item, dict | Mapping):  # a plain dict first: the abc check is slow
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
    if "index" not in sample:  # not setdefault: it would build the tensor every time
        sample["index"] = torch.tensor(i)
    return sample


class IndexedDataset(Dataset):
    """Wraps any data set so each item is a sample dict carrying its ``index`` (its position,
    unless it has one; see :func:`as_sample`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return as_sample(self.dataset[i], i)


class IndexedStream(IterableDataset):
    """Wraps an iterable data set (a stream) so each item is a sample dict carrying its
    ``index``: its position in the stream, unless it has one (see :func:`as_sample`).

    Iterating it iterates the stream from its start; ``length`` is the stream's length, or
    ``None`` when it has none."""

    def __init__(self, stream: Iterable[Any]):
        self.stream = stream

    @property
    def length(self) -> int | None:
        try:
            return len(self.stream)  # type: ignore[arg-type]
        except TypeError:  # no __len__, or one that says it has none
            return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, item in enumerate(self.stream):
            yield as_sample(item, i)


def has_label(sample: Mapping[str, Any]) -> bool:
    """Whether a sample has a known label (one known token label, for per-token labels)."""
    return bool(label_mask(torch.as_tensor(sample["labels"])).any())


def labeled_indices(dataset: Dataset) -> list[int]:
    """Positions of the samples with a known label (see :func:`label_mask`); a sample with
    per-token labels counts when any of its tokens has one."""
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return [i for i in range(len(dataset))  # type: ignore[arg-type]
                if has_label(dataset[i])]
    known = label_mask(torch.as_tensor(labels))
    return torch.nonzero(known.reshape(len(known), -1).any(dim=1)).flatten().tolist()


def keep_labels(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Hide all but ``count`` of the known labels of a 1-D label tensor.

    Integer (class) labels keep as equal a number per class as possible; float (regression)
    labels keep ``count`` labels drawn uniformly without replacement. Returns a copy where hidden
    labels are ``UNLABELED`` or NaN. The choice depends only on ``seed``.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be one per sample (1-D), got shape {tuple(labels.shape)}")
    known = np.flatnonzero(label_mask(labels).numpy())
    if not 0 < count <= len(known):
        raise ValueError(f"labeled count must be between 1 and {len(known)} (the known labels), "
                         f"got {count}")
    rng = np.random.default_rng(seed)
    if labels.is_floating_point():
        chosen = rng.choice(known, size=count, replace=False).tolist()
    else:
        values = labels.numpy()[known]
        per_class = [rng.permutation(known[values == c]) for c in np.unique(values)]
        chosen = []
        rank = 0
        while len(chosen) < count:
            for members in per_class:
                if rank < len(members) and len(chosen) < count:
                    chosen.append(int(members[rank]))
            rank += 1
    hidden = hidden_like(labels)
    hidden[chosen] = labels[chosen]
    return hidden


def holdout_split(dataset: Data, size: int, seed: int) -> tuple[Data, Data]:
    """Hold ``size`` samples of ``dataset`` out: returns (the rest, the held-out samples), each
    a data set of the same kind (made with ``dataset.select``).

    With one integer label per sample the draw is stratified (each class keeps its share in
    both parts; hidden labels count as one more class); other labels are drawn uniformly. Both
    parts keep the data set's order, and the draw depends only on ``seed``.
    """
    # Deferred: scikit-learn takes about two seconds to import and only this split needs it.
    from sklearn.model_selection import train_test_split

    labels = dataset.labels
    stratify = labels.numpy() if labels.ndim == 1 and not labels.is_floating_point() else None
    try:
        kept, held = train_test_split(np.arange(len(dataset)), test_size=size,
                                      random_state=seed, stratify=stratify)
    except ValueError as error:  # too few samples, or a class too small to stratify
        raise ValueError(f"cannot hold {size} of {len(dataset)} samples out: {error}") from None
    return dataset.select(np.sort(kept).tolist()), dataset.select(np.sort(held).tolist())


@dataclass
class DataSplits:
    """A training and a test split plus what models need to know to fit them.

    ``num_classes`` is the width of the model's output: the number of classes, 1 for
    regression. ``task`` says how to read the labels (integer classes, float targets, or integer
    classes per token). ``target_scale`` is ``(mean, std)`` of the raw training targets when
    regression targets were standardised: raw target = label * std + mean. ``label_names``
    names the classes by id (``label_names[i]`` is class i) when the data has names for them.
    ``input_shape`` is ``()`` for raw text.
    """

    name: str
    train: LabeledDataset
    test: LabeledDataset
    num_classes: int
    input_shape: tuple[int, ...]
    task: Task = "classification"
    target_scale: tuple[float, float] | None = None
    label_names: list[str] | None = None
