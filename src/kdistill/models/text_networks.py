"""The networks of the text students, fed by :mod:`kdistill.models.text_encoders`.

Each network keeps the keyword arguments that rebuild it in ``arguments`` (saved by
:func:`~kdistill.models.text_students.save_text_student`). Sentence-level networks return
logits [B, C]; with ``token_level`` the word networks return logits per token [B, T, C],
which :class:`~kdistill.models.text.TextModel` reduces to one row per word. The static
sentence encoder returns a sentence embedding [B, D] instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.models.tagger import BiLSTM
from kdistill.models.vocabulary import PAD_ID
from kdistill.taps import SENTENCE_EMBEDDING


def classifier_head(width: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout and a linear layer, or with ``hidden`` > 0 an MLP with one ReLU hidden layer."""
    if not hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(width, hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Max over dimension 1 of ``values`` [B, T, H] at the positions ``mask`` [B, T] keeps;
    zeros for a row without any."""
    keep = mask.bool().unsqueeze(-1)
    pooled = values.masked_fill(~keep, float("-inf")).amax(dim=1)
    return torch.where(keep.any(dim=1), pooled, torch.zeros_like(pooled))


class NGramNet(nn.Module):
    """The sparse n-gram averaging network (fastText, Joulin et al. 2017; the students of
    Ye et al. 2022, "Sparse Distillation: Speeding Up Text Classification by Using Bigger
    Student Models"): the mean of the embeddings of a text's n-gram ids,
    ``h = (1/|G|) sum_{g in G} E[g]``, then :func:`classifier_head`.

    ``E`` is an ``nn.EmbeddingBag`` with sparse gradients: a step touches only the rows of
    the batch's n-grams, so the table can be very large (the engine's optimizer gives it
    SparseAdam). It is initialised uniformly in +-1/``embed_dim`` as fastText does. Takes
    ``ids`` and ``offsets`` (:class:`~kdistill.models.text_encoders.NGramEncoder`).
    """

    def __init__(self, rows: int, num_classes: int, embed_dim: int, hidden: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.arguments = {"rows": rows, "num_classes": num_classes, "embed_dim": embed_dim,
                       "hidden": hidden, "dropout": dropout}
        self.embedding = nn.EmbeddingBag(rows, embed_dim, mode="mean", sparse=True)
        nn.init.uniform_(self.embedding.weight, -1.0 / embed_dim, 1.0 / embed_dim)
        self.head = classifier_head(embed_dim, hidden, num_classes, dropout)

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        return self.head(self.embedding(ids, offsets))


class BiLSTMNet(nn.Module):
    """Word embeddings and a bidirectional LSTM (:class:`~kdistill.models.tagger.BiLSTM`,
    run on each text's real tokens only), then :func:`classifier_head`.

    A sentence is the max over its tokens of the BiLSTM outputs (max pooling, as InferSent,
    Conneau et al. 2017); with ``token_level`` every token's output gets its row of logits.
    Takes ``input_ids`` and ``attention_mask``.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int, hidden: int,
                 layers: int = 1, dropout: float = 0.0, token_level: bool = False):
        super().__init__()
        self.arguments = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "embed_dim": embed_dim, "hidden": hidden, "layers": layers,
                       "dropout": dropout, "token_level": token_level}
        self.token_level = token_level
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.encoder = BiLSTM(embed_dim, hidden, layers)
        self.head = classifier_head(self.encoder.width, 0, num_classes, dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        states = self.encoder(self.embedding(input_ids), attention_mask)
        return self.head(states if self.token_level else masked_max(states, attention_mask))


class TextCNNNet(nn.Module):
    """Kim (2014), "Convolutional Neural Networks for Sentence Classification": parallel 1-D
    convolutions of several ``widths`` over the word embeddings, ReLU, max-over-time pooling,
    concatenation, then :func:`classifier_head`.

    A sentence pools over the windows that lie within its tokens (a text shorter than a width
    gets one window, zero-padded as in the paper), so the result does not depend on the
    batch's padding. With ``token_level`` each convolution is centred on every token (zero
    padding at both ends, one more on the right for even widths) and the token's features
    are the concatenated, ReLU'd responses. Takes ``input_ids`` and ``attention_mask``.
    """

    def __init__(self, vocab_size: int, num_classes: int, embed_dim: int, channels: int,
                 widths: Sequence[int] = (3, 4, 5), dropout: float = 0.0,
                 token_level: bool = False):
        super().__init__()
        widths = [int(w) for w in widths]
        self.arguments = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "embed_dim": embed_dim, "channels": channels, "widths": widths,
                       "dropout": dropout, "token_level": token_level}
        self.token_level = token_level
        self.widths = widths
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, channels, w) for w in widths)
        self.head = classifier_head(channels * len(widths), 0, num_classes, dropout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embedding(input_ids).transpose(1, 2)  # [B, E, T]; padding embeds to zero
        if self.token_level:
            features = [torch.relu(conv(F.pad(x, ((w - 1) // 2, w // 2))))
                        for w, conv in zip(self.widths, self.convs, strict=True)]
            return self.head(torch.cat(features, dim=1).transpose(1, 2))
        x = F.pad(x, (0, max(0, max(self.widths) - x.shape[2])))
        lengths = attention_mask.sum(dim=1, keepdim=True)
        pooled = []
        for w, conv in zip(self.widths, self.convs, strict=True):
            h = torch.relu(conv(x)).transpose(1, 2)  # [B, windows, channels]
            windows = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            pooled.append(masked_max(h, windows < (lengths - w + 1).clamp_min(1)))
        return self.head(torch.cat(pooled, dim=1))


def ordered_product(matrices: Tensor) -> Tensor:
    """``M_1 M_2 ... M_T`` for ``matrices`` [B, T, d, d] (identity for T = 0): adjacent pairs
    are multiplied level by level, ``log2 T`` batched products in all."""
    while matrices.shape[1] > 1:
        if matrices.shape[1] % 2:
            eye = torch.eye(matrices.shape[-1], device=matrices.device, dtype=matrices.dtype)
            matrices = torch.cat([matrices, eye.expand(matrices.shape[0], 1, -1, -1)], dim=1)
        matrices = matrices[:, 0::2] @ matrices[:, 1::2]
    if matrices.shape[1] == 0:
        eye = torch.eye(matrices.shape[-1], device=matrices.device, dtype=matrices.dtype)
        return eye.expand(matrices.shape[0], -1, -1)
    return matrices[:, 0]


class CMOWNet(nn.Module):
    """The hybrid CBOW/CMOW sentence encoder of Mai et al. (2019), "CBOW Is Not All You Need:
    Combining CBOW with the Compositional Matrix Space Model", then :func:`classifier_head`.

    Each word w has a vector ``v_w`` (``cbow_dim``) and a matrix ``M_w`` (``matrix_dim`` x
    ``matrix_dim``). A sentence w_1..w_T is ``[ (1/T) sum_t v_{w_t} ; vec(M_{w_1} M_{w_2} ...
    M_{w_T}) ]``: the CBOW part averaged (the paper sums; the mean keeps its scale
    independent of the length), the CMOW part the ordered product, so word order matters.
    The matrices start near the identity, ``M_w = I + N(0, 0.1^2)`` elementwise, the
    initialisation the paper proposes so that long products neither vanish nor explode.
    Padding is the identity (the pad word's matrix is never used). Takes ``input_ids`` and
    ``attention_mask``.
    """

    def __init__(self, vocab_size: int, num_classes: int, cbow_dim: int, matrix_dim: int,
                 hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.arguments = {"vocab_size": vocab_size, "num_classes": num_classes,
                       "cbow_dim": cbow_dim, "matrix_dim": matrix_dim, "hidden": hidden,
                       "dropout": dropout}
        self.matrix_dim = matrix_dim
        self.vectors = nn.Embedding(vocab_size, cbow_dim, padding_idx=PAD_ID)
        self.matrices = nn.Embedding(vocab_size, matrix_dim * matrix_dim)
        with torch.no_grad():
            nn.init.normal_(self.matrices.weight, std=0.1)
            self.matrices.weight += torch.eye(matrix_dim).flatten()
        self.head = classifier_head(cbow_dim + matrix_dim * matrix_dim, hidden, num_classes,
                                    dropout)

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The CBOW part [B, cbow_dim] and the CMOW product [B, d, d] of each text."""
        keep = attention_mask.bool()
        counts = keep.sum(dim=1, keepdim=True).clamp_min(1)
        cbow = (self.vectors(input_ids) * keep.unsqueeze(-1)).sum(dim=1) / counts
        d = self.matrix_dim
        matrices = self.matrices(input_ids).view(*input_ids.shape, d, d)
        eye = torch.eye(d, device=matrices.device, dtype=matrices.dtype)
        matrices = torch.where(keep[..., None, None], matrices, eye)
        return cbow, ordered_product(matrices)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        cbow, product = self.embed(input_ids, attention_mask)
        return self.head(torch.cat([cbow, product.flatten(1)], dim=1))


class StaticEmbeddingNet(nn.Module):
    """A static sentence encoder: one vector per vocabulary word and hashed n-gram, averaged,
    ``e = (1/|G|) sum_{g in G} E[g]``, then L2-normalised unless ``normalize`` is false; the
    output is ``{"sentence_embedding": e}`` (:mod:`kdistill.models.sentence`).

    The bag of :class:`NGramNet` without a head: a text costs one table look-up per n-gram,
    no matrix product. Model2Vec (Tulkens & van Dongen 2024) also keeps one vector per token
    but makes them from the teacher's outputs without training; this one is trained by
    distillation (``embedding_kd``, ``ckd``) and may start from the teacher's vectors
    (``init_from``, :func:`~kdistill.models.text_students.build_static_student`). Sparse
    gradients and initialisation as :class:`NGramNet`. Takes ``ids`` and ``offsets``.
    """

    def __init__(self, rows: int, embed_dim: int, normalize: bool = True):
        super().__init__()
        self.arguments = {"rows": rows, "embed_dim": embed_dim, "normalize": normalize}
        self.normalize = normalize
        self.embedding = nn.EmbeddingBag(rows, embed_dim, mode="mean", sparse=True)
        nn.init.uniform_(self.embedding.weight, -1.0 / embed_dim, 1.0 / embed_dim)

    def forward(self, ids: Tensor, offsets: Tensor) -> dict[str, Tensor]:
        embedding = self.embedding(ids, offsets)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return {SENTENCE_EMBEDDING: embedding}


NETWORKS: dict[str, type[nn.Module]] = {"ngram": NGramNet, "bilstm": BiLSTMNet,
                                        "textcnn": TextCNNNet, "cmow": CMOWNet,
                                        "static": StaticEmbeddingNet}

