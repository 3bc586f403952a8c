"""Regression data: float targets (NaN = hidden), ``num_classes`` = 1 (one output), task
``"regression"``.

Features and targets are standardised with the training split's mean and standard deviation
(population std, ddof = 0; a constant column keeps std 1), so the test split never leaks into
the scaling. ``DataSplits.target_scale`` keeps ``(mean, std)`` of the raw training targets:
raw target = label * std + mean (a mean squared error in standard units times std**2 is the
error in the raw units).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from kdistill.data.base import ArrayDataset, DataSplits


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray, np.ndarray]:
    """``(train', test', mean, std)`` with x' = (x - mean) / std, mean and std over the
    training rows (axis 0)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std, mean, std


def regression_splits(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
                      seed: int) -> DataSplits:
    """Random (unstratified) train/test split of features [N, F] and targets [N], both
    standardised on the training split."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"data set '{name}': expected features [N, F] and targets [N], got "
                         f"{x.shape} and {y.shape}")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction,
                                                        random_state=seed)
    x_train, x_test, _, _ = standardise(x_train, x_test)
    y_train, y_test, y_mean, y_std = standardise(y_train, y_test)

    def tensors(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.as_tensor(x, dtype=torch.float32),
                            torch.as_tensor(y, dtype=torch.float32))

    return DataSplits(name, tensors(x_train, y_train), tensors(x_test, y_test), num_classes=1,
                      input_shape=(x.shape[1],), task="regression",
                      target_scale=(float(y_mean), float(y_std)))


def load_diabetes(test_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """scikit-learn's diabetes data (442 patients, 10 features, disease progression after one
    year), shipped with scikit-learn. sklearn's own feature scaling is undone (``scaled=False``)
    and replaced by the training split's standardisation."""
    # Deferred: scikit-learn takes about two seconds to import; only this loader needs it.
    from sklearn.datasets import load_diabetes as sklearn_diabetes

    diabetes = sklearn_diabetes(scaled=False)
    return regression_splits("diabetes", diabetes.data, diabetes.target, test_fraction, seed)
