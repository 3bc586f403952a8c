"""Property-based tests (hypothesis) of ``kdistill check`` on generated bad inputs.

Strategies generate configs with a wrong type or range in a known field, unknown keys in any
section, malformed YAML and malformed ``--set`` overrides; CSV files with NaN, infinities, huge
values, ragged rows, empty content, duplicate headers, text cells and bad or single-class
labels; npz files with wrong shapes, dtypes, object arrays, NaN and bad labels. Every case runs
``kdistill check`` in-process and must end in exit code 2 with exactly one line on stderr
(no traceback) naming the field, the file and, for a bad value, its line/row and column; a
generated input that is valid must pass (exit 0). The runs are derandomized (the same examples
on every machine) and write no example database.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import string
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from kdistill.cli import main
from kdistill.data.builtin import printable

# KDISTILL_PROPERTY_SCALE=20 multiplies every example count for a thorough local search (the
# default keeps the file under a minute); KDISTILL_PROPERTY_RANDOM=1 draws new examples each
# run instead of the fixed, derandomized ones.
SCALE = int(os.environ.get("KDISTILL_PROPERTY_SCALE", "1"))
# Hypothesis's own files (a cache of constants, written while pytest collects, and patches of
# failing examples) go to the temporary folder, never into the repository; there is no example
# database (database=None).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "kdistill-hypothesis")
SETTINGS = {"derandomize": "KDISTILL_PROPERTY_RANDOM" not in os.environ, "database": None,
            "deadline": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@dataclass
class Outcome:
    """What one ``kdistill`` command did: exit code, stdout, stderr, warnings raised."""

    code: int | str | None
    out: str
    err: str
    warned: list[str]


def kdistill(*args: str) -> Outcome:
    """Run ``kdistill`` in-process; an exception escaping ``main`` fails the test (it would be a
    traceback), an argparse exit is an outcome like any other."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code: int | str | None = main(list(args))
        except SystemExit as stop:
            code = stop.code
    return Outcome(code, out.getvalue(), err.getvalue(), [str(w.message) for w in caught])


def one_line_error(outcome: Outcome) -> str:
    """Assert a failure with exactly one line on stderr and nothing else; return the line."""
    assert outcome.code == 2, outcome
    assert outcome.out == "", outcome
    assert "Traceback" not in outcome.err
    assert outcome.err.endswith("\n") and outcome.err.count("\n") == 1, outcome.err
    assert outcome.warned == [], outcome.warned
    return outcome.err.rstrip("\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module's generated files (hypothesis re-runs a test in one call, so
    function-scoped fixtures cannot be used; each example overwrites the same files)."""
    return tmp_path_factory.mktemp("properties")


def base_config(folder: Path, **changes: Any) -> dict[str, Any]:
    """A valid config: labels-only ``ce`` on digits, one epoch, with top-level ``changes``."""
    raw: dict[str, Any] = {
        "name": "prop",
        "output_dir": str(folder / "out"),
        "data": {"name": "digits", "labeled": 50},
        "student": {"name": "mlp", "size": "tiny"},
        "recipe": {"name": "ce"},
        "trainer": {"epochs": 1, "batch_size": 32, "progress": False,
                    "optimizer": {"name": "adamw", "lr": 0.01},
                    "scheduler": {"name": "constant"}},
        "evaluation": {"batch_size": 64, "threads": 1, "repeats": 2},
    }
    raw.update(changes)
    return raw


def write_yaml(path: Path, raw: Any) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# -- (a) configs: wrong types and ranges in known fields --------------------------------------
# field path -> (kind, low, high): the field's type and its valid range (None: unbounded)
FIELDS: dict[str, tuple[str, float | None, float | None]] = {
    "trainer.epochs": ("int", 1, None),
    "trainer.batch_size": ("int", 1, None),
    "trainer.accumulation": ("int", 1, None),
    "trainer.seed": ("int", 0, 2**32 - 1),
    "trainer.eval_every": ("int", 1, None),
    "trainer.log_every": ("int", 1, None),
    "trainer.keep_checkpoints": ("int", 1, None),
    "trainer.optimizer.lr": ("float>", 0, None),
    "trainer.optimizer.weight_decay": ("float", 0, None),
    "trainer.optimizer.momentum": ("float<", 0, 1),
    "trainer.scheduler.warmup_steps": ("int", 0, None),
    "trainer.scheduler.min_ratio": ("float", 0, 1),
    "trainer.scheduler.gamma": ("float>", 0, None),
    "trainer.progress": ("bool", None, None),
    "trainer.cpu": ("bool", None, None),
    "trainer.optimizer.name": ("choice", None, None),
    "trainer.scheduler.name": ("choice", None, None),
    "trainer.mixed_precision": ("choice", None, None),
    "data.test_fraction": ("float<>", 0, 1),
    "data.labeled": ("int", 1, None),
    "data.seed": ("int", 0, 2**32 - 1),
    "cpu_threads": ("int", 1, 1024),
    "evaluation.batch_size": ("int", 1, None),
    "evaluation.threads": ("int", 1, 1024),
    "evaluation.repeats": ("int", 1, None),
    "evaluation.shift_severity": ("float", 0, 5),
    "student.options.dropout": ("float<", 0, 1),
    "name": ("name", None, None),
    "output_dir": ("str", None, None),
}
CHOICES = {"trainer.optimizer.name": {"adamw", "sgd"},
           "trainer.scheduler.name": {"constant", "linear", "cosine", "step"},
           "trainer.mixed_precision": {"no", "bf16", "fp16"}}

junk = st.one_of(st.text(max_size=12), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=4),
                                 st.integers(), max_size=2))


def out_of_range(kind: str, low: float | None, high: float | None) -> st.SearchStrategy[Any]:
    """Numbers of the field's type just or far outside its range."""
    whole = kind == "int"
    options = []
    if low is not None:
        below = int(low) - 1 if whole else float(low)
        options.append(st.integers(max_value=int(below)) if whole else
                       st.floats(max_value=below, exclude_max=kind in ("float", "float<"),
                                 allow_nan=False, allow_infinity=False))
    if high is not None:
        above = int(high) + 1 if whole else float(high)
        options.append(st.integers(min_value=int(above)) if whole else
                       st.floats(min_value=above, exclude_min=kind == "float",
                                 allow_nan=False, allow_infinity=False))
    return st.one_of(options) if options else st.nothing()


