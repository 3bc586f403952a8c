"""Labels read from text files turned into class ids or regression scores.

``label_type`` says how to read a label column:

* ``class`` (the default): when every training label is a whole number (``3``, ``"3"``,
  ``3.0``) the numbers are the class ids, which must be 0..C-1 with every class present;
  otherwise the labels are names, numbered in sorted order;
* ``name``: the labels are names even when they look like numbers (ratings 1..5 become ids
  0..4), numbered in sorted order (by value when every name is a number);
* ``score``: the labels are real numbers, the targets of a regression.

An explicit list of names (the ``labels`` option) fixes the ids instead: name i is class i.
Every label must be one of the names; whole-number labels are matched against them when the
names are numbers too, and are otherwise the ids the names belong to. The id -> name mapping
is returned, so a run can report and save it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kdistill.batch import UNLABELED, Task
from kdistill.names import unknown_name

LabelType = Literal["class", "name", "score"]
LABEL_TYPES = ("class", "name", "score")
SHOWN = 10  # at most this many label names are listed in an error

Where = Callable[[int], str]  # label position -> "file, line N" for error messages
WHOLE = re.compile(r"[+-]?\d+")


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (an int, an integral float, or a string
    of digits), else None. Booleans are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value == int(value) else None
    if isinstance(value, str) and WHOLE.fullmatch(value.strip()):
        return int(value)
    return None


def label_name(value: Any) -> str:
    """The name a label value stands for: strings stripped, JSON booleans as ``true`` and
    ``false``, whole numbers without a decimal point."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value.strip()
    number = whole_number(value)
    return str(number) if number is not None else repr(value)


def _sort_key(name: str) -> tuple[float, str]:
    try:
        return float(name), name
    except ValueError:
        return math.inf, name


def sorted_names(names: set[str]) -> list[str]:
    """Names in sorted order: by value when every one is a number, else as strings."""
    if all(_sort_key(n)[0] != math.inf for n in names):
        return sorted(names, key=_sort_key)
    return sorted(names)


def check_value(value: Any, missing_allowed: bool) -> bool:
    """Whether ``value`` is a label (False for a missing one when ``missing_allowed``);
    a missing label otherwise, and a list or a mapping, are errors."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if missing_allowed:
            return False
        raise ValueError("the label is empty (every row needs one; give unlabelled texts with "
                         "data.unlabeled)")
    if not isinstance(value, str | int | float):
        raise ValueError(f"a label must be a name or a number, got a {type(value).__name__}: "
                         f"{str(value)[:40]}")
    return True


def located(values: Sequence[Any], where: Where, read: Callable[[Any], Any]) -> list[Any]:
    """``read`` applied to every value; its error gains the value's place (``where``)."""
    out = []
    for i, value in enumerate(values):
        try:
            out.append(read(value))
        except ValueError as error:
            raise ValueError(f"{where(i)}: {error}") from None
    return out


@dataclass
class LabelCoder:
    """Turns label values into class ids (``names`` is the id -> name mapping) or scores
    (``names`` is None). ``origin`` says where the classes came from, for errors about a
    label that is not one of them."""

    names: list[str] | None
    by_id: bool  # the labels are whole-number class ids, not names
    origin: str

    @property
    def task(self) -> Task:
        return "regression" if self.names is None else "classification"

    def encode(self, values: Sequence[Any], where: Where,
               missing_allowed: bool = False) -> torch.Tensor:
        """The labels as int64 class ids ([N], ``UNLABELED`` for a missing label when
        ``missing_allowed``) or float32 scores; an error names the label's place."""
        if self.names is None:
            return torch.tensor(located(values, where, self._score), dtype=torch.float32)
        ids = {name: i for i, name in enumerate(self.names)}

        def read(value: Any) -> int:
            return self._id(value, ids) if check_value(value, missing_allowed) else UNLABELED

        return torch.tensor(located(values, where, read), dtype=torch.long)

    @staticmethod
    def _score(value: Any) -> float:
        check_value(value, missing_allowed=False)
        problem = (f"label {value!r} is not a number (label_type 'score' reads each label as a "
                   "regression target)")
        if isinstance(value, bool):
            raise ValueError(problem)
        try:
            score = float(value)
        except ValueError:
            raise ValueError(problem) from None
        if not math.isfinite(score):
            raise ValueError(f"label {value!r} is not a finite number")
        return score

    def _id(self, value: Any, ids: dict[str, int]) -> int:
        if self.by_id:
            number = whole_number(value)
            if number is not None and 0 <= number < len(ids):
                return number
            raise ValueError(f"label {label_name(value)!r} is not a class id of {self.origin} "
                             f"(0..{len(ids) - 1})")
        name = label_name(value)
        if name not in ids:
            raise ValueError(f"label {name!r} does not occur in {self.origin} "
                             f"({_listed(list(ids))})")
        return ids[name]


def fit_labels(values: Sequence[Any], where: Where, source: str,
               label_type: LabelType = "class", names: Sequence[str] | None = None,
               missing_allowed: bool = False) -> LabelCoder:
    """The coder of the training labels ``values`` read from ``source`` (see the module
    docstring); ``where(i)`` locates value i for errors."""
    if label_type not in LABEL_TYPES:
        raise ValueError(unknown_name("label_type", str(label_type), LABEL_TYPES))
    if label_type == "score":
        if names is not None:
            raise ValueError("'labels' names classes; label_type 'score' has none")
        return LabelCoder(None, by_id=False, origin=source)
    present = located(values, where, lambda v: check_value(v, missing_allowed))
    known = [v for v, ok in zip(values, present, strict=True) if ok]
    if not known:
        raise ValueError(f"{source}: there are no labels")
    by_id = label_type == "class" and all(whole_number(v) is not None for v in known)
    if by_id and names is not None and all(whole_number(n) is not None for n in names):
        by_id = False  # numbers listed as names are matched as names
    if names is not None:
        coder = LabelCoder(list(names), by_id, origin="the labels given")
        if len(set(names)) != len(names):
            raise ValueError(f"the labels given repeat a name: {_listed(coder.names)}")
        if len(names) < 2:
            raise ValueError(f"the labels given name {len(names)} class(es); classification "
                             "needs at least 2")
    elif by_id:
        coder = LabelCoder(_id_names(known, source), by_id, origin=f"the training data "
                                                                  f"({source})")
    else:
        coder = LabelCoder(sorted_names({label_name(v) for v in known}), by_id,
                           origin=f"the training data ({source})")
    if len(coder.names) < 2:
        raise ValueError(f"{source}: every label is {coder.names[0]!r}; classification needs "
                         "at least 2 classes")
    return coder


def _id_names(known: Sequence[Any], source: str) -> list[str]:
    """``["0", ..., "C-1"]`` for whole-number labels that are the ids 0..C-1, every one
    present; other numbers are an error pointing at ``label_type: name``."""
    ids = sorted({whole_number(v) for v in known})
    if ids != list(range(len(ids))):
        if ids[0] < 0:
            problem = f"{ids[0]} is negative"
        else:
            problem = f"class {min(set(range(ids[-1])) - set(ids))} never occurs"
        raise ValueError(f"{source}: whole-number labels are class ids 0..C-1 with every class "
                         f"present, but {problem} (labels go from {ids[0]} to {ids[-1]}); give "
                         "label_type 'name' to number them in sorted order instead")
    return [str(i) for i in ids]
