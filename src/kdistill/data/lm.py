"""Language-modelling data (task ``lm``): texts tokenised into blocks with next-token labels.

Two data sets read the texts: ``lm_text`` (a plain text file, or a CSV, TSV or JSON lines
table) and ``lm_hf_dataset`` (a ``datasets`` folder or file, see :mod:`kdistill.data.text_hf`).
Each sample is either a plain text or a prompt/completion pair (``prompt_column`` and
``completion_column``). The tokenizer is the ``tokenizer.json`` of the folder ``tokenizer``
(the teacher's folder: teacher and student share its vocabulary), read with the Rust
``tokenizers`` library, which runs no code from the folder.

How texts become rows (the batch conventions of language modelling are in :mod:`kdistill.batch`):

* **packing** (plain texts, the default): every text is tokenised with the tokenizer's special
  tokens and followed by its end-of-sequence token; the texts are concatenated in order into
  one stream of tokens, cut into blocks of ``block_size``. Block i reads stream tokens
  ``[iL, (i+1)L)`` and predicts ``[iL+1, (i+1)L+1)``: every token but the first is predicted
  exactly once, and only the last block has padding. Packing is the choice for plain text
  because no compute goes to padding and every step trains on the same number of tokens (so
  runs compared at the same token budget really are); the price is that a block may start in
  the middle of a text and attend across the end of the text before it (the practice of
  GPT-2-style pre-training and of Hugging Face's ``run_clm``).
* **padding** (``packing: false``, and always for prompt/completion pairs): one text or pair a
  row, cut at ``block_size`` predicted positions and padded to the longest row. A completion
  must read its own prompt, so pairs are never packed. For a pair only the positions that
  predict a completion token (and the end-of-sequence token after it) are labelled: the loss
  is on the completion alone.
* **encoder-decoder** (``seq2seq: true``, pairs only): the prompt is the encoder's input, the
  completion (plus end-of-sequence) the decoder's labels, and the decoder reads them shifted
  right behind ``decoder_start_token_id`` (default the padding token, as T5 does).

Without ``test_path``, a seeded ``test_fraction`` of the texts (not of the blocks, so no text
is in both splits) is held out as the test split.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, StrictBool

from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.data.base import ArrayDataset, DataSplits
from kdistill.data.tables import printable
from kdistill.data.text import held_out, text_value
from kdistill.data.text_files import (
    TABLE_FORMATS,
    existing_file,
    opened,
    read_columns,
    read_lines,
)
from kdistill.data.text_hf import check_columns, import_datasets, read_splits

BlockSize = Annotated[int, Field(ge=1)]
TokenId = Annotated[int, Field(ge=0)]
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class TokenBlocks(ArrayDataset):
    """Rows of tokens for language modelling: ``input_ids``, ``attention_mask`` [N, L] and
    ``labels`` [N, L] (the token each position predicts, ``UNLABELED`` where none), or for an
    encoder-decoder model labels [N, T] with the ``decoder_input_ids`` [N, T] that read them.
    Item i holds each of those rows, :data:`~kdistill.batch.TOKEN_MASK` (the labelled
    positions; also the decoder's attention mask) and ``index``."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor | None = None):
        super().__init__(input_ids.long(), labels.long())
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match "
                             f"input_ids {tuple(input_ids.shape)}")
        targets = input_ids if decoder_input_ids is None else decoder_input_ids
        if labels.shape != targets.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must match the "
                             f"{'input_ids' if decoder_input_ids is None else 'decoder_input_ids'}"
                             f" {tuple(targets.shape)}")
        self.attention_mask = attention_mask.long()
        self.decoder_input_ids = None if decoder_input_ids is None else decoder_input_ids.long()

    def columns(self) -> dict[str, torch.Tensor]:
        known = (self.labels != UNLABELED).long()
        columns = {"input_ids": self.inputs, "attention_mask": self.attention_mask,
                   "labels": self.labels, TOKEN_MASK: known}
        if self.decoder_input_ids is not None:
            columns.update(decoder_input_ids=self.decoder_input_ids, decoder_attention_mask=known)
        return columns

    def with_labels(self, labels: torch.Tensor) -> TokenBlocks:
        """The same rows with other labels."""
        return TokenBlocks(self.inputs, labels, self.attention_mask, self.decoder_input_ids)

    def select(self, indices: Sequence[int]) -> TokenBlocks:
        """The rows at ``indices``, in that order."""
        rows = torch.as_tensor(list(indices), dtype=torch.long)
        decoder = None if self.decoder_input_ids is None else self.decoder_input_ids[rows]
        return TokenBlocks(self.inputs[rows], self.labels[rows], self.attention_mask[rows],
                           decoder)

    def token_count(self) -> int:
        """How many positions have a label (the tokens one epoch trains on)."""
        return int((self.labels != UNLABELED).sum())


