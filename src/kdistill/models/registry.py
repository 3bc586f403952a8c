"""Registered models: name -> builder, with named size presets.

Every builder takes the data's ``input_shape`` and ``num_classes`` plus its own options;
``size`` picks a preset and explicit options override it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool
from torch import nn

from kdistill.models.cnn import CNN
from kdistill.models.hf import folder_problems, load_hf_model
from kdistill.models.hf_student import build_hf_student, hf_student_files
from kdistill.models.hf_text import build_hf_text, hf_text_files
from kdistill.models.mlp import MLP
from kdistill.models.oracle import LabelConditioned, LabelDropout
from kdistill.models.tagger import Tagger
from kdistill.names import unknown_name

MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {"tiny": {"hidden": [16]}, "small": {"hidden": [64]}, "base": {"hidden": [256, 256]}},
    "cnn": {"tiny": {"channels": [8, 16]}, "small": {"channels": [16, 32]},
            "base": {"channels": [32, 64, 128]}},
    "tagger": {"tiny": {"embed_dim": 16, "hidden": 16}, "small": {"embed_dim": 32, "hidden": 32},
               "base": {"embed_dim": 64, "hidden": 64, "layers": 2}},
}


# Option types with their limits: a config's model options are validated against these
# annotations (kdistill.config) before anything is built.
Width = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]


def _mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[Width],
         dropout: Dropout = 0.0) -> nn.Module:
    return MLP(input_shape, num_classes, hidden, dropout)


def _cnn(input_shape: Sequence[int], num_classes: int,
         channels: Annotated[Sequence[Width], Field(min_length=1)],
         dropout: Dropout = 0.0) -> nn.Module:
    return CNN(input_shape, num_classes, channels, dropout)


def _hf(input_shape: Sequence[int], num_classes: int, path: str,
        task: Literal["classification", "encoder"] = "classification",
        trust_remote_code: StrictBool = False) -> nn.Module:
    """A transformers model from a local folder; ``trust_remote_code`` (off by default) lets
    the folder's own Python code run (see :mod:`kdistill.models.hf`)."""
    return load_hf_model(path, task=task, num_labels=num_classes,  # type: ignore[arg-type]
                         trust_remote_code=trust_remote_code)


def _hf_files(options: Mapping[str, Any], where: str) -> list[str]:
    return folder_problems(options["path"], options.get("trust_remote_code", False), where)


def _tagger(input_shape: Sequence[int], num_classes: int, vocab_size: Width = 100,
            embed_dim: Width = 32, hidden: Width = 32,
            encoder: Literal["lstm", "conv"] = "lstm", layers: Width = 1,
            kernel_size: Width = 3, dropout: Dropout = 0.0) -> nn.Module:
    return Tagger(input_shape, num_classes, vocab_size, embed_dim, hidden, encoder, layers,
                  kernel_size, dropout)


def build_oracle(input_shape: Sequence[int], num_classes: int, base: str = "cnn",
                 base_size: str | None = "small", base_options: dict[str, Any] | None = None,
                 target: str = "head", label_dropout: LabelDropout = 0.5) -> nn.Module:
    """A registered model (``base``, ``base_size``, ``base_options``) wrapped in
    :class:`LabelConditioned`: the model builder behind an ``oracle`` model in configs."""
    if base == "oracle":
        raise ValueError("oracle: base must be another model than 'oracle'")
    model = build_model(base, input_shape, num_classes, size=base_size, **(base_options or {}))
    return LabelConditioned(model, num_classes, target=target, label_dropout=label_dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": _mlp, "cnn": _cnn, "hf": _hf,
                                               "tagger": _tagger, "oracle": build_oracle,
                                               "hf_text": build_hf_text,
                                               "hf_student": build_hf_student}

# Checks of the files a model's options name, run by config validation before anything is
# built: (validated options, dotted path of the options) -> problems, each naming its field.
MODEL_FILE_CHECKS: dict[str, Callable[[Mapping[str, Any], str], list[str]]] = {
    "hf": _hf_files, "hf_text": hf_text_files, "hf_student": hf_student_files}


def model_options(name: str, size: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """A preset's options (if ``size`` is given) updated with explicit ``options``."""
    if name not in MODELS:
        raise ValueError(unknown_name("model", name, MODELS))
    presets = MODEL_SIZES.get(name, {})
    if size is not None and size not in presets:
        raise ValueError(unknown_name(f"{name} size", size, presets))
    return {**(presets.get(size, {}) if size else {}), **options}


def build_model(name: str, input_shape: Sequence[int], num_classes: int, size: str | None = None,
                **options: Any) -> nn.Module:
    """Build a registered model for data of ``input_shape`` with ``num_classes`` classes."""
    return MODELS[name](input_shape, num_classes, **model_options(name, size, options))
