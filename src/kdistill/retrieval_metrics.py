"""How well a bi-encoder retrieves: ranking metrics of query and passage embeddings.

Each of Q queries ranks the P passages of the collection by the dot product of its embedding
with theirs (for L2-normalised embeddings, the cosine similarity), best first; ``rank(q, p)``
is 1 for the top passage. ``R(q)`` is the set of passages relevant to q; ``top_k(q)`` its k
best-ranked passages.

* ``mrr10``: the mean over queries of ``1 / rank`` of the best-ranked relevant passage when it
  is in the top 10, else 0 (MRR@10, MS MARCO's measure);
* ``recall10`` / ``recall100``: the mean of ``|R(q) ∩ top_k(q)| / |R(q)|``;
* ``ndcg10``: the mean of ``DCG@10 / IDCG@10`` with binary gains, ``DCG@10 = sum over the top
  10 of rel / log2(rank + 1)`` and ``IDCG@10`` its value when the ``min(|R(q)|, 10)`` relevant
  passages come first;
* ``teacher_overlap10``: given the teacher's embeddings of the same texts, the mean of
  ``|top_10(q) ∩ top_10_teacher(q)| / 10``, how much of the teacher's ranking the model keeps.

Relevance is the data's labels, or without labels the teacher's own top 10
(:func:`retrieval_metrics` with ``relevant`` None): then ``recall10`` equals
``teacher_overlap10`` and the teacher itself scores 1 on every metric.
A query without any relevant passage counts nowhere (NaN when no query has one).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdistill.batch import UNLABELED

RETRIEVAL_KEYS = ("mrr10", "recall10", "recall100", "ndcg10", "teacher_overlap10")
TOP = 10


def rankings(queries: Tensor, passages: Tensor, k: int) -> Tensor:
    """Each query's ``k`` best passages by dot product, best first: [Q, k] passage numbers
    (ties to the lower number); ``k`` is capped at the number of passages."""
    if queries.dim() != 2 or passages.dim() != 2 or queries.shape[1] != passages.shape[1]:
        raise ValueError(f"expected query embeddings [Q, D] and passage embeddings [P, D], got "
                         f"{tuple(queries.shape)} and {tuple(passages.shape)}")
    scores = queries.detach().double().cpu() @ passages.detach().double().cpu().T
    return torch.argsort(-scores, dim=1, stable=True)[:, :min(k, passages.shape[0])]


def relevance_matrix(relevant: Tensor, passages: int) -> Tensor:
    """[Q, P] booleans from each query's relevant passage numbers [Q, R] (padded with
    ``UNLABELED``)."""
    matrix = torch.zeros(relevant.shape[0], passages, dtype=torch.bool)
    rows, slots = torch.nonzero(relevant != UNLABELED, as_tuple=True)
    matrix[rows, relevant[rows, slots]] = True
    return matrix


def ranking_metrics(ranked: Tensor, relevance: Tensor) -> dict[str, float]:
    """``mrr10``, ``recall10``, ``recall100`` and ``ndcg10`` (see the module doc) of the
    rankings ``ranked`` [Q, K] (K >= 100 or every passage) against ``relevance`` [Q, P]."""
    known = relevance.any(dim=1)
    if not bool(known.any()):
        return {key: math.nan for key in RETRIEVAL_KEYS[:4]}
    hits = torch.gather(relevance, 1, ranked)[known].double()  # [Q', K], in rank order
    counts = relevance[known].sum(dim=1).double()
    top = hits[:, :TOP]
    ranks = torch.arange(1, TOP + 1, dtype=torch.float64)
    first = (top / ranks[:top.shape[1]]).max(dim=1).values  # 1/rank of the first hit, or 0
    discounts = 1.0 / torch.log2(ranks + 1)
    dcg = (top * discounts[:top.shape[1]]).sum(dim=1)
    ideal = torch.stack([discounts[:int(min(c, TOP))].sum() for c in counts])
    return {"mrr10": float(first.mean()),
            "recall10": float((top.sum(dim=1) / counts).mean()),
            "recall100": float((hits[:, :100].sum(dim=1) / counts).mean()),
            "ndcg10": float((dcg / ideal).mean())}


def retrieval_metrics(embeddings: Tensor, is_passage: Tensor, relevant: Tensor | None,
                      teacher_embeddings: Tensor | None = None) -> dict[str, float]:
    """The retrieval metrics (see the module doc) of ``embeddings`` [N, D], the rows of an
    evaluation set: queries and passages as ``is_passage`` [N] says, the passages numbered in
    row order. ``relevant`` [N, R]: each query row's relevant passage numbers (padded with
    ``UNLABELED``), or None to take the teacher's top 10 (then ``teacher_embeddings`` [N, D_t]
    of the same rows are needed; given, they also give ``teacher_overlap10``, which is left out
    without them)."""
    if embeddings.dim() != 2 or is_passage.shape != embeddings.shape[:1]:
        raise ValueError(f"expected embeddings [N, D] and a passage flag [N], got embeddings "
                         f"{tuple(embeddings.shape)} and flags {tuple(is_passage.shape)}")
    is_passage = is_passage.bool().cpu()
    queries, passages = embeddings[~is_passage], embeddings[is_passage]
    if not len(passages):
        raise ValueError("a retrieval evaluation needs passage rows to search")
    ranked = rankings(queries, passages, max(100, TOP))
    teacher_top = None
    if teacher_embeddings is not None:
        if teacher_embeddings.shape[0] != embeddings.shape[0]:
            raise ValueError(f"teacher embeddings of {teacher_embeddings.shape[0]} rows for "
                             f"{embeddings.shape[0]} rows")
        teacher_top = rankings(teacher_embeddings[~is_passage], teacher_embeddings[is_passage],
                               TOP)
    if relevant is None:
        if teacher_top is None:
            raise ValueError("retrieval data without relevance labels is scored against the "
                             "teacher's top 10, and no teacher embeddings were given")
        relevance = relevance_matrix(teacher_top, len(passages))
    else:
        relevance = relevance_matrix(relevant[~is_passage].long().cpu(), len(passages))
    metrics = ranking_metrics(ranked, relevance)
    if teacher_top is not None:
        shared = (ranked[:, :TOP].unsqueeze(2) == teacher_top.unsqueeze(1)).any(dim=2)
        metrics["teacher_overlap10"] = float(shared.sum(dim=1).double().mean()
                                             / teacher_top.shape[1])
    return metrics
