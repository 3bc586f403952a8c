"""``digit-lines``: handwritten digit strings read left to right, a CTC recognition set.

Each sample is a line image [1, 8, W] showing ``min_length`` .. ``max_length`` of
scikit-learn's 8x8 digits side by side; its target is the digit sequence (classes 0-9, the CTC
blank is class 10, so ``num_classes`` = 11). The generating rule, every draw from ``seed``:

* the 1,797 digit images are split, stratified by digit, into a training and a test pool
  (``test_fraction`` of them for the test pool), so no test line shows an image seen in
  training;
* a line's length is drawn uniformly from ``min_length`` .. ``max_length`` and its digits are
  images drawn uniformly, with replacement, from its split's pool;
* the images are pasted left to right on a blank canvas, each after a gap of 0 ..
  ``max_gap`` empty columns (drawn uniformly per digit), so where a digit sits varies; every
  line has the width W = ``max_length`` * (8 + ``max_gap``) and ends in blank columns.

Targets are padded with ``UNLABELED`` to ``max_length`` (see
:class:`~kdistill.data.sequences.SequenceDataset`).
"""

from __future__ import annotations

import numpy as np
import torch

from kdistill.batch import UNLABELED
from kdistill.data.base import DataSplits
from kdistill.data.sequences import SequenceDataset

SIDE = 8  # scikit-learn's digits are 8 x 8
DIGITS = 10
BLANK_NAME = "<blank>"


def compose_lines(images: np.ndarray, digits: np.ndarray, count: int, min_length: int,
                  max_length: int, max_gap: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` lines drawn from the pool ``images`` [P, 8, 8] with digits ``digits`` [P], as
    described in the module doc: (lines [count, 1, 8, W] float32, targets [count,
    max_length] int64 padded with ``UNLABELED``)."""
    width = max_length * (SIDE + max_gap)
    lines = np.zeros((count, 1, SIDE, width), dtype=np.float32)
    targets = np.full((count, max_length), UNLABELED, dtype=np.int64)
    for row in range(count):
        length = int(rng.integers(min_length, max_length + 1))
        chosen = rng.integers(0, len(images), size=length)
        gaps = rng.integers(0, max_gap + 1, size=length)
        column = 0
        for slot, (image, gap) in enumerate(zip(chosen, gaps, strict=True)):
            column += int(gap)
            lines[row, 0, :, column:column + SIDE] = images[image]
            column += SIDE
            targets[row, slot] = digits[image]
    return lines, targets


def load_digit_lines(train_lines: int = 2000, test_lines: int = 500, min_length: int = 3,
                     max_length: int = 5, max_gap: int = 3, test_fraction: float = 0.25,
                     seed: int = 0) -> DataSplits:
    """The ``digit-lines`` data set (module doc): ``train_lines`` training and ``test_lines``
    test lines, generated from ``seed`` alone."""
    # Deferred: scikit-learn takes about two seconds to import; only the loaders need it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 1 <= min_length <= max_length:
        raise ValueError(f"data set 'digit-lines': need 1 <= min_length <= max_length, got "
                         f"{min_length} and {max_length}")
    if train_lines < 1 or test_lines < 1 or max_gap < 0:
        raise ValueError(f"data set 'digit-lines': need train_lines and test_lines >= 1 and "
                         f"max_gap >= 0, got {train_lines}, {test_lines} and {max_gap}")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_pool, test_pool = train_test_split(np.arange(len(images)), test_size=test_fraction,
                                             random_state=seed, stratify=digits.target)
    rng = np.random.default_rng(seed)
    splits = []
    for pool, count in ((np.sort(train_pool), train_lines), (np.sort(test_pool), test_lines)):
        lines, targets = compose_lines(images[pool], digits.target[pool], count, min_length,
                                       max_length, max_gap, rng)
        splits.append(SequenceDataset(torch.from_numpy(lines), torch.from_numpy(targets)))
    return DataSplits("digit-lines", splits[0], splits[1], num_classes=DIGITS + 1,
                      input_shape=tuple(splits[0].inputs.shape[1:]), task="ctc",
                      label_names=[str(d) for d in range(DIGITS)] + [BLANK_NAME])
