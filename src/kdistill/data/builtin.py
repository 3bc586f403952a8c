"""Built-in data sets (shipped with installed packages, no download) and user array files."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdistill.data.base import ArrayDataset, DataSplits


def split_arrays(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
                 seed: int) -> DataSplits:
    """Stratified train/test split of float inputs and integer labels."""
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return from_arrays(name, x_train, y_train, x_test, y_test)


def from_arrays(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray) -> DataSplits:
    """Wrap numpy train/test arrays as :class:`DataSplits`."""
    classes = np.unique(np.concatenate([y_train, y_test]))
    if not np.array_equal(classes, np.arange(len(classes))):
        raise ValueError(f"data set '{name}': labels must be 0..C-1 integers, got "
                         f"{classes[:10].tolist()}")

    def tensors(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.as_tensor(x, dtype=torch.float32),
                            torch.as_tensor(y, dtype=torch.long))

    return DataSplits(name, tensors(x_train, y_train), tensors(x_test, y_test),
                      num_classes=len(classes), input_shape=tuple(x_train.shape[1:]))


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 8x8 handwritten digits, pixels scaled to [0, 1], shape (1, 8, 8)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return split_arrays("digits", images, digits.target.astype(np.int64), test_fraction, seed)


def load_npz(path: str | Path, test_fraction: float = 0.25, seed: int = 0,
             input_key: str = "x", label_key: str = "y") -> DataSplits:
    """A ``.npz`` file holding ``x``/``y`` (split here) or ``x_train``, ``y_train``,
    ``x_test``, ``y_test`` (used as given). Key names can be changed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data file not found: {path}")
    with np.load(path, allow_pickle=False) as arrays:
        keys = set(arrays.files)
        split_keys = {f"{input_key}_train", f"{label_key}_train", f"{input_key}_test",
                      f"{label_key}_test"}
        if split_keys <= keys:
            return from_arrays(path.stem, *(arrays[k] for k in (
                f"{input_key}_train", f"{label_key}_train", f"{input_key}_test",
                f"{label_key}_test")))
        missing = {input_key, label_key} - keys
        if missing:
            raise ValueError(f"{path}: missing array(s) {sorted(missing)}; found {sorted(keys)}")
        return split_arrays(path.stem, arrays[input_key].astype(np.float32),
                            arrays[label_key].astype(np.int64), test_fraction, seed)


def load_csv(path: str | Path, label_column: str = "label", test_fraction: float = 0.25,
             seed: int = 0) -> DataSplits:
    """A CSV file with a header, numeric feature columns and an integer label column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"csv data file not found: {path}")
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty")
        if label_column not in header:
            raise ValueError(f"{path}: no label column '{label_column}'; columns: {header}")
        label_at = header.index(label_column)
        rows = list(reader)
    try:
        table = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"{path}: every column must be numeric ({error})") from None
    labels = table[:, label_at].astype(np.int64)
    features = np.delete(table, label_at, axis=1).astype(np.float32)
    return split_arrays(path.stem, features, labels, test_fraction, seed)


DATASETS: dict[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "npz": load_npz,
    "csv": load_csv,
}


def load_dataset(name: str, **options: object) -> DataSplits:
    """Load a registered data set by name."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set '{name}'; available: {sorted(DATASETS)}")
    return DATASETS[name](**options)
