"""Reading delimited text tables (CSV, TSV): the header, the rows with their line numbers, and
one-line error messages that name the file and line at fault."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any


def printable(text: str) -> str:
    """``text`` with each unprintable character (a line break, a tab, a control character)
    escaped as Python writes it, so an error about it stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def csv_header(path: Path, reader: Iterator[list[str]]) -> list[str]:
    """The column names of a CSV file's first row (stripped), refusing an empty file and a
    blank or repeated name."""
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: the file is empty (a header row with column names is needed)")
    if not any(name.strip() for name in header):
        raise ValueError(f"{path}, line 1: the header row is blank (it must name the columns)")
    header = [name.strip() for name in header]
    seen: dict[str, int] = {}
    for number, name in enumerate(header, start=1):
        if not name:
            raise ValueError(f"{path}, line 1: column {number} has no name")
        if name in seen:
            raise ValueError(printable(f"{path}, line 1: column '{name}' appears twice (columns "
                                       f"{seen[name]} and {number}); column names must be "
                                       "unique"))
        seen[name] = number
    return header


def csv_rows(path: Path, reader: Any, columns: int) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row, refusing a row with another number of
    cells than the header has columns. The line is where the row starts (a quoted cell can
    hold line breaks)."""
    start = reader.line_num + 1  # the line after those read so far (the header)
    for row in reader:
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(row) != columns:
            raise ValueError(f"{path}, line {line}: {len(row)} values for {columns} columns")
        yield line, row
