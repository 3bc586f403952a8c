"""The errors kdistill raises for bad input; the command line prints them without a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class KdistillError(ValueError):
    """Base of every error that describes a problem with the user's input."""


class ModelCallError(KdistillError):
    """A model could not run on a batch (wrong input shape, missing keys, ...)."""


class NonFiniteError(KdistillError):
    """A training step's loss or gradients went non-finite (NaN or infinite); the run stopped
    before applying that step's update."""


def describe_batch(batch: Mapping[str, Any]) -> str:
    """``input [64, 1, 8, 8] float32, labels [64] int64`` for the tensors of a batch."""
    parts = []
    for key, value in batch.items():
        shape = getattr(value, "shape", None)
        if shape is not None:
            parts.append(f"{key} {list(shape)} {str(getattr(value, 'dtype', '')).split('.')[-1]}")
    return ", ".join(parts) or "no tensors"
