"""Losses on intermediate features: hidden states, attention maps, convolutional activations.

Projection of the student's features to the teacher's width (FitNets' regressor, TinyBERT's
``W_h``) is trainable state and lives in the recipe, not here: these functions expect tensors
that already have matching shapes, except where a docstring says otherwise. Masks are
``[B, L]`` tensors of valid tokens (bool, or 0/1 of any dtype; non-zero means valid). Values at
masked positions never reach the loss or its gradient, so padding may hold garbage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import _as_float, _check_same_shape, _shape, _valid_mask, _zero_invalid

__all__ = ["attention_mse", "attention_transfer", "cosine", "hidden_mse"]


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between (already projected) student and teacher features.

    Equation, for features ``h [B, L, D]`` and a mask ``m [B, L]``::

        L = sum_{b,l : m_bl = 1} sum_d (h_s[b,l,d] - h_t[b,l,d])^2 / (n_valid * D)

    Without a mask it is the mean over every entry. Used for FitNets hints and TinyBERT's
    embedding and hidden-state losses.

    Papers: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio (2015),
    "FitNets: Hints for Thin Deep Nets"; X. Jiao et al. (2020), "TinyBERT: Distilling BERT for
    Natural Language Understanding".

    Reduction: mean over valid positions x features. With a mask but no valid position the
    result is a zero still attached to the graph. Any feature rank works: the mask must have
    the features' leading shape (``student.shape[:-1]``).
    """
    _check_same_shape("hidden_mse", student, teacher)
    s, t = _as_float(student), _as_float(teacher)
    if mask is None:
        return F.mse_loss(s, t)
    valid = _valid_mask("hidden_mse", mask, student.shape[:-1], "features")
    s, t = _zero_invalid(s, valid), _zero_invalid(t, valid)
    total = (s - t).pow(2).sum()
    return total / (valid.sum() * student.shape[-1]).clamp_min(1)


def cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cosine distance between student and teacher feature vectors (last dimension).

    Equation, per row ``r`` (a sample or a token)::

        L = mean_r (1 - <h_s,r, h_t,r> / (|h_s,r| |h_t,r|))

    Scale-free alternative to :func:`hidden_mse`, used e.g. by DistilBERT's cosine embedding
    loss on hidden states (V. Sanh, L. Debut, J. Chaumond, T. Wolf (2019), "DistilBERT, a
    distilled version of BERT: smaller, faster, cheaper and lighter").

    Reduction: mean over rows, or over valid rows when ``mask`` (the features' leading shape)
    is given. Norms are clamped at 1e-8, so zero vectors give a distance of 1, not NaN.
    """
    _check_same_shape("cosine", student, teacher)
    s, t = _as_float(student), _as_float(teacher)
    if mask is None:
        return (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()
    valid = _valid_mask("cosine", mask, student.shape[:-1], "features")
    s, t = _zero_invalid(s, valid), _zero_invalid(t, valid)
    per_row = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    total = torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
    return total / valid.sum().clamp_min(1)


def attention_mse(
    student_scores: Tensor,
    teacher_scores: Tensor,
    mask: Tensor | None = None,
    average_heads: bool | None = None,
) -> Tensor:
    """Mean squared error between attention maps (TinyBERT's attention loss).

    Equation, for maps ``A [B, H, L, L]`` and a token mask ``m [B, L]``::

        P  = {(b, q, k) : m_bq = 1 and m_bk = 1}
        L  = sum_{(b,q,k) in P} sum_h (A_s[b,h,q,k] - A_t[b,h,q,k])^2 / (|P| * H)

    Pass the *pre-softmax* scores for TinyBERT (what its paper and code use) or probabilities.

    Masked positions: TinyBERT's code replaces masked scores (``<= -100`` after the additive
    mask) by 0 and keeps them in the mean. Here every pair whose query *or* key is padding is
    excluded from both the sum and the count, so padding length does not dilute the loss and the
    ``-inf``/``finfo.min`` values some models put there are harmless. Without a mask every entry
    counts (and such extreme values would dominate: pass the mask).

    Heads: maps may be ``[B, H, L, L]`` or already head-less ``[B, L, L]``. With
    ``average_heads=None`` (default) two 4-D maps with the same head count are compared head by
    head; if the head counts differ, or one map is 3-D, each 4-D map is first averaged over its
    heads (as in the head-averaged TinyBERT variant of our methods notes) and the ``[B, L, L]``
    maps are compared. ``average_heads=True`` always averages, ``False`` never does (shapes must
    then match).

    Paper: X. Jiao, Y. Yin, L. Shang, X. Jiang, X. Chen, L. Li, F. Wang, Q. Liu (2020),
    "TinyBERT: Distilling BERT for Natural Language Understanding".

    Reduction: mean over valid (query, key) pairs x heads.
    """
    for who, x in (("student", student_scores), ("teacher", teacher_scores)):
        if x.dim() not in (3, 4):
            raise ValueError(
                f"attention_mse: {who} scores must be [B, H, L, L] or [B, L, L], "
                f"got {_shape(x)}"
            )
    s, t = _as_float(student_scores), _as_float(teacher_scores)
    if average_heads is None:
        average_heads = s.dim() != t.dim() or (s.dim() == 4 and s.shape[1] != t.shape[1])
    if average_heads:
        s = s.mean(dim=1) if s.dim() == 4 else s
        t = t.mean(dim=1) if t.dim() == 4 else t
    if s.shape != t.shape:
        raise ValueError(
            f"attention_mse: student and teacher attention shapes must match, got student "
            f"{_shape(student_scores)} and teacher {_shape(teacher_scores)}"
        )
    if mask is None:
        return F.mse_loss(s, t)
    if s.shape[-1] != s.shape[-2]:
        raise ValueError(
            f"attention_mse: a token mask needs square [.., L, L] maps, got {_shape(s)}"
        )
    valid = _valid_mask("attention_mse", mask, torch.Size((s.shape[0], s.shape[-1])), "maps")
    pairs = valid.unsqueeze(-1) & valid.unsqueeze(-2)  # [B, L, L]
    if s.dim() == 4:
        pairs = pairs.unsqueeze(1)  # broadcast over heads
    heads = s.shape[1] if s.dim() == 4 else 1
    s, t = _zero_invalid(s, pairs), _zero_invalid(t, pairs)
    total = (s - t).pow(2).sum()
    return total / (pairs.sum() * heads).clamp_min(1)


_AT_REDUCTIONS = ("mean", "batchmean")


def attention_transfer(
    student_map: Tensor, teacher_map: Tensor, p: float = 2.0, reduction: str = "mean"
) -> Tensor:
    """Activation-based attention transfer between convolutional feature maps (one layer pair).

    Equation, for activations ``F [B, C, *spatial]`` with ``N`` spatial positions::

        a(F)  = vec( mean_c |F_c|^p )                      [B, N], one value per position
        Q     = a(F) / max(||a(F)||_2, 1e-12)              per sample
        L     = 1/(B N) sum_b sum_n (Q_s[b, n] - Q_t[b, n])^2        (reduction="mean")

    Channel counts may differ between student and teacher (the map averages them away);
    batch and spatial sizes must match.

    Paper: S. Zagoruyko, N. Komodakis (2017), "Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer". Its eq. 2 adds
    ``beta/2 sum_j ||Q_s^j - Q_t^j||_p`` over the layer pairs ``j`` (p = 2) and sets beta to
    "10^3 divided by the number of elements in attention map and batch size for each layer".

    Reduction (default ``"mean"``), as the authors' code computes it
    (szagoruyko/attention-transfer, ``utils.py`` ``at`` and ``at_loss``:
    ``(at(x) - at(y)).pow(2).mean()``): the *squared* difference averaged over batch *and*
    positions; ``cifar.py``/``imagenet.py`` then add ``beta * sum(at_loss over the layer
    pairs)`` to the classification loss with ``--beta 1e+3``, without the paper's ``1/2``.
    RepDistiller (``distiller_zoo/AT.py``, ``-b 1000``) and torchdistill (``ATLoss``,
    ``mode='code'``) compute the same value. Published weight: **1000 per layer pair**; in a
    ``composite`` config give each pair its own ``attention_transfer`` term with weight 1000
    (terms add up, like the authors' sum over pairs). The authors' code fixes ``p = 2``; other
    values of ``p`` follow the paper's ``|F_c|^p``.

    ``reduction="batchmean"`` sums over positions and averages over the batch,
    ``mean_b ||Q_s,b - Q_t,b||_2^2`` (the paper's norm, squared): ``N`` times the default and
    within [0, 2] whatever the resolution (the maps are non-negative unit vectors); the
    published beta = 1000 corresponds to a weight of ``1000 / N`` for it. Any other value
    raises ``ValueError``.
    """
    if reduction not in _AT_REDUCTIONS:
        raise ValueError(
            f"attention_transfer: reduction must be one of {_AT_REDUCTIONS}, got {reduction!r}"
        )
    for who, x in (("student", student_map), ("teacher", teacher_map)):
        if x.dim() < 3:
            raise ValueError(
                f"attention_transfer: {who} map must be [B, C, *spatial], got {_shape(x)}"
            )
    same_batch = student_map.shape[0] == teacher_map.shape[0]
    if not same_batch or student_map.shape[2:] != teacher_map.shape[2:]:
        raise ValueError(
            "attention_transfer: batch and spatial sizes must match, got student "
            f"{_shape(student_map)} and teacher {_shape(teacher_map)}"
        )
    a_s = F.normalize(_as_float(student_map).abs().pow(p).mean(dim=1).flatten(1), dim=1)
    a_t = F.normalize(_as_float(teacher_map).abs().pow(p).mean(dim=1).flatten(1), dim=1)
    squared = (a_s - a_t).pow(2)
    if reduction == "mean":
        return squared.mean()
    return squared.sum(dim=1).mean()
