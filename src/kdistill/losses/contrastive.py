"""Contrastive losses on embeddings.

The memory of past keys (a FIFO queue), the projection head and the learnable scale are
trainable or stateful parts of a method and live in its recipe (``ckd``); these functions take
tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import _as_float, _shape

__all__ = ["info_nce"]


def info_nce(query: Tensor, keys: Tensor, scale: Tensor | float,
             exclude: Tensor | None = None) -> Tensor:
    """InfoNCE of each query against its own key among all the keys.

    With ``B`` queries ``q_i`` and ``K >= B`` keys ``k_j`` where ``k_i`` is the positive of
    ``q_i`` and every other key a negative, both L2-normalised here
    (``q^ = q / max(|q|, 1e-12)``), and the logit scale ``s`` (an inverse temperature)::

        L = -(1/B) sum_i log( exp(s q^_i . k^_i) / sum_{j in J_i} exp(s q^_i . k^_j) )

    where ``J_i`` holds every key except those ``exclude[i]`` marks (the positive is never
    excluded). van den Oord, Li & Vinyals (2018), "Representation Learning with Contrastive
    Predictive Coding"; used for distillation with the teacher's embeddings as keys by CKD,
    Gao, Wu, Wang, Wang, Zang, Wang & Hu (2021), "DistilCSE: Effective Knowledge Distillation
    For Contrastive Sentence Embeddings" (keys: the teacher's embeddings of the batch, then a
    queue of earlier batches' as in MoCo, He et al. 2020).

    Args:
        query: [B, D] (the student's, projected to the keys' width).
        keys: [K, D], the first B the positives of the B queries, in order.
        scale: the logit scale ``s`` > 0, a number or a scalar tensor (learnable).
        exclude: optional [B, K] bool, True for keys left out of row i's denominator.

    Reduction: mean over the B queries.
    """
    if query.dim() != 2 or keys.dim() != 2 or keys.shape[1] != query.shape[1] \
            or keys.shape[0] < query.shape[0]:
        raise ValueError(f"info_nce: expected query [B, D] and keys [K >= B, D], got query "
                         f"{_shape(query)} and keys {_shape(keys)}")
    rows = query.shape[0]
    positives = torch.arange(rows, device=query.device)
    logits = scale * (F.normalize(_as_float(query), dim=-1)
                      @ F.normalize(_as_float(keys), dim=-1).T)
    if exclude is not None:
        if exclude.shape != logits.shape:
            raise ValueError(f"info_nce: exclude must be [B, K] = {tuple(logits.shape)}, got "
                             f"{_shape(exclude)}")
        exclude = exclude.bool().clone()
        exclude[positives, positives] = False
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, positives)
