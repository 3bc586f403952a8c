"""Hugging Face transformers loaded from a local folder (never from a hub), running no code
from the folder unless the user asks.

Loading a model folder can run code in two ways, and both are refused before transformers
sees the folder:

* **Custom code**: a ``config.json`` with an ``auto_map`` names Python modules in the folder
  (``modeling_*.py``, ...) that transformers imports; left to itself it would ask on stdin
  whether to run them. kdistill decides instead, from ``trust_remote_code`` (off by default):
  a folder that carries Python code, an ``auto_map`` or an attention kernel from a hub is
  refused unless it is on, and transformers always gets the flag explicitly, so it never
  prompts.
* **Pickled weights**: ``pytorch_model.bin`` (and ``.pt``/``.pth``/``.ckpt``/``.pkl``) are
  pickles. Weights are read only from safetensors (``use_safetensors=True``, whatever
  ``trust_remote_code`` says); a folder with only pickled weights is refused with how to
  convert it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from torch import nn

from kdistill.errors import KdistillError

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Config keys whose value, when it names a hub repository ("org/name"), makes transformers
# fetch and run a compiled attention kernel (with the `kernels` package installed).
KERNEL_KEYS = ("attn_implementation", "_attn_implementation")


class UnsafeModelFolder(KdistillError):
    """A model folder kdistill will not load as it stands: loading it would run its code."""


def _walk(value: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every (dotted location, key, value) of a JSON value's mappings, nested ones too."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            yield here, str(key), item
            yield from _walk(item, here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{where}.{i}")


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsafeModelFolder(f"{folder / 'config.json'}: not a readable JSON file "
                                f"({error})") from None
    if not isinstance(config, dict):
        raise UnsafeModelFolder(f"{folder / 'config.json'}: not a JSON object")
    return config


def custom_code(folder: str | Path) -> list[str]:
    """What in the Hugging Face model ``folder`` transformers would import and run: ``auto_map``
    entries of ``config.json``, Python files, an attention kernel named by a hub repository.
    Empty for a folder of plain configuration and weights."""
    folder = Path(folder)
    found = []
    for where, key, value in _walk(_read_config(folder)):
        if key == "auto_map":
            shown = (", ".join(f"{k} -> {v}" for k, v in value.items())
                     if isinstance(value, dict) else json.dumps(value))
            found.append(f"config.json {where}: {shown}")
        elif key in KERNEL_KEYS and isinstance(value, str) and "/" in value:
            found.append(f"config.json {where}: hub kernel '{value}'")
    python = sorted(p.name for p in folder.glob("*.py"))
    if python:
        found.append(f"Python files {', '.join(python)}")
    return found


def pickle_weights(folder: str | Path) -> list[str]:
    """The pickled weight files of ``folder`` (``pytorch_model.bin``, ``*.pt``, ...)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))


def folder_problems(path: str | Path, trust_remote_code: bool = False,
                    where: str = "options") -> list[str]:
    """Why the model folder ``path`` cannot be loaded safely, each message starting with the
    config field to change (``<where>.path`` or ``<where>.trust_remote_code``); empty when it
    can. Nothing in the folder is imported or unpickled."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return [f"{where}.path: no Hugging Face model folder at {folder} (config.json missing)"]
    try:
        code = custom_code(folder)
    except UnsafeModelFolder as error:
        return [f"{where}.path: {error}"]
    problems = []
    if code and trust_remote_code is not True:  # only a real True lets code run, not "false"
        problems.append(
            f"{where}.trust_remote_code: {folder} holds custom code that transformers would "
            f"import and run ({'; '.join(code)}); kdistill runs code from a model folder only "
            f"when asked: read that code, then set {where}.trust_remote_code: true")
    if not any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        pickles = pickle_weights(folder)
        if pickles:
            problems.append(
                f"{where}.path: {folder} has its weights only as pickle ({', '.join(pickles)}), "
                "which kdistill never loads (unpickling a file can run any code); convert them "
                "once, in a session where you trust the file: load the model with the "
                "transformers class it was saved from and call save_pretrained(folder), which "
                "writes model.safetensors")
        else:
            problems.append(f"{where}.path: {folder} has no weights (model.safetensors "
                            "missing)")
    return problems


def load_hf_model(path: str | Path, task: Literal["classification", "encoder"] = "classification",
                  num_labels: int | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a transformers model from the local folder ``path`` (``local_files_only=True``,
    weights from safetensors only).

    ``classification`` gives ``AutoModelForSequenceClassification`` (a new head when
    ``num_labels`` differs from the checkpoint's); ``encoder`` gives the bare ``AutoModel``.
    A folder with custom code is refused unless ``trust_remote_code`` is true, and one with
    only pickled weights always (:class:`UnsafeModelFolder`); stdin is never read.
    """
    if not isinstance(trust_remote_code, bool):
        raise KdistillError(f"trust_remote_code: expected true or false, got "
                            f"{trust_remote_code!r}")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model folder at {folder} (config.json missing)")
    problems = folder_problems(folder, trust_remote_code)
    if problems:
        raise UnsafeModelFolder("; ".join(problems))
    # Deferred: transformers takes seconds to import and only Hugging Face models need it.
    from transformers import AutoModel, AutoModelForSequenceClassification

    # Explicit flags, so transformers never falls back to asking on stdin or to unpickling.
    safe: dict[str, Any] = {"local_files_only": True, "use_safetensors": True,
                            "trust_remote_code": trust_remote_code}
    if task == "encoder":
        return AutoModel.from_pretrained(folder, **safe)
    # A different label count needs a fresh classifier: without ignore_mismatched_sizes
    # transformers refuses to load a checkpoint whose head has another shape.
    extra = ({"num_labels": num_labels, "ignore_mismatched_sizes": True}
             if num_labels is not None else {})
    return AutoModelForSequenceClassification.from_pretrained(folder, **safe, **extra)