def wrong_value(field: str) -> st.SearchStrategy[Any]:
    """A value the field must refuse: another type, a non-finite float or out of range."""
    kind, low, high = FIELDS[field]
    if kind == "int":
        return st.one_of(st.booleans(), st.floats(allow_nan=True), junk,
                         out_of_range(kind, low, high))
    if kind.startswith("float"):
        return st.one_of(st.booleans(), junk, st.sampled_from([math.nan, math.inf, -math.inf]),
                         out_of_range(kind, low, high))
    if kind == "bool":
        return st.one_of(st.integers(), st.floats(allow_nan=False), junk)
    if kind == "choice":
        return st.one_of(st.integers(), st.booleans(),
                         st.text(max_size=8).filter(lambda t: t not in CHOICES[field]))
    if kind == "name":
        return st.one_of(st.integers(), st.booleans(), st.just(""), st.text(min_size=256),
                         st.text(max_size=10).filter(
                             lambda t: not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", t)))
    return st.one_of(st.integers(), st.booleans(), st.floats(), st.just(""))  # str


def with_value(raw: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    node = raw
    *parents, last = field.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


@settings(max_examples=150 * SCALE, **SETTINGS)
@given(data=st.data(), field=st.sampled_from(sorted(FIELDS)))
def test_a_wrong_type_or_range_names_the_field(folder: Path, data: st.DataObject,
                                               field: str) -> None:
    value = data.draw(wrong_value(field), label="value")
    config = write_yaml(folder / "wrong.yaml", with_value(base_config(folder), field, value))
    line = one_line_error(kdistill("check", str(config)))
    assert line.startswith(f"kdistill: error: {config}: {field}"), line


FLOAT_FIELDS = sorted(f for f, (kind, _, _) in FIELDS.items() if kind.startswith("float"))
BOUNDED = sorted(f for f, (kind, low, high) in FIELDS.items()
                 if kind in ("int", "float", "float<", "float>", "float<>")
                 and (low is not None or high is not None))


@settings(max_examples=40 * SCALE, **SETTINGS)
@given(field=st.sampled_from(FLOAT_FIELDS),
       value=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_a_non_finite_float_names_the_field(folder: Path, field: str, value: float) -> None:
    config = write_yaml(folder / "finite.yaml", with_value(base_config(folder), field, value))
    line = one_line_error(kdistill("check", str(config)))
    assert line == (f"kdistill: error: {config}: {field}: Input should be a finite number "
                    f"(got {value})"), line


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(data=st.data(), field=st.sampled_from(BOUNDED))
def test_a_value_outside_the_range_names_the_field(folder: Path, data: st.DataObject,
                                                   field: str) -> None:
    value = data.draw(out_of_range(*FIELDS[field]), label="value")
    config = write_yaml(folder / "range.yaml", with_value(base_config(folder), field, value))
    line = one_line_error(kdistill("check", str(config)))
    assert re.match(rf"kdistill: error: {re.escape(str(config))}: {re.escape(field)}: Input "
                    r"should be (greater|less) than", line), line


SECTIONS = ["", "trainer", "trainer.optimizer", "trainer.scheduler", "data", "data.options",
            "evaluation", "student", "student.options", "recipe"]
KNOWN = {"", "name", "output_dir", "cpu_threads", "data", "student", "teacher", "recipe",
         "phases", "trainer", "evaluation", "epochs", "batch_size", "accumulation", "optimizer",
         "scheduler", "clip_grad_norm", "mixed_precision", "seed", "checkpoint_every",
         "keep_checkpoints", "eval_every", "log_every", "progress", "cpu", "lr", "weight_decay",
         "momentum", "betas", "nesterov", "warmup_steps", "min_ratio", "step_size", "gamma",
         "path", "label_column", "test_fraction", "labeled", "options", "size", "threads",
         "repeats", "shifts", "shift_severity", "hidden", "dropout", "temperature"}


def round_trips(key: str) -> bool:
    """Whether YAML reads ``key`` back as written (it folds some line breaks, e.g. U+0085)."""
    return yaml.safe_load(yaml.safe_dump({key: 1}, allow_unicode=True)) == {key: 1}


key_names = st.one_of(st.text(string.ascii_letters + string.digits + "_-", min_size=1,
                              max_size=12),
                      st.text(st.characters(exclude_categories=("Cs",)), min_size=1,
                              max_size=8).filter(round_trips))


@settings(max_examples=60 * SCALE, **SETTINGS)
@given(section=st.sampled_from(SECTIONS), key=key_names.filter(lambda k: k not in KNOWN))
def test_an_unknown_key_in_any_section_is_named(folder: Path, section: str, key: str) -> None:
    raw = base_config(folder)
    node = raw
    for part in section.split(".") if section else []:
        node = node.setdefault(part, {})
    node[key] = 1  # any text, also with dots, line breaks or control characters
    config = write_yaml(folder / "unknown.yaml", raw)
    field = f"{section}.{key}" if section else key
    line = one_line_error(kdistill("check", str(config)))
    assert line.startswith(f"kdistill: error: {config}: {printable(field)}: "), line


# -- (a) malformed YAML and overrides ---------------------------------------------------------
def first_line_names_the_config(outcome: Outcome, config: Path) -> None:
    """A failure is one line naming the config file, or several for several problems: a
    header naming the file and one indented ``field: message`` line each."""
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.err
    lines = outcome.err.splitlines()
    assert lines and lines[0].startswith("kdistill: error: "), outcome.err
    if len(lines) == 1:
        assert str(config) in lines[0] or re.match(
            r"kdistill: error: (data|trainer|recipe|student|teacher|evaluation|--set)", lines[0])
    else:
        assert lines[0] == f"kdistill: error: {config}: invalid configuration", outcome.err
        assert all(re.match(r"  \S.*: ", line) for line in lines[1:]), outcome.err


VALID_TEXT = """\
name: prop
output_dir: {out}
data: {{name: digits, labeled: 50}}
student:
  name: mlp
  size: tiny
recipe: {{name: ce}}
trainer:
  epochs: 1
  batch_size: 32
  progress: false
  optimizer: {{name: adamw, lr: 0.01}}
evaluation: {{threads: 1, repeats: 2}}
"""


@st.composite
def corrupted_yaml(draw: st.DrawFn, valid: str) -> str:
    """The valid text with one edit: inserted YAML syntax or any text, a deleted span, a
    truncation or a duplicated line."""
    edit = draw(st.sampled_from(["insert", "delete", "truncate", "duplicate", "tab"]))
    at = draw(st.integers(0, len(valid)))
    if edit == "insert":
        piece = draw(st.one_of(st.sampled_from(list(":[]{},&*!|>%@`\"'#-?\n\t")),
                               st.text(max_size=6)))
        return valid[:at] + piece + valid[at:]
    if edit == "delete":
        return valid[:at] + valid[at + draw(st.integers(1, 12)):]
    if edit == "truncate":
        return valid[:at]
    lines = valid.splitlines(keepends=True)
    index = draw(st.integers(0, len(lines) - 1))
    if edit == "duplicate":
        return "".join(lines[:index + 1] + lines[index:])
    return "".join(lines[:index] + ["\t" + lines[index]] + lines[index + 1:])


@settings(max_examples=80 * SCALE, **SETTINGS)
@given(data=st.data())
def test_malformed_yaml_is_one_clean_error_or_valid(folder: Path, data: st.DataObject) -> None:
    valid = VALID_TEXT.format(out=folder / "out")
    text = data.draw(corrupted_yaml(valid), label="text")
    config = folder / "malformed.yaml"
    config.write_text(text, encoding="utf-8")
    outcome = kdistill("check", str(config))
    if outcome.code == 0:
        assert outcome.out == f"{config}: valid\n" and outcome.err == ""
    else:
        first_line_names_the_config(outcome, config)


@settings(max_examples=50 * SCALE, **SETTINGS)
@given(key=st.text(string.ascii_lowercase + "._", max_size=15),
       value=st.text(max_size=10), equals=st.booleans())
def test_a_malformed_override_is_one_clean_error(folder: Path, key: str, value: str,
                                                 equals: bool) -> None:
    config = write_yaml(folder / "base.yaml", base_config(folder))
    assignment = f"{key}={value}" if equals else key + value
    parts = assignment.split("=", 1)[0].strip().split(".")
    assume(not any(p in KNOWN for p in parts))  # unknown fields only: a valid one would train
    outcome = kdistill("check", str(config), "--set", assignment)
    first_line_names_the_config(outcome, config)
    assert outcome.err.count("\n") == 1, outcome.err
    assert f"{config}: {parts[0]}: unknown key" in outcome.err or "--set" in outcome.err


# -- (b) CSV files ----------------------------------------------------------------------------
NON_FINITE = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e309", "1e39",
              "3.5e38", "-4e38"]


@dataclass
class CsvCase:
    """A generated CSV file's text and what its error must name (no error: ``valid``)."""

    text: str
    needles: list[str]
    valid: bool = False
    kind: str = ""


def numbers(draw: st.DrawFn, rows: int, columns: int) -> list[list[str]]:
    values = draw(st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=columns,
                                    max_size=columns), min_size=rows, max_size=rows))
    return [[repr(v) for v in row] for row in values]


@st.composite
def csv_case(draw: st.DrawFn, kind: str) -> CsvCase:
    """A table of 2 or 3 balanced classes (at least 4 samples each) with one corruption of
    the given kind."""
    features = draw(st.integers(1, 4))
    classes = draw(st.integers(2, 3))
    rows = classes * draw(st.integers(4, 8))
    header = [f"f{i}" for i in range(features)]
    label_at = draw(st.integers(0, features))
    header.insert(label_at, "label")
    table = numbers(draw, rows, features)
    for i, row in enumerate(table):
        row.insert(label_at, str(i % classes))
    case = _corrupt_csv(draw, kind, header, table, label_at, features, rows)
    case.kind = kind if not case.valid else "valid"
    return case


def _corrupt_csv(draw: st.DrawFn, kind: str, header: list[str], table: list[list[str]],
                 label_at: int, features: int, rows: int) -> CsvCase:
    """One corruption of the table (or, rarely, a text cell that is a number: valid)."""
    row = draw(st.integers(0, rows - 1))
    column = draw(st.integers(0, features))
    line = f"line {row + 2}"
    needles: list[str] = []
    if kind == "non_finite":
        table[row][column] = draw(st.sampled_from(NON_FINITE))
        needles = [line, f"column '{header[column]}'"]
    elif kind == "text":
        cell = draw(st.text(st.characters(exclude_characters=',"\r\n\x00',
                                          exclude_categories=("Cs",)), max_size=8))
        try:
            float(cell)
            return CsvCase(_csv(header, table), [], valid=True)  # a number after all
        except ValueError:
            table[row][column] = cell
        needles = [line, f"column '{header[column]}'", "is not a number"]
    elif kind == "ragged":
        if draw(st.booleans()):
            table[row].pop()
        else:
            table[row].append("1")
        needles = [line, "values for", "columns"]
    elif kind == "empty":
        text = draw(st.sampled_from(["", "\n", " ,\n1,2\n", ",".join(header) + "\n",
                                     ",".join(header) + "\n\n\n"]))
        problem = ("the file is empty" if not text else "the header row is blank"
                   if not text.split("\n")[0].replace(",", "").strip() else "no data rows")
        return CsvCase(text, [problem])
    elif kind == "duplicate":
        other = draw(st.integers(0, features).filter(lambda i: i != column))
        header[other] = header[column]
        needles = [f"column '{header[column]}' appears twice"]
    elif kind == "blank_name":
        header[column] = draw(st.sampled_from(["", " ", "\t"]))
        needles = [f"line 1: column {column + 1} has no name"]
    elif kind == "one_class":
        label = draw(st.integers(0, 3))
        for cells in table:
            cells[label_at] = str(label)
        needles = ["column 'label'", f"all {rows} labels are class {label}"]
    else:  # bad_label
        table[row][label_at] = draw(st.sampled_from(["0.5", "-1", "1e30", "7", "2.25"]))
        needles = ["label"]
    return CsvCase(_csv(header, table), needles)


def _csv(header: list[str], table: list[list[str]]) -> str:
    return "\n".join(",".join(cells) for cells in [header, *table]) + "\n"


def check_data_file(folder: Path, name: str, path: Path) -> tuple[Path, Outcome]:
    config = write_yaml(folder / f"{name}.yaml",
                        base_config(folder, data={"name": name, "path": str(path)}))
    return config, kdistill("check", str(config))


CSV_KINDS = ["non_finite", "text", "ragged", "empty", "duplicate", "one_class", "bad_label",
             "blank_name"]


@pytest.mark.parametrize("kind", CSV_KINDS)
@settings(max_examples=25 * SCALE, **SETTINGS)
@given(data=st.data())
def test_a_bad_csv_is_one_error_naming_file_line_and_column(folder: Path, kind: str,
                                                            data: st.DataObject) -> None:
    case = data.draw(csv_case(kind), label="case")
    event(case.kind)
    path = folder / "table.csv"
    path.write_text(case.text, encoding="utf-8")
    config, outcome = check_data_file(folder, "csv", path)
    if case.valid:
        assert outcome.code == 0, outcome
        return
    line = one_line_error(outcome)
    assert str(path) in line, line
    for needle in case.needles:
        assert needle in line, (needle, line)


@settings(max_examples=3, **SETTINGS)
@given(rows=st.integers(4, 10), features=st.integers(1, 3), data=st.data())
def test_a_valid_generated_csv_passes(folder: Path, rows: int, features: int,
                                      data: st.DataObject) -> None:
    table = numbers(data.draw, 2 * rows, features)
    for i, row in enumerate(table):
        row.append(str(i % 2))
    path = folder / "valid.csv"
    path.write_text(_csv([*(f"f{i}" for i in range(features)), "label"], table))
    config, outcome = check_data_file(folder, "csv", path)
    assert (outcome.code, outcome.out, outcome.err) == (0, f"{config}: valid\n", "")


# -- (c) npz files ----------------------------------------------------------------------------
@dataclass
class NpzCase:
    """Arrays to save (or raw bytes), and what the error must name."""

    arrays: dict[str, np.ndarray]
    needles: list[str]
    raw: bytes | None = None


@st.composite
def npz_case(draw: st.DrawFn, kind: str) -> NpzCase:
    """Inputs [n, f] or [n, 1, h, w] with 2 or 3 balanced classes, then one corruption of the
    given kind."""
    classes = draw(st.integers(2, 3))
    n = classes * draw(st.integers(4, 8))
    shape = draw(st.sampled_from([(n, draw(st.integers(1, 4))), (n, 1, 2, 3)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.normal(size=shape).astype(draw(st.sampled_from([np.float32, np.float64])))
    y = np.arange(n) % classes
    return _corrupt_npz(draw, kind, x, y, shape, n)


def _corrupt_npz(draw: st.DrawFn, kind: str, x: np.ndarray, y: np.ndarray,
                 shape: tuple[int, ...], n: int) -> NpzCase:
    """One corruption of the arrays (or of the file)."""
    if kind == "non_finite":
        index = tuple(draw(st.integers(0, d - 1)) for d in shape)
        x = x.astype(np.float64)
        x[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39, -1e300]))
        return NpzCase({"x": x, "y": y}, [f"array 'x', row {index[0]}"])
    if kind == "shape":
        bad = draw(st.sampled_from([x.reshape(-1)[:n], np.float64(1.0), x[:0],
                                    np.zeros((n, 0))]))
        return NpzCase({"x": bad, "y": y}, ["array 'x' has shape"])
    if kind == "dtype":
        bad = draw(st.sampled_from([x.astype(str), x.astype(np.complex64),
                                    np.zeros(shape, dtype="datetime64[s]")]))
        return NpzCase({"x": bad, "y": y}, ["array 'x' holds"])
    if kind == "object":
        return NpzCase({"x": np.array([{"a": 1}] * n, dtype=object), "y": y},
                       ["array 'x' holds Python objects"])
    if kind.startswith("labels_"):
        row = draw(st.integers(0, n - 1))
        labels = y.astype(np.float64)
        choice = kind.removeprefix("labels_")
        if choice in ("nan", "inf"):
            labels[row] = np.nan if choice == "nan" else np.inf
            return NpzCase({"x": x, "y": labels}, [f"array 'y', row {row}: {labels[row]} is "
                                                   "not a class label"])
        if choice == "2d":
            return NpzCase({"x": x, "y": y.reshape(n, 1)}, ["array 'y' has shape"])
        if choice == "text":
            return NpzCase({"x": x, "y": y.astype(str)}, ["array 'y' must be integers"])
        labels[row] = {"half": 0.5, "huge": 1e30, "negative": -1}[choice]
        expected = ("labels must be the integers 0..C-1" if choice == "negative" else
                    f"array 'y' must be integers 0..C-1, got [{labels[row]:g}]")
        return NpzCase({"x": x, "y": labels}, [expected])
    if kind == "length":
        cut = draw(st.integers(1, n - 1))
        return NpzCase({"x": x, "y": y[:cut]}, [f"array 'x' has {n} rows but 'y' has {cut}"])
    if kind == "one_class":
        return NpzCase({"x": x, "y": np.full(n, draw(st.integers(0, 5)))},
                       [f"all {n} labels are class"])
    if kind == "missing":
        return NpzCase({"inputs": x, "y": y}, ["missing array(s) ['x']"])
    if kind == "not_npz":
        return NpzCase({}, ["not an .npz archive"], raw=draw(st.binary(max_size=64).filter(
            lambda b: not b.startswith(b"PK\x03\x04"))))
    wide = np.zeros((4, shape[1] + 1) if len(shape) == 2 else (4, 1, 3, 2))
    return NpzCase({"x_train": x, "y_train": y, "x_test": wide, "y_test": np.arange(4) % 2},
                   ["training inputs are shaped"])


NPZ_KINDS = ["non_finite", "shape", "dtype", "object", "labels_nan", "labels_inf",
             "labels_half", "labels_2d", "labels_text", "labels_huge", "labels_negative",
             "length", "one_class", "missing", "not_npz", "splits"]


@pytest.mark.parametrize("kind", NPZ_KINDS)
@settings(max_examples=12 * SCALE, **SETTINGS)
@given(data=st.data())
def test_a_bad_npz_is_one_error_naming_file_array_and_row(folder: Path, kind: str,
                                                          data: st.DataObject) -> None:
    case = data.draw(npz_case(kind), label="case")
    path = folder / "arrays.npz"
    if case.raw is not None:
        path.write_bytes(case.raw)
    else:
        with path.open("wb") as handle:
            np.savez(handle, **case.arrays)
    config, outcome = check_data_file(folder, "npz", path)
    line = one_line_error(outcome)
    assert str(path) in line, line
    for needle in case.needles:
        assert needle in line, (needle, line)


@settings(max_examples=3, **SETTINGS)
@given(n=st.integers(8, 20), image=st.booleans(), dtype=st.sampled_from(["float32", "int64",
                                                                        "bool"]))
def test_a_valid_generated_npz_passes(folder: Path, n: int, image: bool, dtype: str) -> None:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(2 * n, 1, 2, 2) if image else (2 * n, 3)) > 0 if dtype == "bool" else \
        rng.normal(size=(2 * n, 1, 2, 2) if image else (2 * n, 3)).astype(dtype)
    path = folder / "valid.npz"
    np.savez(path, x=x, y=np.arange(2 * n) % 2)
    config, outcome = check_data_file(folder, "npz", path)
    assert (outcome.code, outcome.out, outcome.err) == (0, f"{config}: valid\n", "")
