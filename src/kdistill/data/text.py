"""Raw-text data sets and how tables of labelled text read from files become train/test splits.

A text sample keeps its raw text as ``input`` (see :mod:`kdistill.batch`): a string, a
``(text, text_pair)`` tuple for sentence pairs, or a list of words for token classification;
each model tokenises it itself. :class:`TextDataset` holds texts (or pairs) with one label each,
:class:`WordTagDataset` sentences as word lists with one tag per word. Both follow the contract
of :class:`kdistill.data.ArrayDataset` (``labels``, ``with_labels``, ``select``), so label
subsets and splits work on them unchanged, and both take unlabelled transfer text
(``with_unlabeled``): rows whose labels are hidden, seen only by the distillation terms.

The readers (:mod:`kdistill.data.text_files`, :mod:`kdistill.data.text_hf`) give a
:class:`TextTable` or :class:`TagTable`: raw values plus where each came from, so every error
names the file and line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from kdistill.batch import UNLABELED, hidden_like
from kdistill.data.base import DataSplits, holdout_split
from kdistill.data.labels import LabelType, Where, fit_labels
from kdistill.data.regression import standardise


class TextDataset(Dataset):
    """Texts, optional pair texts and one label each; item i is ``{"input": text or (text,
    pair), "labels", "index"}``. Labels are int64 class ids (``UNLABELED`` = hidden) or float32
    scores (NaN = hidden)."""

    def __init__(self, texts: Sequence[str], labels: torch.Tensor,
                 pairs: Sequence[str] | None = None):
        if labels.ndim != 1 or len(labels) != len(texts):
            raise ValueError(f"{len(texts)} texts need labels shaped [{len(texts)}], got "
                             f"{tuple(labels.shape)}")
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
        self.raw = list(texts)
        self.pairs = None if pairs is None else list(pairs)
        self.labels = labels.float() if labels.is_floating_point() else labels.long()

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        text = self.raw[i] if self.pairs is None else (self.raw[i], self.pairs[i])
        return {"input": text, "labels": self.labels[i], "index": torch.tensor(i)}

    def with_labels(self, labels: torch.Tensor) -> TextDataset:
        """The same texts with other labels (for example with most of them hidden)."""
        return TextDataset(self.raw, labels, self.pairs)

    def select(self, indices: Sequence[int]) -> TextDataset:
        """The samples at ``indices``, in that order."""
        rows = list(indices)
        pairs = None if self.pairs is None else [self.pairs[i] for i in rows]
        return TextDataset([self.raw[i] for i in rows], self.labels[rows], pairs)

    def texts(self) -> list[str]:
        """Every raw text, a pair joined by a space (for building vocabularies)."""
        if self.pairs is None:
            return list(self.raw)
        return [f"{text} {pair}" for text, pair in zip(self.raw, self.pairs, strict=True)]

    def with_unlabeled(self, texts: Sequence[str],
                       pairs: Sequence[str] | None = None) -> TextDataset:
        """These samples followed by ``texts`` (with ``pairs`` when the data set has pairs)
        whose labels are hidden."""
        if (pairs is None) != (self.pairs is None):
            raise ValueError("unlabelled texts need pairs exactly when the data set has them")
        hidden = hidden_like(torch.empty(len(texts), dtype=self.labels.dtype))
        return TextDataset(self.raw + list(texts), torch.cat([self.labels, hidden]),
                           None if self.pairs is None else self.pairs + list(pairs or ()))


class WordTagDataset(Dataset):
    """Sentences as word lists with one tag id per word (``UNLABELED`` = no tag); item i is
    ``{"input": words, "labels": tags [n_words], "index"}``.

    ``labels`` is [N, W] padded with ``UNLABELED`` beyond each sentence (W its longest), so a
    sentence counts as labelled when any of its words has a tag.
    """

    def __init__(self, words: Sequence[Sequence[str]],
                 labels: torch.Tensor | Sequence[torch.Tensor]):
        self.words = [list(sentence) for sentence in words]
        sizes = [len(sentence) for sentence in self.words]
        width = max(sizes, default=0)
        if not isinstance(labels, torch.Tensor):
            tags = list(labels)
            if len(tags) != len(sizes):
                raise ValueError(f"{len(sizes)} sentences but {len(tags)} tag lists")
            for i, (sentence_tags, size) in enumerate(zip(tags, sizes, strict=True)):
                if tuple(sentence_tags.shape) != (size,):
                    raise ValueError(f"sentence {i} has {size} words but tags shaped "
                                     f"{tuple(sentence_tags.shape)} (one tag per word)")
            labels = (pad_sequence(tags, batch_first=True, padding_value=UNLABELED) if tags
                      else torch.zeros(0, 0))
        if labels.ndim != 2 or len(labels) != len(self.words) or labels.shape[1] < width:
            raise ValueError(f"tags for {len(self.words)} sentences of up to {width} words "
                             f"must be shaped [{len(self.words)}, >= {width}], got "
                             f"{tuple(labels.shape)}")
        lengths = torch.tensor(sizes, dtype=torch.long)
        padding = torch.arange(labels.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
        self.labels = labels.long().masked_fill(padding, UNLABELED)
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input": self.words[i], "labels": self.labels[i, :self.sizes[i]],
                "index": torch.tensor(i)}

    def with_labels(self, labels: torch.Tensor) -> WordTagDataset:
        """The same sentences with other tags ([N, >= W], padding ignored)."""
        return WordTagDataset(self.words, labels)

    def select(self, indices: Sequence[int]) -> WordTagDataset:
        """The sentences at ``indices``, in that order."""
        rows = list(indices)
        return WordTagDataset([self.words[i] for i in rows], self.labels[rows])

    def texts(self) -> list[str]:
        """Every sentence as its words joined by spaces (for building vocabularies)."""
        return [" ".join(sentence) for sentence in self.words]

    def with_unlabeled(self, sentences: Sequence[Sequence[str]]) -> WordTagDataset:
        """These sentences followed by ``sentences`` (word lists) without tags."""
        hidden = [torch.full((len(words),), UNLABELED) for words in sentences]
        own = [self.labels[i, :n] for i, n in enumerate(self.sizes)]
        return WordTagDataset(self.words + [list(s) for s in sentences], own + hidden)


def text_value(value: Any, where: str, field: str) -> str:
    """``value`` when it is a non-blank string; otherwise an error naming ``where`` (the file
    and line) and the column or field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: {field} is empty (every row needs a text)")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {field} holds a {type(value).__name__}, not text: "
                         f"{str(value)[:40]}")
    return value


