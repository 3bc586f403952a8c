"""Losses on logits (the response family).

Notation used in the docstrings: ``z_s``/``z_t`` student and teacher logits with ``C`` classes in
the last dimension, ``p^T = softmax(z / T)``, ``KL(P || Q) = sum_i P_i log(P_i / Q_i)`` with the
convention ``0 log 0 = 0``. A *row* is one distribution over classes: logits of shape
``[B, C]`` have ``B`` rows, logits of shape ``[B, L, C]`` have ``B * L`` rows.

All functions are pure: they keep no state and return a scalar tensor. 16-bit floating inputs
are upcast to float32 before any softmax so that mixed-precision training does not lose the
small probabilities distillation depends on. Teacher tensors are *not* detached here; the
engine hands over teacher outputs produced under ``torch.inference_mode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .topk import TopKLogits

__all__ = ["cross_entropy", "dkd", "dkd_parts", "kd", "logit_mse", "soft_ce", "topk_kl"]

_REDUCTIONS = ("batchmean", "mean")


# --------------------------------------------------------------------------------------------
# shared private helpers (also used by features.py, relations.py and sequence.py)
# --------------------------------------------------------------------------------------------
def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_same_shape(fn: str, student: Tensor, teacher: Tensor) -> None:
    """Raise a readable ValueError when student and teacher shapes differ."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"{fn}: student and teacher shapes must match, got student {_shape(student)} "
            f"and teacher {_shape(teacher)}"
        )


def _check_temperature(fn: str, temperature: float) -> None:
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature!r}")


