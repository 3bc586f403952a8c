"""A small built-in token-classification set with distant labels (DS-NER style), generated.

Every sentence is a sequence of word ids; the task is to tag each word ``O`` (0) or with the
entity type of the mention it belongs to: ``PER`` (1), ``LOC`` (2), ``ORG`` (3) - one tag per
word (IO scheme, no B/I distinction). The generating rule, all draws from ``seed``:

* vocabulary: id 0 is padding; ids 1-30 are filler words; each type has two trigger words
  (PER 31-32, LOC 33-34, ORG 35-36) and ten entity words (PER 37-46, LOC 47-56, ORG 57-64
  plus 55 and 56): the last two LOC words are also ORG words (ambiguous names, such as a city
  that is also a team), so only the context tells their type;
* a sentence has a length drawn uniformly from ``min_length`` .. ``max_length``; it is filled
  left to right, each slot starting an entity mention with probability ``mention_rate`` and
  holding a filler word otherwise; a mention has a type drawn uniformly, is preceded by one of
  its type's trigger words with probability ``trigger_rate`` (the trigger is tagged ``O``) and
  has one or two entity words of its type; a sentence is cut at its length;
* gold tags: each entity word of a mention carries the mention's type, every other word ``O``.

The training split carries **distant labels** instead of the gold ones, as a dictionary matcher
would produce them: each mention is found with probability ``coverage`` and keeps its gold
type, and a mention the matcher misses is tagged ``O`` throughout (incomplete annotation, the
main noise of distant supervision: false negatives, never false positives). The test split keeps
the gold tags. ``make_tagging`` also returns the training split's gold tags, to measure how far a
method repairs the distant labels.

Samples are ``{"input": ids [L], "labels": tags [L], "attention_mask": [L], "index"}``, padded
to ``max_length`` with id 0, tag -100 and mask 0 (padding is always at the end).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdistill.batch import UNLABELED
from kdistill.data.base import ArrayDataset, DataSplits

TAGS = ("O", "PER", "LOC", "ORG")
PAD_ID = 0
FILLERS = range(1, 31)
TRIGGERS = {1: (31, 32), 2: (33, 34), 3: (35, 36)}
ENTITY_WORDS = {1: tuple(range(37, 47)), 2: tuple(range(47, 57)), 3: (*range(57, 65), 55, 56)}
VOCAB_SIZE = 65  # ids 0 .. 64


class TokenDataset(ArrayDataset):
    """Token ids [N, L] with per-token labels [N, L] and an ``attention_mask`` [N, L]; item i is
    ``{"input", "labels", "attention_mask", "index"}``."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        super().__init__(inputs, labels)
        if attention_mask.shape != inputs.shape or labels.shape != inputs.shape:
            raise ValueError(f"token inputs {tuple(inputs.shape)}, labels "
                             f"{tuple(labels.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must have the same shape [N, L]")
        self.attention_mask = attention_mask.long()

    def columns(self) -> dict[str, torch.Tensor]:
        return {**super().columns(), "attention_mask": self.attention_mask}

    def with_labels(self, labels: torch.Tensor) -> TokenDataset:
        """The same sentences with other per-token labels."""
        return TokenDataset(self.inputs, labels, self.attention_mask)

    def select(self, indices: Sequence[int]) -> TokenDataset:
        """The sentences at ``indices``, in that order."""
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        return TokenDataset(self.inputs[rows], self.labels[rows], self.attention_mask[rows])


@dataclass
class TaggingArrays:
    """Generated sentences: ids, gold tags, distant tags and the mask, each [N, L] int64 (tags
    are -100 on padding)."""

    ids: np.ndarray
    gold: np.ndarray
    distant: np.ndarray
    mask: np.ndarray


def _sentence(rng: np.random.Generator, length: int, mention_rate: float,
              trigger_rate: float) -> tuple[list[int], list[int], list[int]]:
    """One sentence: word ids, gold tags and the id of the mention each word belongs to
    (-1 outside mentions)."""
    ids: list[int] = []
    tags: list[int] = []
    mention: list[int] = []
    count = 0
    while len(ids) < length:
        if rng.random() >= mention_rate:
            ids.append(int(rng.choice(FILLERS)))
            tags.append(0)
            mention.append(-1)
            continue
        kind = int(rng.integers(1, len(TAGS)))
        if rng.random() < trigger_rate:
            ids.append(int(rng.choice(TRIGGERS[kind])))
            tags.append(0)
            mention.append(-1)
        for _ in range(int(rng.integers(1, 3))):
            ids.append(int(rng.choice(ENTITY_WORDS[kind])))
            tags.append(kind)
            mention.append(count)
        count += 1
    return ids[:length], tags[:length], mention[:length]


def make_tagging(samples: int = 800, min_length: int = 6, max_length: int = 16,
                 mention_rate: float = 0.25, trigger_rate: float = 0.7, coverage: float = 0.6,
                 seed: int = 0) -> TaggingArrays:
    """Generate ``samples`` sentences by the rule in the module docstring."""
    if not 1 <= min_length <= max_length:
        raise ValueError(f"tagging: need 1 <= min_length <= max_length, got {min_length} and "
                         f"{max_length}")
    for name, value in (("mention_rate", mention_rate), ("trigger_rate", trigger_rate),
                        ("coverage", coverage)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"tagging: {name} must be in [0, 1], got {value}")
    if samples < 1:
        raise ValueError(f"tagging: samples must be at least 1, got {samples}")
    rng = np.random.default_rng(seed)
    shape = (samples, max_length)
    ids = np.full(shape, PAD_ID, dtype=np.int64)
    gold = np.full(shape, UNLABELED, dtype=np.int64)
    distant = np.full(shape, UNLABELED, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    for row in range(samples):
        length = int(rng.integers(min_length, max_length + 1))
        words, tags, mention = _sentence(rng, length, mention_rate, trigger_rate)
        found = rng.random(max(mention) + 1) < coverage if max(mention) >= 0 else np.zeros(0)
        ids[row, :length] = words
        gold[row, :length] = tags
        distant[row, :length] = [t if m < 0 or found[m] else 0 for t, m in zip(tags, mention,
                                                                                   strict=True)]
        mask[row, :length] = 1
    return TaggingArrays(ids, gold, distant, mask)


def load_tagging(test_fraction: float = 0.25, seed: int = 0, samples: int = 800,
                 coverage: float = 0.6) -> DataSplits:
    """The generated tagging set: the first ``1 - test_fraction`` of the sentences for training
    with distant labels, the rest for testing with gold labels. ``input_shape`` is
    ``(max_length,)``; models need ``vocab_size >= VOCAB_SIZE``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"tagging: test_fraction must be in (0, 1), got {test_fraction}")
    arrays = make_tagging(samples=samples, coverage=coverage, seed=seed)
    cut = int(round(samples * (1 - test_fraction)))
    if not 0 < cut < samples:
        raise ValueError(f"tagging: {samples} samples cannot be split with test_fraction "
                         f"{test_fraction}")

    def split(rows: slice, labels: np.ndarray) -> TokenDataset:
        return TokenDataset(torch.as_tensor(arrays.ids[rows]), torch.as_tensor(labels[rows]),
                            torch.as_tensor(arrays.mask[rows]))

    train, test = slice(0, cut), slice(cut, samples)
    return DataSplits("tagging", split(train, arrays.distant), split(test, arrays.gold),
                      num_classes=len(TAGS), input_shape=(arrays.ids.shape[1],),
                      task="token_classification")