@dataclass
class TextTable:
    """Labelled texts read from ``source``: raw label values, and the line (or row) each row
    came from, for errors."""

    source: str
    texts: list[str]
    labels: list[Any]
    lines: list[int]
    pairs: list[str] | None = None
    unit: str = "line"

    def where(self, row: int) -> str:
        return f"{self.source}, {self.unit} {self.lines[row]}"


@dataclass
class TagTable:
    """Sentences read from ``source``: words, raw tag values (None = no tag) and the line of
    each word, for errors."""

    source: str
    words: list[list[str]]
    tags: list[list[Any]]
    lines: list[list[int]]

    def flat(self) -> tuple[list[Any], Where]:
        """Every tag, sentence after sentence, and where each one is."""
        lines = [n for sentence in self.lines for n in sentence]
        return ([t for tags in self.tags for t in tags],
                lambda k: f"{self.source}, line {lines[k]}")


def held_out(count: int, test_fraction: float) -> int:
    """How many of ``count`` samples a ``test_fraction`` holds out (rounded up, as
    scikit-learn does)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return math.ceil(count * test_fraction)


def text_splits(name: str, train: TextTable, test: TextTable | None, test_fraction: float,
                seed: int, label_type: LabelType = "class",
                labels: Sequence[str] | None = None) -> DataSplits:
    """Train and test splits of labelled texts: ``test`` when given, else a seeded split of
    ``train`` holding ``test_fraction`` out (stratified for classes). Label names are mapped
    to ids (see :mod:`kdistill.data.labels`); regression scores are standardised on the
    training split (``target_scale``)."""
    coder = fit_labels(train.labels, train.where, train.source, label_type, labels)
    train_set = TextDataset(train.texts, coder.encode(train.labels, train.where), train.pairs)
    if test is None:
        train_set, test_set = holdout_split(train_set, held_out(len(train_set), test_fraction),
                                            seed)
    else:
        test_set = TextDataset(test.texts, coder.encode(test.labels, test.where), test.pairs)
    scale = None
    if coder.names is None:
        y_train, y_test, mean, std = standardise(train_set.labels.double().numpy(),
                                                 test_set.labels.double().numpy())
        train_set = train_set.with_labels(torch.as_tensor(y_train, dtype=torch.float32))
        test_set = test_set.with_labels(torch.as_tensor(y_test, dtype=torch.float32))
        scale = (float(mean), float(std))
    classes = 1 if coder.names is None else len(coder.names)  # one output for regression
    return DataSplits(name, train_set, test_set, num_classes=classes, input_shape=(),
                      task=coder.task, target_scale=scale, label_names=coder.names)


def tag_splits(name: str, train: TagTable, test: TagTable | None, test_fraction: float,
               seed: int, labels: Sequence[str] | None = None) -> DataSplits:
    """Train and test splits of tagged sentences: ``test`` when given, else a seeded random
    split of ``train``. Tag names are mapped to ids like class labels."""
    values, where = train.flat()
    coder = fit_labels(values, where, train.source, "class", labels, missing_allowed=True)

    def dataset(table: TagTable) -> WordTagDataset:
        ids = coder.encode(*table.flat(), missing_allowed=True)
        return WordTagDataset(table.words, list(ids.split([len(w) for w in table.words])))

    train_set = dataset(train)
    if test is None:
        train_set, test_set = holdout_split(train_set, held_out(len(train_set), test_fraction),
                                            seed)
    else:
        test_set = dataset(test)
    assert coder.names is not None
    return DataSplits(name, train_set, test_set, num_classes=len(coder.names), input_shape=(),
                      task="token_classification", label_names=coder.names)
