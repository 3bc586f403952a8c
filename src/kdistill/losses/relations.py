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


_RKD_REDUCTIONS = ("mean", "distinct")
_PKT_REDUCTIONS = ("mean", "batchmean")


def _check_reduction(fn: str, reduction: str, valid: tuple[str, ...]) -> None:
    if reduction not in valid:
        raise ValueError(f"{fn}: reduction must be one of {valid}, got {reduction!r}")


def rkd_distance(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """RKD distance loss: match normalised pairwise distances of the batch.

    Equations (``f`` the flattened features, ``B`` the batch size)::

        d(i, j)     = ||f_i - f_j||_2                      (d(i, i) = 0)
        psi_D(i, j) = d(i, j) / mu,   mu = mean_{i != j} d(i, j)
        L           = 1/B^2 sum_{i, j} huber(psi_D^s(i, j) - psi_D^t(i, j))   (reduction="mean")

    with ``huber(x) = 0.5 x^2`` for ``|x| < 1`` and ``|x| - 0.5`` otherwise (smooth-L1).

    Paper: W. Park, D. Kim, Y. Lu, M. Cho (2019), "Relational Knowledge Distillation".

    Reduction (default ``"mean"``), as the authors' code computes it (lenscloth/RKD,
    ``metric/loss.py`` ``RkdDistance`` with ``metric/utils.py`` ``pdist``): ``pdist`` zeroes the
    diagonal, ``mu`` is the mean of the matrix's non-zero entries (the ``B (B - 1)`` pairs
    ``i != j``), and ``F.smooth_l1_loss(..., reduction='elementwise_mean')`` averages over the
    whole ``B x B`` matrix, the zero diagonal included (it adds nothing to the sum but counts in
    the ``B^2``). RepDistiller (``distiller_zoo/RKD.py``) and torchdistill (``RKDLoss``) compute
    the same. Published weight: **25** for classification (the authors'
    ``run_distill_classification.py`` default ``dist_ratio`` 25, RepDistiller's ``w_d``), 1 in
    the authors' metric-learning runs (``examples/*.sh``: ``--dist_ratio 1``).

    ``reduction="distinct"`` averages over the ``B (B - 1)`` ordered pairs ``i != j`` only,
    ``B / (B - 1)`` times the default; its scale does not depend on the batch size. Any other
    value raises ``ValueError``. With fewer than two samples the loss is a zero still attached
    to the graph (the authors' code gives NaN).
    """
    _check_reduction("rkd_distance", reduction, _RKD_REDUCTIONS)
    s, t = _flat_pair("rkd_distance", student, teacher)
    batch = s.shape[0]
    if batch < 2:
        return s.sum() * 0.0
    off = ~torch.eye(batch, dtype=torch.bool, device=s.device)
    d_s, d_t = _distances(s), _distances(t)
    d_s = d_s / d_s[off].mean().clamp_min(1e-12)
    d_t = d_t / d_t[off].mean().clamp_min(1e-12)
    per_pair = F.smooth_l1_loss(d_s, d_t, reduction="none", beta=1.0)
    if reduction == "mean":
        return per_pair.masked_fill(~off, 0.0).mean()
    return per_pair[off].mean()


def _triplet_cosines(x: Tensor) -> Tensor:
    """``cos[i, j, k]`` = cosine of the angle at anchor ``f_i`` between ``f_j`` and ``f_k``.

    ``F.normalize`` maps the zero vector ``f_i - f_i`` (and that of coincident points) to zero,
    so a triplet with ``j == i`` or ``k == i`` has cosine 0.
    """
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # e[i, j] = unit(f_j - f_i)
    return e @ e.transpose(1, 2)


def rkd_angle(student: Tensor, teacher: Tensor, reduction: str = "mean") -> Tensor:
    """RKD angle loss: match the angles formed by every triplet of samples.

    Equations (``e_ij = (f_j - f_i) / ||f_j - f_i||_2``, and ``e_ii = 0``)::

        psi_A(i, j, k) = <e_ij, e_ik>        (cosine of the angle at f_i)
        L              = 1/B^3 sum_{i, j, k} huber(psi_A^s(i, j, k) - psi_A^t(i, j, k))
                                                                        (reduction="mean")

    with the smooth-L1 ``huber`` of :func:`rkd_distance`. Angles are invariant to translating
    and scaling the embedding.

    Paper: W. Park, D. Kim, Y. Lu, M. Cho (2019), "Relational Knowledge Distillation".

    Reduction (default ``"mean"``), as the authors' code computes it (lenscloth/RKD,
    ``metric/loss.py`` ``RKdAngle``): the cosines of all ``B^3`` triplets
    (``bmm`` of the normalised difference vectors, ``.view(-1)``) go into
    ``F.smooth_l1_loss(..., reduction='elementwise_mean')``, degenerate triplets included:
    those with ``j == i`` or ``k == i`` have cosine 0 and those with ``j == k`` cosine 1 for
    student and teacher alike, so they add nothing to the sum but count in the ``B^3``.
    RepDistiller (``distiller_zoo/RKD.py``) and torchdistill (``RKDLoss``) compute the same.
    Published weight: **50** for classification (the authors' ``run_distill_classification.py``
    default ``angle_ratio`` 50, RepDistiller's ``w_a``), 2 in the authors' metric-learning runs
    (``examples/*.sh``: ``--angle_ratio 2``).

    ``reduction="distinct"`` averages over the ``B (B - 1) (B - 2)`` ordered triplets of
    distinct samples only, ``B^2 / ((B - 1)(B - 2))`` times the default (3.75 times at
    ``B = 4``, 1.05 at ``B = 64``); its scale does not depend on the batch size. Any other
    value raises ``ValueError``. With fewer than three samples there is no angle and the loss
    is a zero still attached to the graph. Memory is ``O(B^2 D)`` for the difference vectors
    plus ``O(B^3)`` for the angles.
    """
    _check_reduction("rkd_angle", reduction, _RKD_REDUCTIONS)
    s, t = _flat_pair("rkd_angle", student, teacher)
    batch = s.shape[0]
    if batch < 3:
        return s.sum() * 0.0
    per_triplet = F.smooth_l1_loss(_triplet_cosines(s), _triplet_cosines(t), reduction="none",
                                   beta=1.0)
    if reduction == "mean":
        return per_triplet.mean()
    eye = torch.eye(batch, dtype=torch.bool, device=s.device)
    same = eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0)  # i == j, i == k or j == k
    return per_triplet[~same].mean()


