"""Students made from a transformers teacher: fewer layers, or a smaller configuration.

Two ways, both for BERT-family encoders (the transformer layers in
``model.base_model.encoder.layer``: BERT, RoBERTa, ELECTRA, XLM-R, MiniLM...) and decoder
language models (``model.base_model.layers``: Llama, Mistral, Qwen2...; the ``lm_student`` of
:mod:`kdistill.models.lm`):

* **kept layers** (``layers``): the student has the teacher's configuration with
  ``len(layers)`` layers, student layer i starting as teacher layer ``layers[i]``; everything
  outside the layers (embeddings, pooler, task head) starts as the teacher's. This is the
  initialisation of DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version of BERT":
  one layer out of two) and of TinyBERT/PKD-style layer selection (Sun et al. 2019, "Patient
  Knowledge Distillation for BERT Model Compression").
* **a smaller configuration** (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
  ``intermediate_size``, ``num_key_value_heads`` for grouped-query attention): the layers
  start random; every tensor outside them whose shape is
  unchanged is copied (with the teacher's hidden size: embeddings, pooler and head). With
  another hidden size those start random too: projecting the teacher's embeddings (PCA or
  truncation) is left out, as nothing here shows it helps more than it costs.

The student reads text with the teacher's tokenizer (the same ``tokenisation``), so
token-level taps (hidden states, attentions) between the two are allowed. With ``pooling``
(``mean`` or ``cls``) the student is a sentence encoder instead of a classifier: the bare
encoder's last hidden states pooled and, unless ``normalize`` is false, L2-normalised
(:mod:`kdistill.models.sentence`), for the embedding recipes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool
from torch import nn

from kdistill.batch import Task
from kdistill.errors import KdistillError
from kdistill.models.hf import folder_problems, load_hf_model, tokenizer_problems
from kdistill.models.hf_text import HFTextEncoder, MaxLength, takes_token_type_ids
from kdistill.models.sentence import Pooling, sentence_model
from kdistill.models.text import TextModel

LayerIndex = Annotated[int, Field(ge=0)]
Size = Annotated[int, Field(ge=1)]
SIZE_OPTIONS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "num_key_value_heads")


def layer_path(model: nn.Module, name: str = "hf_student") -> str:
    """The dotted path of ``model``'s list of transformer layers
    (``<base_model_prefix>.encoder.layer`` for BERT-family encoders,
    ``<base_model_prefix>.layers`` for decoder language models); :class:`KdistillError` for
    other architectures."""
    base = getattr(model, "base_model", None)
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for layers in (getattr(getattr(base, "encoder", None), "layer", None),
                   getattr(base, "layers", None)):
        if isinstance(layers, nn.ModuleList) and len(layers) == count:
            return next(path for path, module in model.named_modules() if module is layers)
    raise KdistillError(
        f"{name}: {type(model).__name__} keeps no list of {count} transformer layers at "
        "base_model.encoder.layer or base_model.layers; students are made from BERT-family "
        "encoders (BERT, RoBERTa, ELECTRA, XLM-R, MiniLM...) and decoder language models "
        "(Llama, Mistral, Qwen2...) only")


def every_other(count: int) -> list[int]:
    """Layers 0, 2, 4, ... of ``count``: DistilBERT's one layer out of two."""
    return list(range(0, count, 2))


def _checked_layers(layers: Sequence[int], count: int, name: str) -> list[int]:
    kept = list(layers)
    if not kept:
        raise KdistillError(f"{name}: layers is empty; keep at least one teacher layer")
    if any(not 0 <= i < count for i in kept):
        raise KdistillError(f"{name}: layers {kept} out of range: the teacher has {count} "
                            f"layers (0-{count - 1})")
    if any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
        raise KdistillError(f"{name}: layers {kept} must be increasing teacher layer "
                            "indices, each kept once")
    return kept


def _teacher_key(key: str, path: str, kept: Sequence[int] | None) -> str | None:
    """The teacher's name for the student tensor ``key``: the same outside the layers, the
    kept teacher layer's inside them (``None`` when the layers are not copied)."""
    match = re.match(rf"{re.escape(path)}\.(\d+)\.", key)
    if match is None:
        return key
    if kept is None:
        return None
    return f"{path}.{kept[int(match.group(1))]}.{key[match.end():]}"


def student_from_teacher(teacher: nn.Module, layers: Sequence[int] | str | None = None,
                         name: str = "hf_student", **sizes: int) -> nn.Module:
    """A smaller network of ``teacher``'s class: its ``layers`` kept (a list of teacher layer
    indices, or ``"every_other"``), or the configuration ``sizes`` (:data:`SIZE_OPTIONS`).
    See the module docstring for what is copied. ``name`` (the model builder's) starts every
    error message."""
    path = layer_path(teacher, name)
    count = teacher.config.num_hidden_layers
    unknown = sorted(set(sizes) - set(SIZE_OPTIONS))
    if unknown:
        raise KdistillError(f"{name}: unknown size option(s) {unknown}; valid: "
                            f"{', '.join(SIZE_OPTIONS)}")
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if (layers is None) == (not sizes):
        raise KdistillError(f"{name}: give either layers (teacher layers to keep) or a "
                            f"smaller configuration ({', '.join(SIZE_OPTIONS)}), "
                            f"not {'both' if sizes else 'neither'}")
    config = copy.deepcopy(teacher.config)
    kept: list[int] | None = None
    if layers is not None:
        if layers == "every_other":
            layers = every_other(count)
        elif isinstance(layers, str):
            raise KdistillError(f"{name}: layers '{layers}' is neither a list of teacher "
                                "layer indices nor 'every_other'")
        kept = _checked_layers(layers, count, name)
        config.num_hidden_layers = len(kept)
    _resize(config, sizes, name)
    student = type(teacher)(config)
    _copy_weights(teacher, student, path, kept, name)
    return student


