"""Hugging Face transformers loaded from a local folder (never from a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn


def load_hf_model(path: str | Path, task: Literal["classification", "encoder"] = "classification",
                  num_labels: int | None = None) -> nn.Module:
    """Load a transformers model from ``path`` with ``local_files_only=True``.

    ``classification`` gives ``AutoModelForSequenceClassification`` (a new head when
    ``num_labels`` differs from the checkpoint's); ``encoder`` gives the bare ``AutoModel``.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model folder at {folder} (config.json missing)")
    # Deferred: transformers takes seconds to import and only Hugging Face models need it.
    from transformers import AutoModel, AutoModelForSequenceClassification

    if task == "encoder":
        return AutoModel.from_pretrained(folder, local_files_only=True)
    # A different label count needs a fresh classifier: without ignore_mismatched_sizes
    # transformers refuses to load a checkpoint whose head has another shape.
    extra = ({"num_labels": num_labels, "ignore_mismatched_sizes": True}
             if num_labels is not None else {})
    return AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True,
                                                              **extra)
