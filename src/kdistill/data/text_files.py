"""Text data sets read from the user's files: ``text`` (CSV, TSV or JSON lines of labelled
texts), ``conll`` (tagged sentences in CoNLL columns or JSON lines) and plain text files of
unlabelled transfer text.

File formats, chosen by suffix:

* ``.csv``: a header row naming the columns, cells quoted as needed (a text may hold commas,
  quotes and line breaks);
* ``.tsv``: a header row, cells separated by tabs and taken verbatim (no quoting);
* ``.jsonl`` / ``.json``: one JSON object per line;
* CoNLL (any other suffix): one token per line with its tags in whitespace-separated columns,
  a blank line between sentences, ``-DOCSTART-`` lines skipped;
* plain text: one text per non-empty line.

Every problem is a ``ValueError`` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kdistill.data.base import DataSplits
from kdistill.data.labels import LabelType
from kdistill.data.tables import csv_header, csv_rows, printable
from kdistill.data.text import TagTable, TextTable, tag_splits, text_splits, text_value

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
JSON_LINES = (".jsonl", ".json")


@dataclass(frozen=True)
class TextColumns:
    """Which columns (or JSON fields) hold the text, the optional pair text and the label."""

    text: str = "text"
    pair: str | None = None
    label: str = "label"

    def named(self) -> dict[str, str]:
        """Option name -> column, for the columns in use."""
        named = {"text_column": self.text, "pair_column": self.pair, "label_column": self.label}
        return {option: column for option, column in named.items() if column is not None}


def existing_file(path: str | Path) -> Path:
    """``path`` as a Path, refusing a missing file or a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"text data file not found: {path}")
    return path


def table_format(path: Path) -> str:
    """``csv``, ``tsv`` or ``jsonl`` from the file's suffix."""
    kind = TABLE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: cannot tell the format from the suffix "
                         f"'{path.suffix}'; use .csv, .tsv or .jsonl (.json for JSON lines)")
    return kind


@contextmanager
def opened(path: Path, kind: str = "text") -> Iterator[TextIO]:
    """``path`` opened as UTF-8 text (a byte order mark skipped, line ends kept); a decoding
    or CSV error while reading it becomes a ``ValueError`` naming the file."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield handle
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable {kind.upper()} file ({error})") from None


def csv_reader(handle: Any, kind: str) -> Any:
    """A ``csv.reader`` of a ``csv`` (quoted cells) or ``tsv`` (verbatim cells) file."""
    if kind == "tsv":
        return csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(handle)


def text_file_columns(path: str | Path) -> list[str]:
    """The column names of a CSV or TSV file's header, or the fields of a JSON lines file's
    first object (to check the options naming columns before reading the whole file)."""
    path = existing_file(path)
    kind = table_format(path)
    with opened(path, kind) as handle:
        if kind == "jsonl":
            return list(next(json_objects(path, handle))[1])
        return csv_header(path, csv_reader(handle, kind))


def read_columns(path: str | Path,
                 named: Mapping[str, str]) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """(line, {column: value}) for every row of a CSV, TSV or JSON lines file, for the columns
    ``named`` maps option names to (each required); also ``field`` (JSON lines) or ``column``,
    the word for a column in messages."""
    path = existing_file(path)
    kind = table_format(path)
    with opened(path, kind) as handle:
        if kind == "jsonl":
            rows = [(line, {k: obj[k] for k in _fields(path, line, obj, named)})
                    for line, obj in json_objects(path, handle)]
        else:
            rows = list(_csv_records(path, handle, kind, named))
    return ("field" if kind == "jsonl" else "column"), rows


def read_text_table(path: str | Path, columns: TextColumns) -> TextTable:
    """The labelled texts of a CSV, TSV or JSON lines file."""
    what, rows = read_columns(path, columns.named())

    def text(line: int, row: dict[str, Any], column: str) -> str:
        return text_value(row[column], f"{path}, line {line}", printable(f"{what} '{column}'"))

    return TextTable(str(path), texts=[text(n, row, columns.text) for n, row in rows],
                     labels=[row[columns.label] for _, row in rows],
                     lines=[n for n, _ in rows],
                     pairs=None if columns.pair is None else
                     [text(n, row, columns.pair) for n, row in rows])


def _csv_records(path: Path, handle: Any, kind: str,
                 named: Mapping[str, str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, {column: cell}) for the columns in use (``named``: option -> column) of every row
    of a CSV or TSV file."""
    reader = csv_reader(handle, kind)
    header = csv_header(path, reader)
    for option, column in named.items():
        if column not in header:
            raise ValueError(printable(f"{path}: {option} '{column}' is not a column; columns "
                                       f"present: {', '.join(header)}"))
    at = {column: header.index(column) for column in named.values()}
    count = 0
    for line, row in csv_rows(path, reader, len(header)):
        count += 1
        yield line, {column: row[i] for column, i in at.items()}
    if not count:
        raise ValueError(f"{path}: no data rows after the header")


