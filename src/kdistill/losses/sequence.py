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

**Sparse teacher logits** from a teacher cache. Top-k logits plus a tail bucket
(:class:`~kdistill.losses.topk.TopKLogits`): each divergence is computed over the k + 1
buckets (the student's distribution summed into the teacher's kept tokens and its tail,
:func:`~kdistill.losses.logits.topk_buckets`). Coarsening two distributions never increases an
f-divergence (data-processing inequality), so every bucket value is a lower bound of the dense
one; at T = 1 what it misses is bounded by the teacher's tail mass ``P`` (``Q``: the student's):

* ``forward_kl``: exactly ``P KL(p_t | tail || p_s | tail)`` (the chain rule of KL);
* ``tvd``: ``0.5 (sum_tail |p_t - p_s| - |P - Q|) <= min(P, Q) <= P``;
* ``generalized_jsd`` (0 < beta < 1): at most ``M h(beta P / M)`` with ``M = beta P + (1 - beta)
  Q`` and ``h`` the binary entropy (bound each tail KL to the mixture by ``m >= (beta P / M) p``
  and ``m >= ((1 - beta) Q / M) q``), so at most ``beta P (1 + log(1 + (1 - beta) / (beta P)))``;
* ``reverse_kl`` (and ``generalized_jsd`` at beta = 1, which is reverse KL) misses
  ``Q KL(p_s | tail || p_t | tail)``: weighted by the *student's* tail mass, with the teacher's
  tail logits unknown, it is bounded by nothing the cache keeps, so it is refused.

At T != 1 the teacher's tempered tail bucket takes the tail's mass as spread evenly over its
classes (see :func:`~kdistill.losses.logits.topk_kl`). Importance-sampled logits
(:class:`~kdistill.losses.sampled.SampledLogits`) serve ``forward_kl`` at T = 1 alone, as an
unbiased estimate (:func:`~kdistill.losses.sampled.sampled_kl`); the other divergences are not
linear in the teacher's probabilities and are refused.
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
    topk_buckets,
    topk_kl,
)
from .sampled import SampledLogits, sampled_kl
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
SPARSE = (TopKLogits, SampledLogits)


def _divergence_log_probs(fn: str, student_logits: Tensor, teacher_logits: Tensor,
                          temperature: float) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's log-probabilities the divergence ``fn`` compares: over
    the vocabulary, or over the k + 1 buckets of top-k teacher logits (see the module notes);
    importance-sampled teacher logits are refused (forward KL alone reads them)."""
    if isinstance(teacher_logits, SampledLogits):
        raise ValueError(f"{fn}: sampled teacher logits ({teacher_logits.k} draws from a teacher "
                         f"cache) give an unbiased estimate of the forward KL alone; {fn} is not "
                         "linear in the teacher's probabilities: use forward_kl, or cache dense "
                         "or top-k logits")
    if isinstance(teacher_logits, TopKLogits):
        return topk_buckets(fn, student_logits, teacher_logits, temperature)
    return _log_probs(fn, student_logits, teacher_logits, temperature)


def _refuse_top_k_reverse(fn: str, teacher_logits: Tensor) -> None:
    """Refuse a reverse KL against top-k teacher logits (see the module notes)."""
    if isinstance(teacher_logits, TopKLogits):
        raise ValueError(f"{fn}: top-k teacher logits (k={teacher_logits.k} of "
                         f"{teacher_logits.num_classes} classes, from a teacher cache) give no "
                         "sound reverse KL: KL(p_s || p_t) misses the student's tail mass times "
                         "its divergence inside the teacher's tail, whose logits the cache does "
                         "not keep; use forward_kl, tvd or generalized_jsd with beta < 1, or "
                         "dense logits")


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
        teacher = (teacher_logits.where_valid(valid) if isinstance(teacher_logits, SPARSE)
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
    :func:`~kdistill.losses.logits.topk_kl`, for sampled ones
    (:class:`~kdistill.losses.sampled.SampledLogits`) the estimate of
    :func:`~kdistill.losses.sampled.sampled_kl`."""
    if isinstance(teacher_logits, TopKLogits):
        return topk_kl(student_logits, teacher_logits, temperature)
    if isinstance(teacher_logits, SampledLogits):
        return sampled_kl(student_logits, teacher_logits, temperature)
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
    tail bucket (:func:`~kdistill.losses.logits.topk_kl`); or importance-sampled logits
    (:class:`~kdistill.losses.sampled.SampledLogits`): the loss is then an unbiased estimate
    (:func:`~kdistill.losses.sampled.sampled_kl`, T = 1 only).

    Reduction: sum over valid tokens divided by their count, or by ``normalizer``.
    """
    per_token = partial(per_token_forward_kl, temperature=temperature)
    return _token_average("forward_kl", per_token, student_logits, teacher_logits, mask, normalizer)


def per_token_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """``KL(p_s || p_t)`` for every position, shape ``[...]`` (see :func:`reverse_kl`); top-k
    teacher logits are refused (see the module notes)."""
    _refuse_top_k_reverse("reverse_kl", teacher_logits)
    log_ps, log_pt = _divergence_log_probs("reverse_kl", student_logits, teacher_logits,
                                           temperature)
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
    """``0.5 * sum_v |p_t - p_s|`` for every position, shape ``[...]`` (see :func:`tvd`); over
    the k + 1 buckets of top-k teacher logits."""
    log_ps, log_pt = _divergence_log_probs("tvd", student_logits, teacher_logits, temperature)
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
    """Generalised JSD(beta) for every position, shape ``[...]`` (see :func:`generalized_jsd`);
    over the k + 1 buckets of top-k teacher logits (beta < 1 only: at 1 it is reverse KL)."""
    _check_beta("generalized_jsd", beta)
    if beta == 1.0:
        _refuse_top_k_reverse("generalized_jsd at beta 1", teacher_logits)
    log_ps, log_pt = _divergence_log_probs("generalized_jsd", student_logits, teacher_logits,
                                           temperature)
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