def _as_float(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 tensors to float32; leave float32/float64 alone."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _valid_mask(fn: str, mask: Tensor, expected: torch.Size, what: str = "input") -> Tensor:
    """Check a mask of valid positions against the leading shape and return it as bool.

    Any non-zero entry counts as valid, so bool, 0/1 integer and 0/1 float masks all work.
    """
    if mask.shape != expected:
        raise ValueError(
            f"{fn}: mask shape {_shape(mask)} does not match the {what}'s leading shape "
            f"{tuple(expected)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_invalid(x: Tensor, valid: Tensor) -> Tensor:
    """Replace entries at invalid positions by 0.

    ``valid`` covers the leading dimensions of ``x`` (one fewer dim) or all of them. Using
    ``torch.where`` on the *inputs* means garbage (even NaN/inf) at padded positions can neither
    reach the value nor the gradient: the gradient for those entries is exactly zero.
    """
    if valid.dim() == x.dim() - 1:
        valid = valid.unsqueeze(-1)
    return torch.where(valid, x, x.new_zeros(()))


def _kl_last_dim(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(P || Q)`` along the last dim from log-probabilities, with ``0 log 0 = 0``.

    Entries where ``P`` is exactly zero (e.g. vocabulary slots masked with ``-inf``) contribute
    nothing, even where ``Q`` is zero too, and they produce no NaN gradients.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def _rows(x: Tensor) -> int:
    """Number of rows (distributions over the last dim) in ``x``; at least 1."""
    return max(x.numel() // max(x.shape[-1], 1), 1)


def _reduce_rows(fn: str, total: Tensor, x: Tensor, reduction: str) -> Tensor:
    if reduction == "batchmean":
        return total / _rows(x)
    if reduction == "mean":
        return total / max(x.numel(), 1)
    raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def topk_kl(student_logits: Tensor, teacher: TopKLogits, temperature: float = 1.0) -> Tensor:
    """KL from top-k teacher logits to the student over k + 1 buckets, for every row: ``[...]``.

    The teacher's kept classes ``K`` (``|K| = k``) and one tail bucket for the other ``n = C - k``
    classes (see :class:`~kdistill.losses.topk.TopKLogits`). The student's full distribution
    ``q = softmax(z_s / T)`` is summed to the same buckets, ``Q_i = q_i`` (``i`` in ``K``) and
    ``Q_tail = sum_{j not in K} q_j``; the teacher's bucket probabilities are
    ``P = softmax([z_K / T, log n + (t - log n) / T])`` with ``t = log sum_{j not in K}
    exp(z_j)``. Then::

        KL_k = sum_{i in K} P_i log(P_i / Q_i) + P_tail log(P_tail / Q_tail)

    At ``T = 1``, ``P_i = p_i`` and ``P_tail = 1 - sum_K p_i`` exactly, and by the chain rule of
    KL, ``KL(p || q) = KL_k + P_tail KL(p | tail || q | tail)``: the bucket KL misses only the
    divergence inside the tail, weighted by the tail's mass. At ``T != 1`` the tempered tail
    needs the tail's logits, which are not kept: they are taken as equal (the tail's mass spread
    evenly over its ``n`` classes, the maximum-entropy guess), which is exact for a flat tail
    and, for ``T > 1``, over-weights the tail (``x -> x^(1/T)`` is concave, so by Jensen the
    true ``sum_tail p_j^(1/T)`` is at most ``n (P_tail / n)^(1/T)``); for ``T < 1`` it
    under-weights it.

    Paper: G. Hinton, O. Vinyals, J. Dean (2015), "Distilling the Knowledge in a Neural
    Network" (the KL), here on the support a teacher cache keeps.
    """
    log_q_buckets, log_p_buckets = topk_buckets("topk_kl", student_logits, teacher, temperature)
    return _kl_last_dim(log_p_buckets, log_q_buckets)


def topk_buckets(fn: str, student_logits: Tensor, teacher: TopKLogits,
                 temperature: float) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's log-probabilities over the teacher's ``k + 1`` buckets
    (its kept classes, then the tail), ``[..., k + 1]`` each (see :func:`topk_kl`)."""
    _check_same_shape(fn, student_logits, teacher)  # type: ignore[arg-type]
    _check_temperature(fn, temperature)
    log_q = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    kept = log_q.gather(-1, teacher.indices)
    tail = torch.logsumexp(log_q.scatter(-1, teacher.indices, float("-inf")), dim=-1)
    return torch.cat([kept, tail.unsqueeze(-1)], dim=-1), teacher.bucket_log_probs(temperature)


def _log_probs(fn: str, student_logits: Tensor, teacher_logits: Tensor,
               temperature: float) -> tuple[Tensor, Tensor]:
    """Checked ``log softmax(z / T)`` of the student's and the teacher's logits."""
    _check_same_shape(fn, student_logits, teacher_logits)
    _check_temperature(fn, temperature)
    log_ps = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    log_pt = F.log_softmax(_as_float(teacher_logits) / temperature, dim=-1)
    return log_ps, log_pt


# --------------------------------------------------------------------------------------------
# public losses
# --------------------------------------------------------------------------------------------
def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
       reduction: str = "batchmean") -> Tensor:
    """Hinton knowledge distillation: temperature-scaled KL from teacher to student.

    Equation::

        L = T^2 * KL(p_t^T || p_s^T),  p^T = softmax(z / T)

    The ``T^2`` factor keeps the size of the gradients roughly constant as ``T`` changes
    (the soft-target gradients scale as ``1 / T^2``).

    Paper: G. Hinton, O. Vinyals, J. Dean (2015), "Distilling the Knowledge in a Neural Network".

    Reduction: ``"batchmean"`` (default) sums the KL over classes and averages over rows, as
    RepDistiller and DKD do. ``"mean"`` averages over rows x classes (i.e. batchmean / C), as
    DeiT and TAKD do; published numbers depend on the choice. Logits with extra leading
    dimensions (``[B, L, C]``) are treated as ``B * L`` rows.

    Args:
        student_logits: ``[..., C]`` student logits.
        teacher_logits: ``[..., C]`` teacher logits, same shape, or the teacher's
            :class:`~kdistill.losses.topk.TopKLogits` (then the KL is :func:`topk_kl`'s).
        temperature: softening temperature ``T > 0``.
        reduction: ``"batchmean"`` or ``"mean"``.
    """
    if isinstance(teacher_logits, TopKLogits):
        total = topk_kl(student_logits, teacher_logits, temperature).sum()
    else:
        log_ps, log_pt = _log_probs("kd", student_logits, teacher_logits, temperature)
        total = _kl_last_dim(log_pt, log_ps).sum()
    return temperature**2 * _reduce_rows("kd", total, student_logits, reduction)


def soft_ce(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
            reduction: str = "batchmean") -> Tensor:
    """Soft cross-entropy between the teacher's and the student's softened predictions.

    Equation::

        L = - sum_c p_t^T(c) * log p_s^T(c)

    This is TinyBERT's prediction-layer loss (used there at ``T = 1``). It equals
    ``KL(p_t || p_s) + H(p_t)``, so it has the same student gradient as the KL but a non-zero
    floor (the teacher's entropy). No ``T^2`` scaling is applied.

    Paper: X. Jiao, Y. Yin, L. Shang, X. Jiang, X. Chen, L. Li, F. Wang, Q. Liu (2020),
    "TinyBERT: Distilling BERT for Natural Language Understanding".

    Reduction: ``"batchmean"`` (default) sums over classes and averages over rows;
    ``"mean"`` averages over rows x classes, which is what TinyBERT's official code computes.
    """
    _check_same_shape("soft_ce", student_logits, teacher_logits)
    _check_temperature("soft_ce", temperature)
    log_ps = F.log_softmax(_as_float(student_logits) / temperature, dim=-1)
    p_t = F.softmax(_as_float(teacher_logits) / temperature, dim=-1)
    # p_t == 0 entries must not turn into 0 * -inf.
    total = -torch.where(p_t > 0, p_t * log_ps, torch.zeros_like(log_ps)).sum()
    return _reduce_rows("soft_ce", total, student_logits, reduction)


def _dkd_log_probs(z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """For rows ``z [N, C]`` return ``log b [N, 2]`` and ``log p_hat [N, C]``.

    ``b = [p_target, 1 - p_target]`` and ``p_hat`` is the softmax over the non-target classes
    (``-inf`` at the target). Both are computed with logsumexp, never as ``log(1 - p)``.
    """
    gt = F.one_hot(target, z.shape[-1]).bool()
    lse_all = torch.logsumexp(z, dim=-1)
    z_rest = z.masked_fill(gt, float("-inf"))
    lse_rest = torch.logsumexp(z_rest, dim=-1)
    z_gt = z.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    log_b = torch.stack([z_gt - lse_all, lse_rest - lse_all], dim=-1)
    log_hat = z_rest - lse_rest.unsqueeze(-1)
    return log_b, log_hat


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
              temperature: float = 4.0) -> tuple[Tensor, Tensor]:
    """The two terms of decoupled KD, ``(tckd, nckd)``, each T^2-scaled and batchmean.

    Equations (``g`` the target class, ``p = softmax(z / T)``)::

        b      = [p_g, 1 - p_g]                              (binary: target vs the rest)
        p_hat  = softmax over the classes c != g of z / T    (non-target distribution)
        TCKD   = T^2 * KL(b_t || b_s)
        NCKD   = T^2 * KL(p_hat_t || p_hat_s)

    Per row they satisfy the paper's identity ``KL(p_t || p_s) = KL(b_t || b_s) +
    (1 - p_t,g) * KL(p_hat_t || p_hat_s)``, so plain KD is TCKD plus an NCKD weighted by the
    teacher's non-target mass. The target logit is excluded from ``p_hat`` exactly (masked with
    ``-inf``) rather than by subtracting a large constant.

    Paper: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang (2022), "Decoupled Knowledge
    Distillation".

    Reduction: each term is summed over its distribution and averaged over rows (batchmean).

    Args:
        student_logits: ``[..., C]`` with ``C >= 2``.
        teacher_logits: same shape.
        target: integer class indices of shape ``[...]`` (the logits' leading shape); every
            row needs a valid class (no ignore index).
        temperature: ``T > 0``.
    """
    _check_same_shape("dkd", student_logits, teacher_logits)
    _check_temperature("dkd", temperature)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd: needs at least 2 classes, got logits {_shape(student_logits)}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"dkd: target shape {_shape(target)} does not match the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])} (logits {_shape(student_logits)})"
        )
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"dkd: target must hold integer class indices, got {target.dtype}")
    tgt = target.reshape(-1).long()
    zs = _as_float(student_logits).reshape(-1, num_classes) / temperature
    zt = _as_float(teacher_logits).reshape(-1, num_classes) / temperature
    log_b_s, log_hat_s = _dkd_log_probs(zs, tgt)
    log_b_t, log_hat_t = _dkd_log_probs(zt, tgt)
    rows = max(tgt.numel(), 1)
    scale = temperature**2 / rows
    tckd = scale * _kl_last_dim(log_b_t, log_b_s).sum()
    nckd = scale * _kl_last_dim(log_hat_t, log_hat_s).sum()
    return tckd, nckd


def dkd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Decoupled knowledge distillation: ``alpha * TCKD + beta * NCKD``.

    Equation::

        L = alpha * T^2 KL(b_t || b_s) + beta * T^2 KL(p_hat_t || p_hat_s)

    with ``b`` the binary target/non-target probabilities and ``p_hat`` the softmax over the
    non-target classes (see :func:`dkd_parts`). Defaults are the paper's CIFAR-100 values
    (alpha=1, beta=8, T=4). The paper's linear warm-up of the DKD weight over the first epochs
    is *not* applied here: the recipe owns schedules.

    Paper: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang (2022), "Decoupled Knowledge
    Distillation".

    Reduction: batchmean (sum over the distribution, mean over rows) for both terms.
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared error between student and teacher logits (logit matching).

    Equation::

        L = mean over all entries of (z_s - z_t)^2

    Paper: J. Ba, R. Caruana (2014), "Do Deep Nets Really Need to be Deep?"; it is also the
    high-temperature limit of Hinton KD and the regression loss used by Annealing-KD
    (A. Jafari, M. Rezagholizadeh, P. Sharma, A. Ghodsi (2021), "Annealing Knowledge
    Distillation").

    Reduction: mean over every entry (rows x classes).
    """
    _check_same_shape("logit_mse", student_logits, teacher_logits)
    return F.mse_loss(_as_float(student_logits), _as_float(teacher_logits))


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of the student's logits against hard labels (no teacher).

    Equation::

        L = - (1 / |V|) sum_{r in V} log softmax(z_r)[y_r],   V = {r : y_r != ignore_index}

    The standard supervised term of most distillation objectives (Hinton et al. 2015, "Distilling
    the Knowledge in a Neural Network", uses it next to the soft targets).

    Label smoothing ``e`` (Szegedy et al. 2016, "Rethinking the Inception Architecture for
    Computer Vision") replaces the one-hot target by ``(1 - e) onehot(y_r) + e / C`` over the
    ``C`` classes, so a row costs ``(1 - e) (-log p_r[y_r]) + (e / C) sum_c (-log p_r[c])``.

    Reduction: mean over labelled rows; rows whose label equals ``ignore_index`` are skipped
    and their logits (even NaN garbage) receive exactly zero gradient. With no labelled row the
    result is a zero that is still connected to ``logits`` in the autograd graph.

    Args:
        logits: ``[..., C]`` logits.
        labels: integer labels with the logits' leading shape ``[...]``.
        ignore_index: label value marking rows to skip.
        label_smoothing: ``e`` in [0, 1); 0 gives the plain cross-entropy.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got "
                         f"{label_smoothing!r}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: labels shape {_shape(labels)} does not match the logits' leading "
            f"shape {tuple(logits.shape[:-1])} (logits {_shape(logits)})"
        )
    num_classes = logits.shape[-1]
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    flat = _zero_invalid(_as_float(logits).reshape(-1, num_classes), valid)
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    per_row = F.cross_entropy(flat, safe_labels, reduction="none",
                              label_smoothing=label_smoothing)
    total = torch.where(valid, per_row, torch.zeros_like(per_row)).sum()
    return total / valid.sum().clamp_min(1)
