"""Language models (task ``lm``): a transformers model from a local folder or a GGUF file, and
the students made from it.

**Where a model comes from.** ``path`` is a local Hugging Face folder (loaded with
:func:`~kdistill.models.hf.load_hf_model`: safetensors only, no code from the folder unless
asked) or a ``.gguf`` file. transformers reads a GGUF file with the ``gguf`` package and
de-quantises it, which takes long (about 50 s for a 135M model) and gives a model that refuses
``save_pretrained`` (it stays marked as quantised). So a GGUF file is converted once
(:func:`convert_gguf`: the same architecture built from the file's configuration, the
de-quantised weights loaded into it, saved with the tokenizer) into a folder under kdistill's
cache directory, ``<cache>/gguf/<sha256 of the file>``, and every later load reads that folder
(a fraction of a second). The conversion happens on first use, wherever the file is named
(teacher, student or data tokenizer), with no separate command to remember; keying it by the
file's content means a replaced file is converted again and two copies of one file share a
folder. A conversion is written to a temporary folder and renamed when complete, so an
interrupted one is never reused.

**Students.** ``lm_student`` is a smaller copy of a teacher (:func:`kdistill.models.hf_student.
student_from_teacher`): the teacher's layers ``layers`` kept (every tensor copied), or a
configuration with fewer or narrower layers (``num_hidden_layers``, ``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``), whose embeddings and
output head start as the teacher's when the hidden size is the teacher's. Either way the
student keeps the teacher's vocabulary and so its tokenizer: token-level distillation needs
both models' distributions over the same tokens.

Models are used as transformers returns them: a batch's ``input_ids`` and ``attention_mask``
(and ``decoder_input_ids`` for an encoder-decoder model) go in as keywords and the output's
``logits`` [B, L, V] are read (see :mod:`kdistill.batch`). The key-value cache is turned off
(``use_cache``), as training never reuses it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import StrictBool
from torch import nn

from kdistill.batch import Task
from kdistill.checkpoint import file_sha256
from kdistill.errors import KdistillError
from kdistill.models.hf import folder_problems, load_hf_model, model_folder, tokenizer_problems
from kdistill.models.hf_student import LayerIndex, Size, student_from_teacher
from kdistill.settings import cache_dir

GGUF_SUFFIX = ".gguf"
GGUF_INSTALL = "pip install gguf"


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix)."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


def read_gguf(file: Path) -> tuple[nn.Module, Any]:
    """The de-quantised fp32 causal LM and the tokenizer of the GGUF ``file``, read by
    transformers with the ``gguf`` package (local file only)."""
    if importlib.util.find_spec("gguf") is None:
        raise KdistillError(f"{file}: reading a GGUF file needs the gguf package; install it "
                            f"with: {GGUF_INSTALL}")
    # Deferred: transformers takes seconds to import and only GGUF files need this.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = {"gguf_file": file.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=torch.float32, **where)
    return model, AutoTokenizer.from_pretrained(file.parent, **where)


def convert_gguf(file: Path, folder: Path) -> Path:
    """Write the GGUF ``file`` as a plain transformers folder (``model.safetensors``, the
    configuration and the tokenizer) at ``folder``: its de-quantised weights
    (:func:`read_gguf`) loaded into a model built from its configuration, which, unlike the
    de-quantised model, saves. Written to a temporary folder renamed at the end."""
    dequantised, tokenizer = read_gguf(file)
    fresh = type(dequantised)(dequantised.config)
    fresh.load_state_dict(dequantised.state_dict())
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)
    return folder


def lm_folder(path: str | Path) -> Path:
    """``path`` as a model folder: a folder as it is; a GGUF file converted on first use into
    ``<cache>/gguf/<sha256>`` (:func:`convert_gguf`) and that folder reused afterwards. The
    name of an installed model (:data:`~kdistill.models.hf.INSTALLED_MODELS`, e.g.
    ``SmolLM2-135M-Instruct``) stands for its folder or file."""
    path = model_folder(path)
    if not is_gguf(path):
        return path
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    folder = cache_dir() / "gguf" / file_sha256(path)
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(path, folder)
    return folder


def load_lm(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The language model of the folder or GGUF file ``path`` (:func:`lm_folder`), with its
    key-value cache off."""
    model = load_hf_model(lm_folder(path), task="lm", trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    return model


def check_vocabulary(model: nn.Module, tokens: int, name: str) -> nn.Module:
    """``model`` when its output covers the ``tokens`` ids of the data's tokenizer; otherwise
    a :class:`KdistillError` (the data was tokenised with another tokenizer)."""
    size = model.get_output_embeddings().weight.shape[0]
    if tokens > size:
        raise KdistillError(f"{name}: the data's tokenizer has {tokens} tokens but the model "
                            f"predicts {size}; tokenise the data with the model's own tokenizer "
                            "(data.options.tokenizer: the teacher's folder or GGUF file)")
    return model


def _lm_task(task: Task, name: str) -> None:
    """Refuse data of another task than language modelling for the model builder ``name``."""
    if task != "lm":
        raise KdistillError(f"{name}: a language model learns language-modelling data (task "
                            f"lm: lm_text, lm_hf_dataset), not {task} data")


def build_hf_lm(input_shape: Sequence[int], num_classes: int, path: str,
                trust_remote_code: StrictBool = False, *, task: Task = "lm") -> nn.Module:
    """The ``hf_lm`` model: the language model of the local folder or GGUF file ``path``
    (:func:`load_lm`), for data of task ``lm`` whose tokenizer has ``num_classes`` tokens.
    ``input_shape`` is unused."""
    _lm_task(task, "hf_lm")
    return check_vocabulary(load_lm(path, trust_remote_code), num_classes, "hf_lm")


def build_lm_student(input_shape: Sequence[int], num_classes: int, teacher: str,
                     layers: list[LayerIndex] | Literal["every_other"] | None = None,
                     num_hidden_layers: Size | None = None, hidden_size: Size | None = None,
                     num_attention_heads: Size | None = None,
                     num_key_value_heads: Size | None = None,
                     intermediate_size: Size | None = None,
                     trust_remote_code: StrictBool = False, *, task: Task = "lm") -> nn.Module:
    """The ``lm_student`` model: a smaller copy of the language model ``teacher`` (a folder or
    GGUF file): its ``layers`` kept, or a smaller configuration (see the module docstring).
    ``input_shape`` is unused."""
    _lm_task(task, "lm_student")
    network = load_lm(teacher, trust_remote_code)
    student = student_from_teacher(network, layers, name="lm_student",
                                   num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                                   num_attention_heads=num_attention_heads,
                                   num_key_value_heads=num_key_value_heads,
                                   intermediate_size=intermediate_size)
    return check_vocabulary(student, num_classes, "lm_student")


def lm_problems(path: str, trust_remote_code: bool, where: str, field: str) -> list[str]:
    """What keeps the language model ``path`` from loading (config validation, nothing
    loaded): a missing GGUF file, or a folder's model and tokenizer problems."""
    try:
        located = model_folder(path)
    except FileNotFoundError as error:
        return [f"{where}.{field}: {error}"]
    if is_gguf(located):
        return [] if located.is_file() else [f"{where}.{field}: GGUF file not found: {path}"]
    return (folder_problems(path, trust_remote_code, where, field)
            or tokenizer_problems(path, trust_remote_code, where, field))


def hf_lm_files(options: Mapping[str, Any], where: str) -> list[str]:
    """:func:`lm_problems` of ``hf_lm``'s ``path``."""
    return lm_problems(options["path"], options.get("trust_remote_code", False), where, "path")


def lm_student_files(options: Mapping[str, Any], where: str) -> list[str]:
    """:func:`lm_problems` of ``lm_student``'s ``teacher``."""
    return lm_problems(options["teacher"], options.get("trust_remote_code", False), where,
                       "teacher")

