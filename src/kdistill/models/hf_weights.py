"""Tensors read straight from a Hugging Face folder's safetensors files (never unpickled),
without building the model: the input word embeddings, for students and augmentation that
start from the teacher's vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from kdistill.errors import KdistillError
from kdistill.models.hf import SAFETENSORS_WEIGHTS, model_folder

EMBEDDING_SUFFIX = "word_embeddings.weight"


def _weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of ``folder`` without reading any tensor."""
    single, index = (folder / name for name in SAFETENSORS_WEIGHTS)
    if single.is_file():
        with safe_open(single, framework="pt") as weights:
            return dict.fromkeys(weights.keys(), single)
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(name): folder / str(file) for name, file in shards.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as error:
        raise KdistillError(f"{index}: not a safetensors index with a 'weight_map' "
                            f"({error!r})") from None


def read_word_embeddings(folder: str | Path) -> Tensor:
    """The input embedding matrix [V, D] of a Hugging Face model folder: the one tensor whose
    name ends with ``word_embeddings.weight``, read with safetensors (never unpickled)."""
    folder = model_folder(folder)
    files = _weight_files(folder)
    names = [name for name in files if name.endswith(EMBEDDING_SUFFIX)]
    if len(names) != 1:
        shown = ", ".join(sorted(files)[:10]) + (" ..." if len(files) > 10 else "")
        found = "none" if not names else ", ".join(names)
        raise KdistillError(f"{folder}: expected one tensor named '*{EMBEDDING_SUFFIX}' (the "
                            f"input embeddings), found {found}; tensors: {shown}")
    with safe_open(files[names[0]], framework="pt") as weights:
        return weights.get_tensor(names[0])