# -- the tokenizer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockTokenizer:
    """A ``tokenizers.Tokenizer`` with its end-of-sequence id (``None`` without one), the id
    padding is written with (never read: padding is masked) and its vocabulary size."""

    tokenizer: Any
    eos_id: int | None
    pad_id: int
    vocab_size: int

    def encode(self, texts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        """The token ids of each text (with the tokenizer's special tokens, e.g. a BOS, when
        ``special_tokens``)."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                           add_special_tokens=special_tokens)]


def _special(config: Mapping[str, Any], key: str) -> str | None:
    """The text of the special token ``key`` (``eos_token``...) of a tokenizer configuration,
    None when it names none."""
    value = config.get(key)
    if isinstance(value, Mapping):  # a serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(folder: str | Path) -> BlockTokenizer:
    """The tokenizer saved in ``folder`` (its ``tokenizer.json``; the end-of-sequence and
    padding tokens named in its ``tokenizer_config.json``)."""
    from tokenizers import Tokenizer  # deferred: only language-modelling data needs it

    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise ValueError(f"tokenizer: no {TOKENIZER_FILE} in {folder} (give the folder of a "
                         "Hugging Face fast tokenizer, e.g. the teacher's model folder)")
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as error:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"tokenizer: cannot read {folder / TOKENIZER_FILE}: {error}") from None
    config: dict[str, Any] = {}
    if (folder / TOKENIZER_CONFIG).is_file():
        try:
            config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"tokenizer: cannot read {folder / TOKENIZER_CONFIG}: "
                             f"{error}") from None
    ids = {key: tokenizer.token_to_id(token) for key in ("eos_token", "pad_token")
           if (token := _special(config, key)) is not None}
    eos, pad = ids.get("eos_token"), ids.get("pad_token")
    return BlockTokenizer(tokenizer, eos, pad if pad is not None else eos or 0,
                          tokenizer.get_vocab_size(with_added_tokens=True))


# -- texts to rows -------------------------------------------------------------------------------
@dataclass
class LMTexts:
    """Texts read from ``source``: plain texts, or prompts with ``completions``; ``where[i]``
    says where text i came from (for errors)."""

    source: str
    texts: list[str]
    where: list[str]
    completions: list[str] | None = None

    def select(self, rows: Sequence[int]) -> LMTexts:
        """The texts at ``rows``, in that order."""
        return LMTexts(self.source, [self.texts[i] for i in rows], [self.where[i] for i in rows],
                       None if self.completions is None else [self.completions[i] for i in rows])


def pack(documents: Sequence[Sequence[int]], block_size: int, pad_id: int,
         source: str) -> TokenBlocks:
    """Token lists concatenated into one stream and cut into blocks of ``block_size`` (see the
    module docstring): block i reads stream tokens [iL, (i+1)L) and predicts [iL+1, (i+1)L+1)."""
    stream = torch.tensor([token for document in documents for token in document],
                          dtype=torch.long)
    predicted = len(stream) - 1
    if predicted < 1:
        raise ValueError(f"{source}: the texts make {len(stream)} token(s); language modelling "
                         "needs at least 2")
    blocks = math.ceil(predicted / block_size)
    padded = torch.full((blocks * block_size + 1,), pad_id, dtype=torch.long)
    padded[:len(stream)] = stream
    valid = (torch.arange(blocks * block_size) < predicted).view(blocks, block_size)
    inputs = padded[:-1].view(blocks, block_size).masked_fill(~valid, pad_id)
    labels = padded[1:].view(blocks, block_size).masked_fill(~valid, UNLABELED)
    return TokenBlocks(inputs, labels, valid.long())


def _rows(values: Sequence[Sequence[int]], fill: int) -> torch.Tensor:
    """Lists of ids as one tensor [N, longest], each padded at the end with ``fill``."""
    width = max(len(v) for v in values)
    rows = torch.full((len(values), width), fill, dtype=torch.long)
    for i, row in enumerate(values):
        rows[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return rows


def pad_rows(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
             block_size: int, pad_id: int) -> TokenBlocks:
    """One token sequence a row, cut at ``block_size`` + 1 tokens and padded to the longest;
    position t predicts token t + 1, labelled only when that token is past the sequence's
    first ``prompt_lengths`` tokens (the prompt)."""
    inputs, labels = [], []
    for ids, prompt in zip(sequences, prompt_lengths, strict=True):
        ids = list(ids[:block_size + 1])
        inputs.append(ids[:-1])
        labels.append([token if t + 1 >= prompt else UNLABELED
                       for t, token in enumerate(ids[1:])])
    mask = _rows([[1] * len(row) for row in inputs], 0)
    return TokenBlocks(_rows(inputs, pad_id), _rows(labels, UNLABELED), mask)


def seq2seq_rows(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                 block_size: int, pad_id: int, start_id: int) -> TokenBlocks:
    """Encoder inputs (the prompts) and decoder labels (the targets), each cut at
    ``block_size``; the decoder reads the labels shifted right behind ``start_id``."""
    sources = [list(p[:block_size]) for p in prompts]
    labels = [list(t[:block_size]) for t in targets]
    decoder = [[start_id, *row[:-1]] for row in labels]
    return TokenBlocks(_rows(sources, pad_id), _rows(labels, UNLABELED),
                       _rows([[1] * len(row) for row in sources], 0), _rows(decoder, pad_id))


@dataclass(frozen=True)
class BlockSettings:
    """How texts become rows (the options of the language-modelling data sets)."""

    block_size: int
    packing: bool | None
    seq2seq: bool
    decoder_start_token_id: int | None

    def check(self, pairs: bool) -> None:
        """Refuse settings that do not fit plain texts (``pairs`` false) or pairs."""
        if pairs and self.packing:
            raise ValueError("packing: prompt/completion pairs are one a row (a completion "
                             "must read its own prompt); remove packing")
        if self.seq2seq and not pairs:
            raise ValueError("seq2seq: an encoder-decoder model needs prompt/completion pairs "
                             "(give prompt_column and completion_column)")
        if self.decoder_start_token_id is not None and not self.seq2seq:
            raise ValueError("decoder_start_token_id: only an encoder-decoder model "
                             "(seq2seq: true) has a decoder to start; remove it")

    def blocks(self, texts: LMTexts, tokenizer: BlockTokenizer) -> TokenBlocks:
        """The rows of ``texts``."""
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        firsts = tokenizer.encode(texts.texts)
        if texts.completions is None:
            documents = [ids + eos for ids in firsts]
            if self.packing is False:
                return pad_rows(documents, [0] * len(documents), self.block_size,
                                tokenizer.pad_id)
            return pack(documents, self.block_size, tokenizer.pad_id, texts.source)
        completions = [ids + eos for ids in tokenizer.encode(texts.completions, False)]
        if self.seq2seq:
            start = (self.decoder_start_token_id if self.decoder_start_token_id is not None
                     else tokenizer.pad_id)
            return seq2seq_rows(firsts, completions, self.block_size, tokenizer.pad_id, start)
        for where, prompt in zip(texts.where, firsts, strict=True):
            if len(prompt) >= self.block_size + 1:
                raise ValueError(f"{where}: the prompt takes {len(prompt)} tokens, leaving no "
                                 f"completion token within block_size {self.block_size}; "
                                 "raise block_size or shorten the prompt")
        return pad_rows([p + c for p, c in zip(firsts, completions, strict=True)],
                        [len(p) for p in firsts], self.block_size, tokenizer.pad_id)


def lm_splits(name: str, train: LMTexts, test: LMTexts | None, tokenizer_folder: str,
              settings: BlockSettings, test_fraction: float, seed: int) -> DataSplits:
    """Train and test token rows of ``train`` (and ``test``, else a seeded ``test_fraction``
    of the texts held out) for the tokenizer of ``tokenizer_folder``."""
    tokenizer = read_tokenizer(tokenizer_folder)
    if test is None:
        count = len(train.texts)
        held = held_out(count, test_fraction)
        if not 0 < held < count:
            raise ValueError(f"{train.source}: cannot hold {held} of {count} texts out for the "
                             "test split; give more texts or a test_path")
        order = np.random.default_rng(seed).permutation(count)
        test = train.select(sorted(order[:held].tolist()))
        train = train.select(sorted(order[held:].tolist()))
    return DataSplits(name, settings.blocks(train, tokenizer), settings.blocks(test, tokenizer),
                      num_classes=tokenizer.vocab_size, input_shape=(), task="lm")


# -- reading texts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMColumns:
    """The column of plain texts, or the prompt and completion columns of pairs."""

    text: str
    prompt: str | None
    completion: str | None

    def __post_init__(self) -> None:
        if (self.prompt is None) != (self.completion is None):
            raise ValueError("prompt_column and completion_column go together: give both for "
                             "prompt/completion pairs, or neither for plain texts")

    def named(self) -> dict[str, str]:
        """Option name -> column, for the columns in use."""
        if self.prompt is None or self.completion is None:
            return {"text_column": self.text}
        return {"prompt_column": self.prompt, "completion_column": self.completion}


def table_texts(source: str, rows: Sequence[tuple[str, Mapping[str, Any]]],
                columns: LMColumns, what: str = "column") -> LMTexts:
    """The texts of table rows ``(where, {column: value})``."""
    named = list(columns.named().values())

    def texts(column: str) -> list[str]:
        return [text_value(row[column], where, printable(f"{what} '{column}'"))
                for where, row in rows]

    if len(named) == 1:
        return LMTexts(source, texts(named[0]), [where for where, _ in rows])
    return LMTexts(source, texts(named[0]), [where for where, _ in rows], texts(named[1]))


def plain_texts(path: str | Path, separator: str | None) -> LMTexts:
    """The texts of a plain text file: one per non-empty line (``separator`` None), or the
    runs of lines between lines equal to ``separator`` (blank lines for ``""``), each text
    stripped, empty ones skipped."""
    if separator is None:
        lines = read_lines(path)
        return LMTexts(str(path), [text for _, text in lines],
                       [f"{path}, line {n}" for n, _ in lines])
    path = existing_file(path)
    groups: list[tuple[int, list[str]]] = [(1, [])]
    with opened(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip("\r\n")
            if line.strip() == separator:
                groups.append((number + 1, []))
            else:
                groups[-1][1].append(line)
    texts = [(start, "\n".join(lines).strip()) for start, lines in groups]
    texts = [(start, text) for start, text in texts if text]
    if not texts:
        raise ValueError(f"{path}: the file is empty (no text)")
    return LMTexts(str(path), [text for _, text in texts],
                   [f"{path}, line {start}" for start, _ in texts])


def file_texts(path: str | Path, columns: LMColumns, separator: str | None) -> LMTexts:
    """The texts of a table file (``.csv``, ``.tsv``, ``.jsonl``/``.json``, columns
    ``columns``) or of a plain text file (any other suffix, split by ``separator``)."""
    if Path(path).suffix.lower() not in TABLE_FORMATS:
        if columns.prompt is not None:
            raise ValueError(f"{path}: prompt/completion pairs come from a table (.csv, .tsv, "
                             ".jsonl); a plain text file holds plain texts")
        return plain_texts(path, separator)
    if separator is not None:
        raise ValueError(f"{path}: separator splits plain text files; a table's rows are its "
                         "texts, remove separator")
    what, rows = read_columns(path, columns.named())
    return table_texts(str(path), [(f"{path}, line {n}", row) for n, row in rows], columns, what)


def load_lm_text(path: str | Path, tokenizer: str, block_size: BlockSize = 128,
                 packing: StrictBool | None = None, separator: str | None = None,
                 text_column: str = "text", prompt_column: str | None = None,
                 completion_column: str | None = None, seq2seq: StrictBool = False,
                 decoder_start_token_id: TokenId | None = None, test_path: str | None = None,
                 test_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """``lm_text``: texts for language modelling from a file (see the module docstring): a
    plain text file, one text per non-empty line or texts between ``separator`` lines (``%``
    for fortune files, ``""`` for blank lines); or a CSV, TSV or JSON lines table with a
    ``text_column``, or a ``prompt_column`` and a ``completion_column``. Tokenised with the
    tokenizer of the folder ``tokenizer`` into rows of ``block_size`` (packed, or padded with
    ``packing: false``); ``test_path`` (same format) or a seeded ``test_fraction`` of the
    texts is the test split."""
    columns = LMColumns(text_column, prompt_column, completion_column)
    settings = BlockSettings(block_size, packing, seq2seq, decoder_start_token_id)
    settings.check(pairs=columns.prompt is not None)
    train = file_texts(path, columns, separator)
    test = None if test_path is None else file_texts(test_path, columns, separator)
    return lm_splits(Path(path).stem, train, test, tokenizer, settings, test_fraction, seed)


def load_lm_hf_dataset(path: str | Path, tokenizer: str, block_size: BlockSize = 128,
                       packing: StrictBool | None = None, text_column: str = "text",
                       prompt_column: str | None = None, completion_column: str | None = None,
                       seq2seq: StrictBool = False,
                       decoder_start_token_id: TokenId | None = None,
                       test_path: str | None = None, train_split: str = "train",
                       test_split: str | None = None, test_fraction: float = 0.1,
                       seed: int = 0) -> DataSplits:
    """``lm_hf_dataset``: the same as ``lm_text`` for a column of texts (or of prompts and of
    completions) read with ``datasets`` from a ``save_to_disk`` folder (its ``train_split``
    and ``test_split``, else its ``test`` split when it has one) or a data file (``.csv``,
    ``.tsv``, ``.jsonl``, ``.parquet``) and ``test_path``."""
    datasets = import_datasets()
    columns = LMColumns(text_column, prompt_column, completion_column)
    settings = BlockSettings(block_size, packing, seq2seq, decoder_start_token_id)
    settings.check(pairs=columns.prompt is not None)
    train, test = read_splits(datasets, Path(path), test_path, train_split, test_split)

    def texts(source: str, dataset: Any) -> LMTexts:
        check_columns(source, dataset, columns.named())
        values = {column: dataset[column] for column in columns.named().values()}
        rows = [(f"{source}, row {i}", {c: v[i] for c, v in values.items()})
                for i in range(len(dataset))]
        return table_texts(source, rows, columns)

    return lm_splits(Path(path).stem, texts(*train), None if test is None else texts(*test),
                     tokenizer, settings, test_fraction, seed)