def _resize(config: Any, sizes: Mapping[str, int], name: str) -> None:
    """Set ``sizes`` on ``config`` (in place) and keep it consistent: the width of an attention
    head (``head_dim``, in configurations that store it) follows ``hidden_size /
    num_attention_heads``, and grouped-query attention (``num_key_value_heads``) becomes
    plain multi-head attention when only the number of heads is given."""
    kv_heads = hasattr(config, "num_key_value_heads")
    if "num_key_value_heads" in sizes and not kv_heads:
        raise KdistillError(f"{name}: num_key_value_heads: {type(config).__name__} has no "
                            "grouped-query attention; remove it")
    for option, value in sizes.items():
        setattr(config, option, value)
    if kv_heads and "num_attention_heads" in sizes and "num_key_value_heads" not in sizes:
        config.num_key_value_heads = config.num_attention_heads
    if config.hidden_size % config.num_attention_heads:
        raise KdistillError(f"{name}: hidden_size {config.hidden_size} is not a multiple of "
                            f"num_attention_heads {config.num_attention_heads}")
    if kv_heads and config.num_attention_heads % config.num_key_value_heads:
        raise KdistillError(f"{name}: num_attention_heads {config.num_attention_heads} is not "
                            f"a multiple of num_key_value_heads {config.num_key_value_heads}")
    if getattr(config, "head_dim", None) is not None and (
            {"hidden_size", "num_attention_heads"} & set(sizes)):
        config.head_dim = config.hidden_size // config.num_attention_heads


def _copy_weights(teacher: nn.Module, student: nn.Module, path: str,
                  kept: Sequence[int] | None, name: str) -> None:
    """Copy into ``student`` every teacher tensor it maps to with the same shape; with
    ``kept`` layers every student tensor must find one."""
    source = teacher.state_dict()
    copied = {}
    for key, value in student.state_dict().items():
        found = _teacher_key(key, path, kept)
        if found is not None and found in source and source[found].shape == value.shape:
            copied[key] = source[found].clone()
    missing = [k for k in student.state_dict() if k not in copied]
    if kept is not None and missing:
        raise KdistillError(f"{name}: the teacher has no tensor of the same shape for "
                            f"{missing[:3]}; cannot keep its layers in {type(teacher).__name__}")
    student.load_state_dict(copied, strict=False)


def build_hf_student(input_shape: Sequence[int], num_classes: int, teacher: str,
                     layers: list[LayerIndex] | Literal["every_other"] | None = None,
                     num_hidden_layers: Size | None = None, hidden_size: Size | None = None,
                     num_attention_heads: Size | None = None,
                     intermediate_size: Size | None = None, max_length: MaxLength = 128,
                     trust_remote_code: StrictBool = False, pooling: Pooling | None = None,
                     normalize: StrictBool | None = None, *,
                     task: Task = "classification") -> nn.Module:
    """The ``hf_student`` model: a smaller copy of the transformers teacher saved in the local
    folder ``teacher`` (:func:`student_from_teacher`), behind the teacher's tokenizer, with a
    head for the data's ``task`` and ``num_classes``; with ``pooling``, a sentence encoder
    (normalised unless ``normalize`` is false) without a head. ``input_shape`` is unused."""
    if pooling is None and normalize is not None:
        raise KdistillError("hf_student: normalize applies to sentence embeddings; give "
                            "pooling (mean or cls) too, or leave normalize out")
    if pooling is not None and task == "token_classification":
        raise KdistillError("hf_student: a student with pooling gives one embedding per text "
                            "and cannot tag words (task token_classification)")
    network = load_hf_model(teacher, task="encoder" if pooling else task,
                            num_labels=num_classes, trust_remote_code=trust_remote_code)
    student = student_from_teacher(network, layers, num_hidden_layers=num_hidden_layers,
                                   hidden_size=hidden_size,
                                   num_attention_heads=num_attention_heads,
                                   intermediate_size=intermediate_size)
    encoder = HFTextEncoder.from_folder(Path(teacher), max_length, trust_remote_code,
                                        takes_token_type_ids(student))
    if pooling is not None:
        return sentence_model(student, encoder, pooling, normalize is not False)
    return TextModel(encoder, student)


def hf_student_files(options: Mapping[str, Any], where: str) -> list[str]:
    """What keeps ``hf_student``'s teacher folder from loading safely (config validation,
    nothing loaded): the model's problems, then its tokenizer's."""
    trust = options.get("trust_remote_code", False)
    return (folder_problems(options["teacher"], trust, where, field="teacher")
            or tokenizer_problems(options["teacher"], trust, where, field="teacher"))