def _conditional_similarities(x: Tensor, eps: float, exclude_self: bool) -> Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    sim = (x @ x.T + 1.0) / 2.0  # cosine similarity shifted to [0, 1]
    if exclude_self:
        sim = sim * (1.0 - torch.eye(x.shape[0], dtype=sim.dtype, device=sim.device))
    return sim / sim.sum(dim=1, keepdim=True).clamp_min(eps)


def pkt(
    student: Tensor,
    teacher: Tensor,
    eps: float = 1e-7,
    exclude_self: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Probabilistic knowledge transfer: match conditional similarity distributions.

    Equations (``f`` the flattened features, normalised to unit length, ``B`` the batch)::

        K(i, j)   = (cos(f_i, f_j) + 1) / 2                 (cosine kernel in [0, 1])
        q(j | i)  = K(i, j) / sum_k K(i, k)
        L         = 1/B^2 sum_i sum_j q_t(j|i) log((q_t(j|i) + eps) / (q_s(j|i) + eps))
                                                                        (reduction="mean")

    i.e. ``KL(teacher || student)`` of the conditional distributions, with ``eps`` guarding the
    logarithm and the normalisation.

    Paper: N. Passalis, A. Tefas (2018), "Learning Deep Representations with Probabilistic
    Knowledge Transfer".

    Reduction (default ``"mean"``), as the authors' code computes it
    (passalis/probabilistic_kt, ``nn/pkt.py`` ``cosine_similarity_loss``:
    ``torch.mean(target * log((target + eps) / (model + eps)))``): the mean over all ``B^2``
    entries of the ``B x B`` matrix, i.e. the batch-mean KL divided by ``B`` once more.
    RepDistiller (``distiller_zoo/PKT.py``) and torchdistill (``PKTLoss``) compute the same.
    Published weight: **1** when PKT is the only loss (the authors' ``knowledge_transfer``
    trains on it alone); RepDistiller's CIFAR-100 benchmark adds it to cross-entropy with
    weight 30000 (``scripts/run_cifar_distill.sh``, ``-b 30000``, batch 64).

    ``reduction="batchmean"`` sums the KL over ``j`` and averages over the ``B`` anchors ``i``
    (the KL of each conditional distribution, averaged): ``B`` times the default. Any other
    value raises ``ValueError``. By default the sums include ``j = i`` (``K(i, i) = 1``), as in
    the authors' code; ``exclude_self=True`` drops the self-pairs, following the paper's
    ``k != j`` in the definition of the conditionals. With fewer than two samples the loss is a
    zero still attached to the graph.
    """
    _check_reduction("pkt", reduction, _PKT_REDUCTIONS)
    s, t = _flat_pair("pkt", student, teacher)
    if s.shape[0] < 2:
        return s.sum() * 0.0
    q_s = _conditional_similarities(s, eps, exclude_self)
    q_t = _conditional_similarities(t, eps, exclude_self)
    kl = q_t * torch.log((q_t + eps) / (q_s + eps))
    if reduction == "mean":
        return kl.mean()
    return kl.sum(dim=1).mean()
