"""Word vectors for a student's vocabulary from a teacher (``init_from``).

From the teacher's **input** embeddings (:func:`teacher_word_vectors`): each vocabulary word
is tokenised by the teacher's own tokenizer (a local Hugging Face folder,
``local_files_only=True``) and gets the mean of its word pieces' rows of the teacher's input
embedding matrix (the ``...word_embeddings.weight`` tensor of the folder's safetensors files,
read without building the model). The reserved tokens take the teacher's unknown and
separator rows; padding stays zero.

From the teacher's **outputs** (:func:`teacher_output_vectors`, for the static sentence
encoder): each word read alone as a text by the teacher as a sentence encoder
(:mod:`kdistill.models.sentence`), its normalised sentence embedding, in the space of the
teacher's sentence embeddings (Model2Vec's starting point). The reserved tokens stay zero:
a zero row shortens the mean of a text's vectors without turning it.

A student as wide as the teacher takes the vectors as they are; a narrower one takes their
projection on the top principal components (exact SVD of the centred vectors, deterministic:
each component's sign is fixed so its largest coordinate is positive); a wider one is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from kdistill.errors import KdistillError
from kdistill.models.hf import load_tokenizer
from kdistill.models.hf_weights import read_word_embeddings
from kdistill.models.sentence import Pooling, load_embedder
from kdistill.models.vocabulary import PAD, RESERVED, SEPARATOR, UNKNOWN
from kdistill.taps import SENTENCE_EMBEDDING

OUTPUT_BATCH = 256  # words per teacher forward in teacher_output_vectors


def teacher_word_vectors(folder: Path, words: Sequence[str]) -> Tensor:
    """One row per word of ``words`` [len(words), teacher width]: the mean of its word
    pieces' teacher embeddings (see the module doc)."""
    try:
        matrix = read_word_embeddings(folder).float()
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError) as error:
        raise KdistillError(f"init_from: {error}") from None
    special = {PAD: None, UNKNOWN: tokenizer.unk_token_id, SEPARATOR: tokenizer.sep_token_id}
    pieces = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    vectors = torch.zeros(len(words), matrix.shape[1])
    for i, (word, ids) in enumerate(zip(words, pieces, strict=True)):
        if word in special:
            ids = [special[word]] if special[word] is not None else []
        if ids:
            vectors[i] = matrix[torch.tensor(ids)].mean(dim=0)
    return vectors


def teacher_output_vectors(folder: Path, words: Sequence[str],
                           pooling: Pooling = "mean") -> Tensor:
    """One row per word of ``words`` [len(words), teacher width]: the teacher's normalised
    sentence embedding of the word alone, ``pooling`` its last hidden states; zeros for the
    reserved tokens (see the module doc)."""
    try:
        teacher = load_embedder(folder, pooling, normalize=True)
    except (OSError, ValueError) as error:
        raise KdistillError(f"init_from: {error}") from None
    rows = [i for i, word in enumerate(words) if word not in RESERVED]
    vectors = torch.zeros(len(words), teacher.model.network.config.hidden_size)
    teacher.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), OUTPUT_BATCH):
            chunk = rows[start:start + OUTPUT_BATCH]
            vectors[chunk] = teacher([words[i] for i in chunk])[SENTENCE_EMBEDDING]
    return vectors


def fit_width(vectors: Tensor, width: int) -> Tensor:
    """``vectors`` [N, H] as they are when ``width == H``, else their coordinates on the top
    ``width`` principal components (see the module doc)."""
    rows, teacher_width = vectors.shape
    if width == teacher_width:
        return vectors
    if width > min(rows, teacher_width):
        raise KdistillError(f"init_from: embed_dim {width} exceeds what the teacher's vectors "
                            f"give (width {teacher_width}, {rows} words); use embed_dim "
                            f"{teacher_width} or at most {min(rows, teacher_width)}")
    centred = vectors - vectors.mean(dim=0)
    _, _, components = torch.linalg.svd(centred.double(), full_matrices=False)
    components = components[:width]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * largest.sign()
    return (centred.double() @ components.T).float()