def json_objects(path: Path, handle: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) for every non-blank line of a JSON lines file; a line that is not a
    JSON object, and a file without any, are errors."""
    count = 0
    for line, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.rstrip("\r\n"))  # columns within the line
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line}: not valid JSON ({error.msg} at column "
                             f"{error.colno}); a JSON lines file holds one object per "
                             "line") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object {{...}}, got a "
                             f"{type(value).__name__} (one object per line)")
        count += 1
        yield line, value
    if not count:
        raise ValueError(f"{path}: the file is empty (no JSON objects)")


def _fields(path: Path, line: int, obj: dict[str, Any], named: Mapping[str, str]) -> list[str]:
    """The fields in use (``named``: option -> field), each required in ``obj``."""
    for option, field in named.items():
        if field not in obj:
            raise ValueError(printable(f"{path}, line {line}: no field '{field}' ({option}); "
                                       f"fields present: {', '.join(obj) or 'none'}"))
    return list(named.values())


def read_conll(path: str | Path, token_column: int = 0, tag_column: int = -1) -> TagTable:
    """Sentences of a CoNLL-style file: one token per line with whitespace-separated columns
    (every line the same number), sentences separated by blank lines, ``-DOCSTART-`` lines
    skipped."""
    path = existing_file(path)
    table = TagTable(str(path), [], [], [])
    sentence: list[tuple[int, list[str]]] = []
    width, first = 0, 0

    def end_sentence() -> None:
        if sentence:
            table.words.append([fields[token_column] for _, fields in sentence])
            table.tags.append([fields[tag_column] for _, fields in sentence])
            table.lines.append([line for line, _ in sentence])
            sentence.clear()

    with opened(path) as handle:
        for line, raw in enumerate(handle, start=1):
            fields = raw.split()
            if not fields or fields[0].startswith("-DOCSTART-"):
                end_sentence()
                continue
            if not width:
                width, first = len(fields), line
                _check_columns(path, line, width, token_column, tag_column)
            elif len(fields) != width:
                raise ValueError(f"{path}, line {line}: {len(fields)} columns, but line "
                                 f"{first} has {width} (each line holds a token and its tags "
                                 "separated by whitespace)")
            sentence.append((line, fields))
    end_sentence()
    if not table.words:
        raise ValueError(f"{path}: the file is empty (no tagged sentences)")
    return table


def _check_columns(path: Path, line: int, width: int, token_column: int,
                   tag_column: int) -> None:
    """Refuse a token or tag column outside a line of ``width`` columns, or both the same."""
    for option, column in (("token_column", token_column), ("tag_column", tag_column)):
        if not -width <= column < width:
            raise ValueError(f"{path}: {option} {column} is out of range: line {line} has "
                             f"{width} column(s)")
    if token_column % width == tag_column % width:
        raise ValueError(f"{path}: token_column {token_column} and tag_column {tag_column} are "
                         f"the same column of line {line}'s {width}")


def read_tagged_json(path: str | Path, tokens_field: str = "tokens",
                     tags_field: str = "tags") -> TagTable:
    """Sentences of a JSON lines file, one object per sentence with a list of tokens and a
    list of as many tags (names, ids, or null for a token without a tag)."""
    path = existing_file(path)
    table = TagTable(str(path), [], [], [])
    with opened(path) as handle:
        for line, obj in json_objects(path, handle):
            where = f"{path}, line {line}"
            for option, field in (("tokens_field", tokens_field), ("tags_field", tags_field)):
                if not isinstance(obj.get(field), list):
                    raise ValueError(printable(f"{where}: field '{field}' ({option}) must be a "
                                               f"list; fields present: {', '.join(obj) or 'none'}"))
            tokens, tags = obj[tokens_field], obj[tags_field]
            if not tokens:
                raise ValueError(f"{where}: no tokens")
            if len(tags) != len(tokens):
                raise ValueError(f"{where}: {len(tokens)} tokens but {len(tags)} tags")
            table.words.append([text_value(t, where, f"token {i}") for i, t in enumerate(tokens)])
            table.tags.append(tags)
            table.lines.append([line] * len(tags))
    return table


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line, text) for every non-empty line of a plain text file, without the surrounding
    whitespace."""
    path = existing_file(path)
    with opened(path) as handle:
        lines = [(n, raw.strip()) for n, raw in enumerate(handle, start=1) if raw.strip()]
    if not lines:
        raise ValueError(f"{path}: the file is empty (no lines of text)")
    return lines


def load_text(path: str | Path, text_column: str = "text", pair_column: str | None = None,
              label_column: str = "label", test_path: str | None = None,
              labels: list[str] | None = None, label_type: LabelType = "class",
              test_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """Labelled texts (or text pairs) from a CSV, TSV or JSON lines file: classification, or
    regression with ``label_type: score``. The test split is ``test_path`` (same columns)
    when given, else a seeded split holding ``test_fraction`` out, stratified by class. Label
    ids follow ``labels`` when given (see :mod:`kdistill.data.labels`)."""
    columns = TextColumns(text_column, pair_column, label_column)
    train = read_text_table(path, columns)
    test = None if test_path is None else read_text_table(test_path, columns)
    return text_splits(Path(path).stem, train, test, test_fraction, seed, label_type, labels)


def load_conll(path: str | Path, test_path: str | None = None, token_column: int = 0,
               tag_column: int = -1, tokens_field: str = "tokens", tags_field: str = "tags",
               labels: list[str] | None = None, test_fraction: float = 0.25,
               seed: int = 0) -> DataSplits:
    """Token classification from a CoNLL-style file (the token in column ``token_column``, its
    tag in ``tag_column``) or a JSON lines file (``.jsonl``/``.json``, fields
    ``tokens_field`` and ``tags_field``). The test split is ``test_path`` when given, else a
    seeded random split of the sentences. Tag names become ids in sorted order, or in the
    order of ``labels``."""

    def read(file: str | Path) -> TagTable:
        if Path(file).suffix.lower() in JSON_LINES:
            return read_tagged_json(file, tokens_field, tags_field)
        return read_conll(file, token_column, tag_column)

    train = read(path)
    test = None if test_path is None else read(test_path)
    return tag_splits(Path(path).stem, train, test, test_fraction, seed, labels)
