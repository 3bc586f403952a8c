"""Batch conventions shared by every layer of kdistill.

A sample is a dict with ``input`` (or model-specific keys such as ``input_ids``), ``labels`` and
``index``, the sample's position in its data set, on which memory banks and caches key. A batch
is the same dict with stacked tensors.

Text samples keep their raw text as ``input``: a string, a ``(text, text_pair)`` tuple for
sentence pairs, or a list of words for token classification. Each model tokenises the raw
text itself, so a batch of text stays a list of those values; per-word labels of different
lengths are padded with ``UNLABELED`` and an ``attention_mask`` marks the real words.

Labels are integer class ids for classification, per token for token classification, and floats
for regression. ``UNLABELED`` (-100, the value PyTorch's and Hugging Face's losses ignore) marks
an integer label that is hidden or a padding token that has none; NaN marks a hidden regression
score. :func:`label_mask` tells the known labels of either kind.

Sequence recognition with CTC (task ``ctc``): a sample's ``labels`` are its target sequence of
token ids, padded at the end with ``UNLABELED`` to the data set's longest target, and its
``TARGET_LENGTHS`` entry is the number of tokens (0: the sample's target is hidden). The model
reads the whole input and gives per-frame logits [B, T, C] whose last class, C - 1, is the CTC
blank; targets are ids 0 .. C - 2. The ``TARGET_LENGTHS`` key is what marks a batch as CTC.

Sentence embeddings (task ``embedding``): samples are texts whose labels, when known, are
classes (they serve the linear probe of the evaluation); the model answers one embedding per
text, marked as such by its output (:func:`kdistill.taps.is_sentence_embedding`).

Retrieval (task ``retrieval``): a training sample is a query with its passages, ``{"input":
query, "passages": [positive, hard negative, ...], "relevant": [every passage text relevant to
the query], "index": i}``. :func:`collate` turns such samples into one batch of texts: ``input``
holds the B queries followed by the P distinct passages of the batch (each passage text once,
in order of first appearance), and ``index`` [B] the queries' sample indices, so every query
meets its own positive and hard negatives and, as in-batch negatives, the other queries'
passages. ``positive`` [B] is the column (0 .. P-1) of each query's own positive and
``relevance`` [B, P] marks the passages relevant to each query (its positive, and any other
passage of the batch it is relevant to). Evaluation rows are single texts (queries, then the
passage collection) whose ``passage`` flag tells them apart; a query's ``labels`` are the
numbers of its relevant passages in the collection, padded with ``UNLABELED``.

Language modelling (task ``lm``): samples are token blocks already tokenised, read by the model
as Hugging Face keyword inputs: ``input_ids`` and ``attention_mask`` [L] (plus
``decoder_input_ids`` and ``decoder_attention_mask`` [T] for an encoder-decoder model).
``labels`` hold, at each position of the model's output (the decoder's for an encoder-decoder
model), the next token it must predict, ``UNLABELED`` where nothing is predicted (padding, the
last token of a text, a prompt); the model answers logits [B, L, V] over its vocabulary.
``TOKEN_MASK`` [L] marks the positions with a label: the key marks a batch as a language
modelling batch, and the engine counts its ``tokens`` unit on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate

UNLABELED = -100
TARGET_LENGTHS = "target_lengths"
PASSAGES = "passages"  # a retrieval sample's passages: its positive first, then hard negatives
RELEVANT = "relevant"  # a retrieval sample's relevant passage texts
POSITIVE = "positive"  # a retrieval batch's column of each query's own positive [B]
RELEVANCE = "relevance"  # a retrieval batch's relevance of each passage to each query [B, P]
PASSAGE_ROW = "passage"  # an evaluation row of retrieval: a passage (True) or a query (False)
TOKEN_MASK = "token_mask"
Task = Literal["classification", "regression", "token_classification", "ctc", "embedding",
               "retrieval", "lm"]


def label_mask(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the known labels: integer labels other than ``UNLABELED``, float
    (regression) labels that are not NaN. Same shape as ``labels``."""
    if labels.is_floating_point():
        return ~torch.isnan(labels)
    return labels != UNLABELED


def hidden_like(labels: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``labels`` with every label hidden (``UNLABELED`` or NaN)."""
    return torch.full_like(labels, float("nan") if labels.is_floating_point() else UNLABELED)


def _is_raw_text(value: Any) -> bool:
    return isinstance(value, str | tuple | list)


def _pad_words(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-word labels [B, W] padded with ``UNLABELED`` and the word mask [B, W]."""
    labels = [torch.as_tensor(s["labels"]) for s in samples]
    lengths = torch.tensor([len(words) for words in labels])
    padded = pad_sequence(labels, batch_first=True, padding_value=UNLABELED)
    mask = (torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"labels": padded, "attention_mask": mask}


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts into one batch dict.

    Tensors and numbers are stacked (torch's default collation). Raw text (strings, pairs,
    word lists) stays a list with one entry per sample; with word lists, the per-word labels
    are padded with ``UNLABELED`` and ``attention_mask`` [B, W] marks the real words.
    """
    samples = list(samples)
    if samples and PASSAGES in samples[0]:
        return collate_retrieval(samples)
    if not samples or not _is_raw_text(samples[0].get("input")):
        return default_collate(samples)
    batch: dict[str, Any] = {"input": [s["input"] for s in samples]}
    rest = [{k: v for k, v in s.items() if k != "input"} for s in samples]
    if isinstance(samples[0]["input"], list):
        batch.update(_pad_words(samples))
        rest = [{k: v for k, v in r.items() if k not in ("labels", "attention_mask")}
                for r in rest]
    if rest[0]:
        batch.update(default_collate(rest))
    return batch


def collate_retrieval(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One retrieval batch of queries with their passages (see the module doc): ``input`` the
    B queries then the P distinct passages, ``index`` [B], ``positive`` [B] and ``relevance``
    [B, P]."""
    columns: dict[str, int] = {}
    for sample in samples:
        for passage in sample[PASSAGES]:
            columns.setdefault(passage, len(columns))
    relevance = torch.zeros(len(samples), len(columns), dtype=torch.bool)
    for row, sample in enumerate(samples):
        for passage in sample[RELEVANT]:
            if passage in columns:
                relevance[row, columns[passage]] = True
    positive = torch.tensor([columns[s[PASSAGES][0]] for s in samples])
    relevance[torch.arange(len(samples)), positive] = True
    return {"input": [s["input"] for s in samples] + list(columns),
            "index": torch.stack([torch.as_tensor(s["index"]) for s in samples]),
            POSITIVE: positive, RELEVANCE: relevance}


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
