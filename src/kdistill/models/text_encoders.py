"""Text encoders of the text students (:class:`~kdistill.models.text.TextEncoder`): raw text
to the tensors their networks take, through :func:`~kdistill.models.vocabulary.tokenize`.

A pair ``(text, text_pair)`` is read as the tokens of ``text``, the separator token, then the
tokens of ``text_pair``. A word list (token classification) is read word by word: each word's
tokens (a word such as ``"New-York"`` gives three; one with none gives the unknown token, so
every word has a position) and ``word_starts`` holds the position of each word's first token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kdistill.checkpoint import atomic_write_text
from kdistill.models.text import WORD_STARTS, RawText
from kdistill.models.vocabulary import (
    PAD_ID,
    SEPARATOR,
    UNKNOWN,
    NGramHasher,
    TextStudentFileError,
    Vocabulary,
    read_json,
    tokenize,
)

ENCODER_FILE = "encoder.json"


def text_tokens(text: str | tuple[str, str]) -> list[str]:
    """The tokens of a text, or of a pair joined by the separator token."""
    if isinstance(text, tuple):
        first, second = text
        return [*tokenize(first), SEPARATOR, *tokenize(second)]
    return tokenize(text)


def _kind(texts: Sequence[RawText]) -> str:
    """``"words"`` for a batch of word lists, ``"texts"`` for strings and pairs."""
    lists = [isinstance(t, list) for t in texts]
    if any(lists) and not all(lists):
        raise ValueError("a batch mixes word lists with strings or pairs; give one kind")
    return "words" if texts and all(lists) else "texts"


class WordEncoder:
    """Token ids [B, T] padded with :data:`~kdistill.models.vocabulary.PAD_ID` and their
    ``attention_mask`` [B, T] (T at least 1); for word lists also ``word_starts`` [B, W].

    Strings and pairs are cut to their first ``max_length`` tokens; word lists are never cut
    (each word needs its row of logits). ``word_lists=False`` (sentence-level students)
    refuses word lists.
    """

    kind = "words"

    def __init__(self, vocabulary: Vocabulary, max_length: int = 512, word_lists: bool = True):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.vocabulary = vocabulary
        self.max_length = max_length
        self.word_lists = word_lists

    @property
    def tokenisation(self) -> str:
        return f"{self.vocabulary.tokenisation}:max{self.max_length}"

    def __call__(self, texts: Sequence[RawText]) -> dict[str, Tensor]:
        if _kind(texts) == "words":
            if not self.word_lists:
                raise ValueError("this student is sentence-level: it reads strings and "
                                 "(text, pair) tuples, not word lists (token classification)")
            return self._words(texts)  # type: ignore[arg-type]
        rows = [self.vocabulary.ids(text_tokens(t))[:self.max_length]  # type: ignore[arg-type]
                for t in texts]
        return _padded(rows)

    def _words(self, texts: Sequence[list[str]]) -> dict[str, Tensor]:
        rows: list[list[int]] = []
        starts: list[Tensor] = []
        for words in texts:
            row: list[int] = []
            first: list[int] = []
            for word in words:
                first.append(len(row))
                row += self.vocabulary.ids(tokenize(word) or [UNKNOWN])
            rows.append(row)
            starts.append(torch.tensor(first, dtype=torch.long))
        encoded = _padded(rows)
        encoded[WORD_STARTS] = pad_sequence(starts, batch_first=True, padding_value=0)
        return encoded

    def settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "word_lists": self.word_lists}

    def save(self, folder: Path) -> None:
        save_encoder(self, folder)


def _padded(rows: Sequence[list[int]]) -> dict[str, Tensor]:
    """``input_ids`` and ``attention_mask`` [B, max(1, longest row)]."""
    width = max([1, *(len(r) for r in rows)])
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class NGramEncoder:
    """The n-gram ids of each text (:class:`~kdistill.models.vocabulary.NGramHasher`) as the
    flat ``ids`` and per-text ``offsets`` [B] that ``nn.EmbeddingBag`` takes. Sentence-level:
    word lists are refused."""

    kind = "ngrams"

    def __init__(self, hasher: NGramHasher):
        self.hasher = hasher

    @property
    def tokenisation(self) -> str:
        n = "".join(str(k) for k in self.hasher.n)
        return f"{self.hasher.vocabulary.tokenisation}:ngrams{n}x{self.hasher.buckets}"

    def __call__(self, texts: Sequence[RawText]) -> dict[str, Tensor]:
        if _kind(texts) == "words":
            raise ValueError("an n-gram student is sentence-level (one bag of n-grams per "
                             "text): it cannot tag word lists (token classification)")
        bags = [self.hasher(text_tokens(t)) for t in texts]  # type: ignore[arg-type]
        lengths = torch.tensor([len(b) for b in bags], dtype=torch.long)
        offsets = torch.cumsum(lengths, 0) - lengths
        ids = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
        return {"ids": ids, "offsets": offsets}

    def settings(self) -> dict[str, Any]:
        return self.hasher.settings()

    def save(self, folder: Path) -> None:
        save_encoder(self, folder)


TextStudentEncoder = WordEncoder | NGramEncoder


def save_encoder(encoder: TextStudentEncoder, folder: Path) -> None:
    """Write the encoder's vocabulary and ``encoder.json`` (its kind and settings)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder_vocabulary(encoder).save(folder)
    atomic_write_text(folder / ENCODER_FILE,
                      json.dumps({"kind": encoder.kind, **encoder.settings()}))


def encoder_vocabulary(encoder: TextStudentEncoder) -> Vocabulary:
    """The vocabulary an encoder reads with."""
    return encoder.hasher.vocabulary if isinstance(encoder, NGramEncoder) else encoder.vocabulary


def load_encoder(folder: Path) -> TextStudentEncoder:
    """Rebuild an encoder written by :func:`save_encoder`."""
    path = Path(folder) / ENCODER_FILE
    content = read_json(path, "text encoder")
    vocabulary = Vocabulary.load(folder)
    settings = dict(content) if isinstance(content, dict) else {}
    kind = settings.pop("kind", None)
    try:
        if kind == WordEncoder.kind:
            return WordEncoder(vocabulary, **settings)
        if kind == NGramEncoder.kind:
            return NGramEncoder(NGramHasher(vocabulary, **settings))
    except (TypeError, ValueError) as error:
        raise TextStudentFileError(f"{path}: bad encoder settings: {error}") from None
    raise TextStudentFileError(f"{path}: unknown encoder kind {kind!r}; expected "
                               f"'{WordEncoder.kind}' or '{NGramEncoder.kind}'")
