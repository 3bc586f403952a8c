"""Token-level divergences for sequence models (seq2seq and causal LMs).

Logits are ``[B, L, V]`` (or ``[N, V]``, or any ``[..., V]``); ``mask`` has the leading shape
(``[B, L]``) and marks valid tokens (bool, or 0/1 of any dtype; non-zero means valid). Every
loss is::

    loss = sum over valid tokens of d(p_t, p_s) / n

where ``n`` is the number of valid tokens in these logits, or ``normalizer`` when given. The
engine passes ``normalizer`` = the number of valid tokens in the *whole global batch* during
gradient accumulation, so that micro-batches with few tokens are not over-weighted (the
normalisation bug TRL fixed). Logits at masked positions may hold anything, even NaN: they reach
neither the value nor the gradient.

``p = softmax(z / T)``. No ``T^2`` factor is applied (unlike :func:`kdistill.losses.kd`), as in
TRL's GKD trainer. The ``per_token_*`` functions return the unreduced ``[...]`` divergences for
recipes that weight tokens or samples themselves (e.g. BD-KD's per-sample mix).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from .logits import (
    _check_same_shape,
    _kl_last_dim,
    _log_probs,
    _valid_mask,
    _zero_invalid,
    topk_kl,
)
from .topk import TopKLogits

__all__ = [
    "forward_kl",
    "generalized_jsd",
    "per_token_forward_kl",
    "per_token_generalized_jsd",
    "per_token_reverse_kl",
    "per_token_tvd",
    "reverse_kl",
    "tvd",
]

Normalizer = float | Tensor | None


def _check_beta(fn: str, beta: float) -> None:
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"{fn}: beta must be in [0, 1], got {beta!r}")


def _token_average(
    fn: str,
    per_token: Callable[[Tensor, Tensor], Tensor],
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None,
    normalizer: Normalizer,
) -> Tensor:
    """The one place where token losses are masked and averaged.

    ``per_token(student_logits, teacher_logits)`` maps ``[..., V]`` logits to ``[...]``
    divergences. Invalid rows are zeroed *before* it runs, so their garbage cannot leak.
    """
    _check_same_shape(fn, student_logits, teacher_logits)
    if isinstance(normalizer, int | float) and not normalizer > 0:
        raise ValueError(f"{fn}: normalizer must be > 0, got {normalizer!r}")
    if mask is None:
        values = per_token(student_logits, teacher_logits)
        count: Tensor | int = max(values.numel(), 1)
    else:
        valid = _valid_mask(fn, mask, student_logits.shape[:-1], "logits")
        teacher = (teacher_logits.where_valid(valid) if isinstance(teacher_logits, TopKLogits)
                   else _zero_invalid(teacher_logits, valid))
        values = per_token(_zero_invalid(student_logits, valid), teacher)
        values = torch.where(valid, values, torch.zeros_like(values))
        count = valid.sum().clamp_min(1)
    total = values.sum()
    return total / (count if normalizer is None else normalizer)


# --------------------------------------------------------------------------------------------
# each divergence per token (unreduced), then masked and averaged
# --------------------------------------------------------------------------------------------
def per_token_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``KL(p_t || p_s)`` for every position, shape ``[...]`` (see :func:`forward_kl`); for
    top-k teacher logits (:class:`~kdistill.losses.topk.TopKLogits`) the bucket KL of
    :func:`~kdistill.losses.logits.topk_kl`."""
    if isinstance(teacher_logits, TopKLogits):
        return topk_kl(student_logits, teacher_logits, temperature)
    log_ps, log_pt = _log_probs("forward_kl", student_logits, teacher_logits, temperature)
    return _kl_last_dim(log_pt, log_ps)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
               temperature: float = 1.0, normalizer: Normalizer = None) -> Tensor:
    """Token-level forward KL, the standard word-level KD objective (mean-seeking).

    Equation::

        L = (1 / n) sum_{valid tokens} sum_v p_t(v) log(p_t(v) / p_s(v))

    Paper: Y. Kim, A. M. Rush (2016), "Sequence-Level Knowledge Distillation" (word-level KD).

    The teacher's logits may be top-k logits from a teacher cache
    (:class:`~kdistill.losses.topk.TopKLogits`): the KL is then over the kept classes plus one
    tail bucket (:func:`~kdistill.losses.logits.topk_kl`).

    Reduction: sum over valid tokens divided by their count, or by ``normalizer``.
    """
    per_token = partial(per_token_forward_kl, temperature=temperature)
    return _token_average("forward_kl", per_token, student_logits, teacher_logits, mask, normalizer)


