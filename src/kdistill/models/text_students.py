"""Text students of other architectures than the teacher's: each reads raw text through its
own word tokenisation (:mod:`kdistill.models.vocabulary`), so logit-level distillation works
from any teacher.

:func:`build_text_student` makes one from the training texts (its vocabulary comes from
them), :func:`build_static_student` the static sentence encoder; :func:`save_text_student`
and :func:`load_text_student` write and rebuild either without them. A saved student is a
folder of ``student.json`` (architecture and network arguments), ``weights.safetensors``,
``encoder.json`` and ``vocabulary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from kdistill.batch import Task
from kdistill.checkpoint import atomic_save_tensors, atomic_write_text
from kdistill.models.sentence import Pooling
from kdistill.models.teacher_embeddings import (
    fit_width,
    teacher_output_vectors,
    teacher_word_vectors,
)
from kdistill.models.text import TextModel
from kdistill.models.text_encoders import (
    NGramEncoder,
    TextStudentEncoder,
    WordEncoder,
    load_encoder,
)
from kdistill.models.text_networks import NETWORKS, StaticEmbeddingNet
from kdistill.models.vocabulary import (
    PAD_ID,
    RESERVED,
    NGramHasher,
    TextStudentFileError,
    Vocabulary,
    read_json,
)
from kdistill.names import unknown_name

STUDENT_FILE = "student.json"
WEIGHTS_FILE = "weights.safetensors"
SENTENCE_LEVEL = ("ngram", "cmow")  # one vector per text: no per-word outputs
WORD_EMBEDDINGS = ("bilstm", "textcnn")  # an ``embedding`` of the vocabulary: init_from
TeacherVectors = Literal["input", "output"]  # teacher_word_vectors, teacher_output_vectors


def build_text_student(architecture: str, num_classes: int, corpus: Sequence[str] | None,
                       task: Task, *, max_vocab: int, min_count: int,
                       max_length: int = 512, init_from: str | None = None,
                       ngrams: Sequence[int] = (1, 2, 3), buckets: int = 1 << 16,
                       **arguments: Any) -> TextModel:
    """A :class:`TextModel` of the network ``architecture`` (:data:`NETWORKS`) with a
    vocabulary of at most ``max_vocab`` tokens seen ``min_count`` times in ``corpus``.

    ``arguments`` are the network's own (sizes, dropout); the n-gram student also takes
    ``ngrams`` and ``buckets`` (:class:`NGramHasher`), the word students ``max_length``, and
    ``bilstm``/``textcnn`` ``init_from`` (:mod:`kdistill.models.teacher_embeddings`).
    ``task`` ``token_classification`` gives per-word logits; ``ngram`` and ``cmow`` are
    sentence-level and refuse it.
    """
    if corpus is None:
        raise ValueError(f"model '{architecture}' builds its vocabulary from the training "
                         "texts: pass corpus=<the training texts> to build_model")
    if task == "token_classification" and architecture in SENTENCE_LEVEL:
        raise ValueError(f"model '{architecture}' is sentence-level (one vector per text) and "
                         "cannot tag words (task token_classification); use 'bilstm' or "
                         "'textcnn'")
    if init_from is not None and architecture not in WORD_EMBEDDINGS:
        raise ValueError(f"model '{architecture}': init_from sets word embeddings, which only "
                         f"{' and '.join(WORD_EMBEDDINGS)} have")
    vocabulary = Vocabulary.build(corpus, max_size=max_vocab, min_count=min_count)
    encoder: TextStudentEncoder
    if architecture == "ngram":
        encoder = NGramEncoder(NGramHasher(vocabulary, ngrams, buckets))
        network = NETWORKS[architecture](encoder.hasher.rows, num_classes, **arguments)
    else:
        encoder = WordEncoder(vocabulary, max_length,
                              word_lists=architecture not in SENTENCE_LEVEL)
        if architecture not in SENTENCE_LEVEL:
            arguments["token_level"] = task == "token_classification"
        network = NETWORKS[architecture](len(vocabulary), num_classes, **arguments)
    if init_from is not None:
        init_word_embeddings(network.embedding, vocabulary, Path(init_from))
    return TextModel(encoder, network)


def build_static_student(corpus: Sequence[str] | None, task: Task, *, max_vocab: int,
                         min_count: int, ngrams: Sequence[int] = (1,), buckets: int = 0,
                         embed_dim: int = 256, normalize: bool = True,
                         init_from: str | None = None, init_vectors: TeacherVectors = "output",
                         init_pooling: Pooling = "mean") -> TextModel:
    """The static sentence encoder (:class:`~kdistill.models.text_networks.StaticEmbeddingNet`):
    the words of ``corpus`` (at most ``max_vocab`` seen ``min_count`` times) and its
    ``ngrams`` longer than 1 hashed into ``buckets`` (:class:`NGramHasher`), one ``embed_dim``
    vector each. By default words alone: in a trial on 3,000 review snippets, hashed bigrams
    lowered the held-out agreement with the teacher (docs/embeddings.md).

    With ``init_from`` (a teacher folder) the word rows start as the teacher's vectors of the
    words (:mod:`kdistill.models.teacher_embeddings`: ``output``, each word's sentence
    embedding under ``init_pooling``, or ``input``, its word pieces' input embeddings),
    projected by PCA when ``embed_dim`` is narrower; the n-gram rows then start at zero, so
    the first embedding of a text is the mean of its words' vectors. Sentence-level: ``task``
    ``token_classification`` is refused.
    """
    if corpus is None:
        raise ValueError("model 'static' builds its vocabulary from the training texts: pass "
                         "corpus=<the training texts> to build_model")
    if task == "token_classification":
        raise ValueError("model 'static' gives one embedding per text and cannot tag words "
                         "(task token_classification)")
    vocabulary = Vocabulary.build(corpus, max_size=max_vocab, min_count=min_count)
    encoder = NGramEncoder(NGramHasher(vocabulary, ngrams, buckets))
    network = StaticEmbeddingNet(encoder.hasher.rows, embed_dim, normalize)
    if init_from is not None:
        folder = Path(init_from)
        vectors = (teacher_output_vectors(folder, vocabulary.words, init_pooling)
                   if init_vectors == "output" else
                   teacher_word_vectors(folder, vocabulary.words))
        rows = fit_width(vectors, embed_dim)
        # Reserved ids come first: padding (and, from outputs, every reserved token) is zero.
        rows[:len(RESERVED) if init_vectors == "output" else PAD_ID + 1] = 0.0
        with torch.no_grad():
            network.embedding.weight.zero_()
            network.embedding.weight[:len(vocabulary)] = rows
    return TextModel(encoder, network)


def init_word_embeddings(embedding: nn.Module, vocabulary: Vocabulary, folder: Path) -> None:
    """Set ``embedding.weight`` to the teacher's vectors of the vocabulary's words, fitted to
    its width (:func:`fit_width`); the padding row stays zero."""
    vectors = fit_width(teacher_word_vectors(folder, vocabulary.words),
                        embedding.weight.shape[1])
    vectors[PAD_ID] = 0.0
    with torch.no_grad():
        embedding.weight.copy_(vectors)


def save_text_student(model: TextModel, folder: str | Path) -> None:
    """Write ``model`` (built by :func:`build_text_student` or :func:`build_static_student`)
    into ``folder``: each file atomically, ``student.json`` last."""
    folder = Path(folder)
    names = {cls: name for name, cls in NETWORKS.items()}
    network = model.model
    if type(network) not in names or not isinstance(model.encoder, WordEncoder | NGramEncoder):
        raise TypeError(f"save_text_student saves the text students ({', '.join(NETWORKS)}), "
                        f"not a {type(network).__name__}")
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.save(folder)
    atomic_save_tensors(network.state_dict(), folder / WEIGHTS_FILE)
    atomic_write_text(folder / STUDENT_FILE,
                      json.dumps({"architecture": names[type(network)],
                                  "arguments": network.arguments}))


def load_text_student(folder: str | Path) -> TextModel:
    """Rebuild a text student written by :func:`save_text_student` (no training text
    needed); :class:`TextStudentFileError` names a missing or unusable file."""
    folder = Path(folder)
    path = folder / STUDENT_FILE
    spec = read_json(path, "text student")
    if not isinstance(spec, dict) or not isinstance(spec.get("arguments"), dict):
        raise TextStudentFileError(f"{path}: expected an object with 'architecture' and "
                                   "'arguments'")
    architecture = spec.get("architecture")
    if architecture not in NETWORKS:
        raise TextStudentFileError(f"{path}: "
                                   + unknown_name("architecture", str(architecture), NETWORKS))
    try:
        network = NETWORKS[architecture](**spec["arguments"])
    except (TypeError, ValueError) as error:
        raise TextStudentFileError(f"{path}: bad arguments for '{architecture}': {error}") \
            from None
    encoder = load_encoder(folder)
    rows = encoder.hasher.rows if isinstance(encoder, NGramEncoder) else len(encoder.vocabulary)
    table = spec["arguments"].get("rows", spec["arguments"].get("vocab_size"))
    if table != rows:
        raise TextStudentFileError(f"{path}: '{architecture}' has {table} embedding rows but "
                                   f"the saved encoder gives ids for {rows}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise TextStudentFileError(f"{weights} is missing: the folder holds no saved weights")
    try:
        network.load_state_dict(load_file(str(weights)))
    except Exception as error:  # safetensors and load_state_dict raise several types
        raise TextStudentFileError(f"{weights}: does not fit '{architecture}' as "
                                   f"{STUDENT_FILE} describes it: {error}") from None
    return TextModel(encoder, network)
