"""Relational losses: match how samples relate to each other, not the features themselves.

Each sample's features are flattened to one vector (``[B, ...] -> [B, D]``); student and
teacher may have different widths ``D`` (that is the point of these losses), but the batch size
must agree. A relation needs at least two samples (three for angles): with fewer, the loss is
undefined and these functions return a zero still attached to the student's graph, so a small
last batch does not crash a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import _as_float, _shape

__all__ = ["pkt", "rkd_angle", "rkd_distance"]


def _flat_pair(fn: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    for who, x in (("student", student), ("teacher", teacher)):
        if x.dim() < 1:
            raise ValueError(f"{fn}: {who} features need a batch dimension, got {_shape(x)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{fn}: student and teacher batch sizes must match, got student {_shape(student)} "
            f"and teacher {_shape(teacher)}"
        )
    return _rows_of(_as_float(student)), _rows_of(_as_float(teacher))


def _rows_of(x: Tensor) -> Tensor:
    """``[B, ...] -> [B, D]`` (``[B] -> [B, 1]``)."""
    return x.flatten(1) if x.dim() > 1 else x.unsqueeze(1)


def _distances(x: Tensor) -> Tensor:
    """Euclidean distances between rows of ``x [B, D]``, returned as ``[B, B]``.

    Rows are centred first (distances are translation invariant) to reduce cancellation in
    ``|a|^2 + |b|^2 - 2 a.b``; squared distances are clamped at 1e-12 before the square root so
    the gradient stays finite for coincident points.
    """
    x = x - x.mean(dim=0, keepdim=True)
    sq = x.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)
    return d2.clamp_min(1e-12).sqrt()


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss: match normalised pairwise distances of the batch.

    Equations (``f`` the flattened features, pairs ``i != j``)::

        psi_D(i, j) = ||f_i - f_j||_2 / mu,   mu = mean_{i != j} ||f_i - f_j||_2
        L           = mean_{i != j} huber(psi_D^s(i, j) - psi_D^t(i, j))

    with ``huber(x) = 0.5 x^2`` for ``|x| < 1`` and ``|x| - 0.5`` otherwise (smooth-L1). The
    paper weights this term by 25.

    Paper: W. Park, D. Kim, Y. Lu, M. Cho (2019), "Relational Knowledge Distillation".

    Reduction: mean over the ``B (B - 1)`` ordered off-diagonal pairs (the authors' code also
    averages in the zero diagonal, which only rescales the loss by ``(B - 1) / B``).
    """
    s, t = _flat_pair("rkd_distance", student, teacher)
    batch = s.shape[0]
    if batch < 2:
        return s.sum() * 0.0
    off = ~torch.eye(batch, dtype=torch.bool, device=s.device)
    d_s = _distances(s)[off]
    d_t = _distances(t)[off]
    d_s = d_s / d_s.mean().clamp_min(1e-12)
    d_t = d_t / d_t.mean().clamp_min(1e-12)
    return F.smooth_l1_loss(d_s, d_t, reduction="mean", beta=1.0)


def _triplet_cosines(x: Tensor) -> Tensor:
    """``cos[i, j, k]`` = cosine of the angle at anchor ``f_i`` between ``f_j`` and ``f_k``."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[i, j] = unit(f_j - f_i)
    return e @ e.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle loss: match the angles formed by every triplet of samples.

    Equations (``e_ij = (f_j - f_i) / ||f_j - f_i||_2``)::

        psi_A(i, j, k) = <e_ij, e_ik>        (cosine of the angle at f_i)
        L              = mean_{i, j, k distinct} huber(psi_A^s(i, j, k) - psi_A^t(i, j, k))

    with the smooth-L1 ``huber`` of :func:`rkd_distance`. Angles are invariant to translating
    and scaling the embedding. The paper weights this term by 50.

    Paper: W. Park, D. Kim, Y. Lu, M. Cho (2019), "Relational Knowledge Distillation".

    Reduction: mean over the ``B (B - 1) (B - 2)`` ordered triplets of distinct samples
    (degenerate triplets carry no angle; the authors' code keeps them as zeros in the mean).
    Memory is ``O(B^2 D)`` for the difference vectors plus ``O(B^3)`` for the angles.
    """
    s, t = _flat_pair("rkd_angle", student, teacher)
    batch = s.shape[0]
    if batch < 3:
        return s.sum() * 0.0
    eye = torch.eye(batch, dtype=torch.bool, device=s.device)
    same = eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0)  # i == j, i == k or j == k
    distinct = ~same
    a_s = _triplet_cosines(s)[distinct]
    a_t = _triplet_cosines(t)[distinct]
    return F.smooth_l1_loss(a_s, a_t, reduction="mean", beta=1.0)


def _conditional_similarities(x: Tensor, eps: float, exclude_self: bool) -> Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    sim = (x @ x.T + 1.0) / 2.0  # cosine similarity shifted to [0, 1]
    if exclude_self:
        sim = sim * (1.0 - torch.eye(x.shape[0], dtype=sim.dtype, device=sim.device))
    return sim / sim.sum(dim=1, keepdim=True).clamp_min(eps)


def pkt(student: Tensor, teacher: Tensor, eps: float = 1e-7, exclude_self: bool = False) -> Tensor:
    """Probabilistic knowledge transfer: match conditional similarity distributions.

    Equations (``f`` the flattened features, normalised to unit length)::

        K(i, j)   = (cos(f_i, f_j) + 1) / 2                 (cosine kernel in [0, 1])
        q(j | i)  = K(i, j) / sum_k K(i, k)
        L         = mean_i sum_j q_t(j|i) log((q_t(j|i) + eps) / (q_s(j|i) + eps))

    i.e. ``KL(teacher || student)`` of the conditional distributions, with ``eps`` guarding the
    logarithm and the normalisation.

    Paper: N. Passalis, A. Tefas (2018), "Learning Deep Representations with Probabilistic
    Knowledge Transfer".

    Reduction: KL summed over ``j``, averaged over the ``B`` anchors ``i`` (batchmean). The
    authors' code averages over all ``B^2`` pairs instead (this value / B). By default the sums
    include ``j = i`` (``K(i, i) = 1``), as in the authors' code; ``exclude_self=True`` drops
    the self-pairs, following the paper's ``k != j`` in the definition of the conditionals.
    """
    s, t = _flat_pair("pkt", student, teacher)
    if s.shape[0] < 2:
        return s.sum() * 0.0
    q_s = _conditional_similarities(s, eps, exclude_self)
    q_t = _conditional_similarities(t, eps, exclude_self)
    kl = q_t * torch.log((q_t + eps) / (q_s + eps))
    return kl.sum(dim=1).mean()