def per_token_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``KL(p_s || p_t)`` for every position, shape ``[...]`` (see :func:`reverse_kl`)."""
    log_ps, log_pt = _log_probs("reverse_kl", student_logits, teacher_logits, temperature)
    return _kl_last_dim(log_ps, log_pt)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
               temperature: float = 1.0, normalizer: Normalizer = None) -> Tensor:
    """Token-level reverse KL (mode-seeking), as used for LLM distillation.

    Equation::

        L = (1 / n) sum_{valid tokens} sum_v p_s(v) log(p_s(v) / p_t(v))

    Paper: Y. Gu, L. Dong, F. Wei, M. Huang (2024), "MiniLLM: Knowledge Distillation of Large
    Language Models"; also R. Agarwal et al. (2024), "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes" (GKD).

    Reduction: sum over valid tokens divided by their count, or by ``normalizer``.
    """
    per_token = partial(per_token_reverse_kl, temperature=temperature)
    return _token_average("reverse_kl", per_token, student_logits, teacher_logits, mask, normalizer)


def per_token_tvd(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``0.5 * sum_v |p_t - p_s|`` for every position, shape ``[...]`` (see :func:`tvd`)."""
    log_ps, log_pt = _log_probs("tvd", student_logits, teacher_logits, temperature)
    return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(dim=-1)


def tvd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None,
        temperature: float = 1.0, normalizer: Normalizer = None) -> Tensor:
    """Token-level total variation distance (symmetric, bounded in [0, 1]).

    Equation::

        L = (1 / n) sum_{valid tokens} 0.5 * sum_v |p_t(v) - p_s(v)|

    Paper: Y. Wen, Z. Li, W. Du, L. Mou (2023), "f-Divergence Minimization for Sequence-Level
    Knowledge Distillation" (TVD is one of its symmetric distillation losses).

    Reduction: sum over valid tokens divided by their count, or by ``normalizer``.
    """
    per_token = partial(per_token_tvd, temperature=temperature)
    return _token_average("tvd", per_token, student_logits, teacher_logits, mask, normalizer)


def per_token_generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised JSD(beta) for every position, shape ``[...]`` (see :func:`generalized_jsd`)."""
    _check_beta("generalized_jsd", beta)
    log_ps, log_pt = _log_probs("generalized_jsd", student_logits, teacher_logits, temperature)
    if beta == 0.0:
        return _kl_last_dim(log_pt, log_ps)
    if beta == 1.0:
        return _kl_last_dim(log_ps, log_pt)
    # log M = log(beta p_t + (1 - beta) p_s), mixed in probability space via logsumexp.
    log_m = torch.logsumexp(
        torch.stack([log_pt + math.log(beta), log_ps + math.log1p(-beta)]), dim=0
    )
    return beta * _kl_last_dim(log_pt, log_m) + (1.0 - beta) * _kl_last_dim(log_ps, log_m)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    normalizer: Normalizer = None,
) -> Tensor:
    """Token-level generalised Jensen-Shannon divergence JSD(beta), as in GKD.

    Equation, for ``0 < beta < 1``::

        M      = beta * p_t + (1 - beta) * p_s
        JSD_b  = beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)
        L      = (1 / n) sum_{valid tokens} JSD_b

    ``log M`` is computed as ``logsumexp([log beta + log p_t, log(1 - beta) + log p_s])``, i.e.
    the *probabilities* are mixed (mixing log-probabilities would be a different, wrong, M).

    Limits and endpoints: the formula itself is 0 at both ``beta = 0`` and ``beta = 1``
    (M becomes p_s, resp. p_t). Near the ends it vanishes linearly::

        JSD_b / beta       -> KL(p_t || p_s)   as beta -> 0   (forward KL)
        JSD_b / (1 - beta) -> KL(p_s || p_t)   as beta -> 1   (reverse KL)

    Following TRL's GKD convention, ``beta == 0`` exactly returns the forward KL and
    ``beta == 1`` exactly returns the reverse KL (the normalised limits above, not the
    formula's 0), so the endpoints are usable losses. ``beta = 0.5`` is the symmetric JSD,
    bounded by ``log 2``. Swapping the roles is exact: ``JSD_b(p_t, p_s) = JSD_{1-b}(p_s, p_t)``.

    Paper: R. Agarwal, N. Vieillard, Y. Zhou, P. Stanczyk, S. Ramos, M. Geist, O. Bachem (2024),
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes".

    Reduction: sum over valid tokens divided by their count, or by ``normalizer``.
    """
    per_token = partial(per_token_generalized_jsd, beta=beta, temperature=temperature)
    return _token_average(
        "generalized_jsd", per_token, student_logits, teacher_logits, mask, normalizer
    )
