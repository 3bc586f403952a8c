"""Registered models: name -> builder, with named size presets.

Every builder takes the data's ``input_shape`` and ``num_classes`` plus its own options;
``size`` picks a preset and explicit options override it.

The build context: a builder that needs more of the data declares keyword-only parameters
named in :data:`CONTEXT_PARAMETERS`, and :func:`build_model` passes each of them to the
builders that declare it (and to no other):

* ``corpus`` (``Sequence[str]``): the training texts (word lists joined by spaces), for
  builders that make a vocabulary from them; a builder given none raises a ``ValueError``;
* ``task`` (``"classification"``, ``"regression"``, ``"token_classification"``, ``"ctc"``,
  ``"embedding"`` or ``"lm"``).

They are not options: a config cannot set them (:mod:`kdistill.config` leaves them out of
the options it validates, like ``input_shape`` and ``num_classes``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool
from torch import nn

from kdistill.batch import Task
from kdistill.models.cnn import CNN
from kdistill.models.ctc import CRNN, OracleCTC
from kdistill.models.hf import folder_problems, load_hf_model, tokenizer_problems
from kdistill.models.hf_student import build_hf_student, hf_student_files
from kdistill.models.hf_text import build_hf_text, hf_text_files
from kdistill.models.lm import build_hf_lm, build_lm_student, hf_lm_files, lm_student_files
from kdistill.models.mlp import MLP
from kdistill.models.oracle import LabelConditioned, LabelDropout
from kdistill.models.sentence import Pooling, build_hf_embedder
from kdistill.models.tagger import Tagger
from kdistill.models.text_students import TeacherVectors, build_static_student, build_text_student
from kdistill.models.vit import ViT
from kdistill.names import unknown_name

MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "mlp": {"tiny": {"hidden": [16]}, "small": {"hidden": [64]}, "base": {"hidden": [256, 256]}},
    "cnn": {"tiny": {"channels": [8, 16]}, "small": {"channels": [16, 32]},
            "base": {"channels": [32, 64, 128]}},
    "vit": {"tiny": {"dim": 32, "depth": 2, "heads": 2},
            "small": {"dim": 64, "depth": 4, "heads": 4},
            "base": {"dim": 128, "depth": 6, "heads": 4}},
    "tagger": {"tiny": {"embed_dim": 16, "hidden": 16}, "small": {"embed_dim": 32, "hidden": 32},
               "base": {"embed_dim": 64, "hidden": 64, "layers": 2}},
    "ngram": {"tiny": {"embed_dim": 16, "buckets": 1 << 10},
              "small": {"embed_dim": 64, "buckets": 1 << 16},
              "base": {"embed_dim": 128, "buckets": 1 << 18, "hidden": 128}},
    "bilstm": {"tiny": {"embed_dim": 16, "hidden": 16}, "small": {"embed_dim": 64, "hidden": 64},
               "base": {"embed_dim": 128, "hidden": 128, "layers": 2}},
    "textcnn": {"tiny": {"embed_dim": 16, "channels": 8},
                "small": {"embed_dim": 64, "channels": 32},
                "base": {"embed_dim": 128, "channels": 100}},
    "cmow": {"tiny": {"cbow_dim": 16, "matrix_dim": 4}, "small": {"cbow_dim": 64, "matrix_dim": 8},
             "base": {"cbow_dim": 400, "matrix_dim": 20}},
    "static": {"tiny": {"embed_dim": 16}, "small": {"embed_dim": 64}, "base": {"embed_dim": 256}},
    "crnn": {"tiny": {"channels": [8, 16], "dim": 16, "hidden": 16},
             "small": {"channels": [16, 32], "dim": 32, "hidden": 32},
             "base": {"channels": [32, 64], "dim": 64, "hidden": 64}},
    "oracle_ctc": {"tiny": {"channels": [8, 16], "dim": 16, "hidden": 16},
                   "small": {"channels": [16, 32], "dim": 32, "hidden": 32},
                   "base": {"channels": [32, 64], "dim": 64, "hidden": 64, "heads": 4}},
}
CONTEXT_PARAMETERS = ("corpus", "task")


# Option types with their limits: a config's model options are validated against these
# annotations (kdistill.config) before anything is built.
Width = Annotated[int, Field(ge=1)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]
Hidden = Annotated[int, Field(ge=0)]  # 0: no hidden layer
Buckets = Annotated[int, Field(ge=0)]  # 0: unigrams alone
VocabularySize = Annotated[int, Field(ge=4)]  # the 3 reserved tokens and at least one word


def _mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[Width],
         dropout: Dropout = 0.0) -> nn.Module:
    return MLP(input_shape, num_classes, hidden, dropout)


def _cnn(input_shape: Sequence[int], num_classes: int,
         channels: Annotated[Sequence[Width], Field(min_length=1)],
         dropout: Dropout = 0.0) -> nn.Module:
    return CNN(input_shape, num_classes, channels, dropout)


def _vit(input_shape: Sequence[int], num_classes: int, patch_size: Width = 4, dim: Width = 64,
         depth: Width = 4, heads: Width = 4, mlp_ratio: Width = 4, dropout: Dropout = 0.0,
         distillation_token: StrictBool = True) -> nn.Module:
    """A small vision transformer (:class:`~kdistill.models.vit.ViT`), by default with DeiT's
    distillation token and head beside the class token and head."""
    return ViT(input_shape, num_classes, patch_size, dim, depth, heads, mlp_ratio, dropout,
               distillation_token)


def _crnn(input_shape: Sequence[int], num_classes: int,
          channels: Annotated[Sequence[Width], Field(min_length=1)], dim: Width = 32,
          hidden: Width = 32, layers: Width = 1) -> nn.Module:
    """A CTC recogniser of line images (:class:`~kdistill.models.ctc.CRNN`), for ``ctc``
    data: per-frame logits, the blank last."""
    return CRNN(input_shape, num_classes, channels, dim, hidden, layers)


def _oracle_ctc(input_shape: Sequence[int], num_classes: int,
                channels: Annotated[Sequence[Width], Field(min_length=1)], dim: Width = 32,
                hidden: Width = 32, layers: Width = 1, heads: Width = 1) -> nn.Module:
    """The CTC oracle teacher (:class:`~kdistill.models.ctc.OracleCTC`): a ``crnn`` whose
    frames also attend over the target sequence."""
    return OracleCTC(input_shape, num_classes, channels, dim, hidden, layers, heads)


def _hf(input_shape: Sequence[int], num_classes: int, path: str,
        head: Literal["classification", "encoder"] = "classification",
        trust_remote_code: StrictBool = False) -> nn.Module:
    """A transformers model from a local folder, with a classification ``head`` or bare
    (``encoder``); ``trust_remote_code`` (off by default) lets the folder's own Python code
    run (see :mod:`kdistill.models.hf`)."""
    return load_hf_model(path, task=head, num_labels=num_classes,  # type: ignore[arg-type]
                         trust_remote_code=trust_remote_code)


def _hf_files(options: Mapping[str, Any], where: str) -> list[str]:
    return folder_problems(options["path"], options.get("trust_remote_code", False), where)


def _tagger(input_shape: Sequence[int], num_classes: int, vocab_size: Width = 100,
            embed_dim: Width = 32, hidden: Width = 32,
            encoder: Literal["lstm", "conv"] = "lstm", layers: Width = 1,
            kernel_size: Width = 3, dropout: Dropout = 0.0) -> nn.Module:
    return Tagger(input_shape, num_classes, vocab_size, embed_dim, hidden, encoder, layers,
                  kernel_size, dropout)


# -- text students (kdistill.models.text_students): vocabulary from the build context's corpus
NGramLengths = Annotated[Sequence[Annotated[int, Field(ge=1, le=6)]], Field(min_length=1)]


def _ngram(input_shape: Sequence[int], num_classes: int, embed_dim: Width = 64,
           buckets: Width = 1 << 16, ngrams: NGramLengths = (1, 2, 3), hidden: Hidden = 0,
           dropout: Dropout = 0.0, max_vocab: VocabularySize = 50_000, min_count: Width = 1, *,
           corpus: Sequence[str] | None = None, task: Task = "classification") -> nn.Module:
    """The sparse n-gram averaging student (:class:`~kdistill.models.text_networks.NGramNet`):
    words of the vocabulary and ``ngrams`` hashed into ``buckets``. Sentence-level."""
    return build_text_student("ngram", num_classes, corpus, task, max_vocab=max_vocab,
                              min_count=min_count, ngrams=ngrams, buckets=buckets,
                              embed_dim=embed_dim, hidden=hidden, dropout=dropout)


def _bilstm(input_shape: Sequence[int], num_classes: int, embed_dim: Width = 64,
            hidden: Width = 64, layers: Width = 1, dropout: Dropout = 0.0,
            max_vocab: VocabularySize = 50_000, min_count: Width = 1, max_length: Width = 512,
            init_from: str | None = None, *, corpus: Sequence[str] | None = None,
            task: Task = "classification") -> nn.Module:
    """A BiLSTM student (:class:`~kdistill.models.text_networks.BiLSTMNet`), its word
    embeddings optionally from the teacher folder ``init_from``."""
    return build_text_student("bilstm", num_classes, corpus, task, max_vocab=max_vocab,
                              min_count=min_count, max_length=max_length, init_from=init_from,
                              embed_dim=embed_dim, hidden=hidden, layers=layers,
                              dropout=dropout)


def _textcnn(input_shape: Sequence[int], num_classes: int, embed_dim: Width = 64,
             channels: Width = 32,
             widths: Annotated[Sequence[Width], Field(min_length=1)] = (3, 4, 5),
             dropout: Dropout = 0.0, max_vocab: VocabularySize = 50_000, min_count: Width = 1,
             max_length: Width = 512, init_from: str | None = None, *,
             corpus: Sequence[str] | None = None, task: Task = "classification") -> nn.Module:
    """Kim's CNN student (:class:`~kdistill.models.text_networks.TextCNNNet`), its word
    embeddings optionally from the teacher folder ``init_from``."""
    return build_text_student("textcnn", num_classes, corpus, task, max_vocab=max_vocab,
                              min_count=min_count, max_length=max_length, init_from=init_from,
                              embed_dim=embed_dim, channels=channels, widths=widths,
                              dropout=dropout)


def _cmow(input_shape: Sequence[int], num_classes: int, cbow_dim: Width = 64,
          matrix_dim: Width = 8, hidden: Hidden = 0, dropout: Dropout = 0.0,
          max_vocab: VocabularySize = 50_000, min_count: Width = 1, max_length: Width = 512, *,
          corpus: Sequence[str] | None = None, task: Task = "classification") -> nn.Module:
    """The hybrid CBOW/CMOW student (:class:`~kdistill.models.text_networks.CMOWNet`).
    Sentence-level."""
    return build_text_student("cmow", num_classes, corpus, task, max_vocab=max_vocab,
                              min_count=min_count, max_length=max_length, cbow_dim=cbow_dim,
                              matrix_dim=matrix_dim, hidden=hidden, dropout=dropout)


def _static(input_shape: Sequence[int], num_classes: int, embed_dim: Width = 256,
            ngrams: NGramLengths = (1,), buckets: Buckets = 0, normalize: StrictBool = True,
            max_vocab: VocabularySize = 50_000, min_count: Width = 1,
            init_from: str | None = None, init_vectors: TeacherVectors = "output",
            init_pooling: Pooling = "mean", *, corpus: Sequence[str] | None = None,
            task: Task = "embedding") -> nn.Module:
    """The static sentence encoder (:class:`~kdistill.models.text_networks.StaticEmbeddingNet`):
    one vector per word (and per hashed n-gram of ``ngrams`` longer than 1, in ``buckets``
    buckets), averaged; its word vectors optionally from the teacher folder ``init_from``
    (:func:`~kdistill.models.text_students.build_static_student`). ``num_classes`` is
    unused."""
    return build_static_student(corpus, task, max_vocab=max_vocab, min_count=min_count,
                                ngrams=ngrams, buckets=buckets, embed_dim=embed_dim,
                                normalize=normalize, init_from=init_from,
                                init_vectors=init_vectors, init_pooling=init_pooling)


def _init_from_files(options: Mapping[str, Any], where: str) -> list[str]:
    folder = options.get("init_from")
    if folder is None:
        return []
    return (folder_problems(folder, where=where, field="init_from")
            or tokenizer_problems(folder, where=where, field="init_from"))


def build_oracle(input_shape: Sequence[int], num_classes: int, base: str = "cnn",
                 base_size: str | None = "small", base_options: dict[str, Any] | None = None,
                 target: str = "head", label_dropout: LabelDropout = 0.5, *,
                 corpus: Sequence[str] | None = None,
                 task: Task = "classification") -> nn.Module:
    """A registered model (``base``, ``base_size``, ``base_options``) wrapped in
    :class:`LabelConditioned`: the model builder behind an ``oracle`` model in configs. The
    build context goes on to ``base``."""
    if base == "oracle":
        raise ValueError("oracle: base must be another model than 'oracle'")
    model = build_model(base, input_shape, num_classes, size=base_size, corpus=corpus,
                        task=task, **(base_options or {}))
    return LabelConditioned(model, num_classes, target=target, label_dropout=label_dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp, "cnn": _cnn, "vit": _vit, "hf": _hf, "tagger": _tagger, "oracle": build_oracle,
    "crnn": _crnn, "oracle_ctc": _oracle_ctc,
    "ngram": _ngram, "bilstm": _bilstm, "textcnn": _textcnn, "cmow": _cmow,
    "static": _static, "hf_text": build_hf_text, "hf_student": build_hf_student,
    "hf_embedder": build_hf_embedder, "hf_lm": build_hf_lm, "lm_student": build_lm_student}

# Models whose weights come from the folder their options name: a fine-tuned one is a trained
# teacher as it is (no teacher.train or teacher.checkpoint needed).
FOLDER_CLASSIFIERS = ("hf", "hf_text")

# Checks of the files a model's options name, run by config validation before anything is
# built: (validated options, dotted path of the options) -> problems, each naming its field.
MODEL_FILE_CHECKS: dict[str, Callable[[Mapping[str, Any], str], list[str]]] = {
    "hf": _hf_files, "bilstm": _init_from_files, "textcnn": _init_from_files,
    "static": _init_from_files, "hf_text": hf_text_files, "hf_student": hf_student_files,
    "hf_embedder": hf_text_files, "hf_lm": hf_lm_files, "lm_student": lm_student_files}


def model_options(name: str, size: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """A preset's options (if ``size`` is given) updated with explicit ``options``."""
    if name not in MODELS:
        raise ValueError(unknown_name("model", name, MODELS))
    presets = MODEL_SIZES.get(name, {})
    if size is not None and size not in presets:
        raise ValueError(unknown_name(f"{name} size", size, presets))
    return {**(presets.get(size, {}) if size else {}), **options}


def context_parameters(name: str) -> list[str]:
    """The build-context parameters (:data:`CONTEXT_PARAMETERS`) the builder ``name``
    declares."""
    declared = inspect.signature(MODELS[name]).parameters
    return [p for p in CONTEXT_PARAMETERS if p in declared]


def build_model(name: str, input_shape: Sequence[int], num_classes: int, size: str | None = None,
                *, corpus: Sequence[str] | None = None, task: Task = "classification",
                **options: Any) -> nn.Module:
    """Build a registered model for data of ``input_shape`` with ``num_classes`` classes;
    ``corpus`` and ``task`` (the build context, see the module doc) reach only the builders
    that declare them."""
    options = model_options(name, size, options)
    context = {"corpus": corpus, "task": task}
    return MODELS[name](input_shape, num_classes,
                        **{p: context[p] for p in context_parameters(name)}, **options)
