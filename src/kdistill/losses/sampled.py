"""Importance-sampled teacher logits: k tokens drawn from the teacher's distribution, with weights
that make the forward KL an unbiased estimate.

Random-sampling KD, after Anshumann et al. (2025), "Sparse Logit Sampling: Accelerating
Knowledge Distillation in LLMs" (ACL 2025): a teacher cache keeps, per row of ``C`` logits, k
draws ``x_1 .. x_k`` (with replacement) from a proposal ``r = softmax(z_t / tau)`` and the
importance weights ``w_j = p_t(x_j) / (k r(x_j))`` (``p_t = softmax(z_t)``). For any function
``f`` of the token, ``E[sum_j w_j f(x_j)] = sum_v p_t(v) f(v)``: the weighted draws are an
unbiased sparse estimate of the teacher's distribution (top-k logits are not: they drop the
tail). At ``tau = 1`` (the paper's proposal, the teacher itself) every weight is ``1 / k`` and
the estimate is the draws' empirical distribution; ``tau > 1`` spreads the draws over more of
the tail, the weights correcting for it.

The row also keeps the teacher's exact negative entropy ``s = sum_v p_t(v) log p_t(v)``, so
that the KL itself, not only its gradient, is estimated without bias::

    KL_hat = s - sum_j w_j log p_s(x_j),   E[KL_hat] = KL(p_t || p_s)

Its gradient with respect to the student's logits is ``(sum_j w_j) p_s - sum_j w_j e_{x_j}``,
whose expectation is the dense KL's ``p_s - p_t``. Only quantities linear in ``p_t`` have
such an estimate: the forward KL at the temperature the draws were made for (T = 1). Reverse
KL, JSD and TVD are not linear in ``p_t`` and a tempered ``p_t^T`` needs the whole row's
log-partition at T, so every other use fails with :class:`~kdistill.losses.topk.
TopKLogitsError` or a ``ValueError`` that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import _as_float
from .topk import TopKLogitsError

__all__ = ["SampledLogits", "sample_logits", "sampled_kl"]


@dataclass(frozen=True, eq=False)
class SampledLogits:
    """Importance-sampled teacher logits of every row of ``[..., C]`` logits.

    ``indices`` ``[..., k]`` (int64 token ids of the k draws, repeats allowed), ``weights``
    ``[..., k]`` (float: ``p_t(x_j) / (k r(x_j))``), ``neg_entropy`` ``[...]`` (float:
    ``sum_v p_t(v) log p_t(v)``) and ``num_classes`` = ``C``. ``shape`` is the dense logits'
    shape ``[..., C]``, so shape checks against the student's logits work unchanged.
    """

    indices: Tensor
    weights: Tensor
    neg_entropy: Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.indices.shape[:-1], self.num_classes))

    def dim(self) -> int:
        return self.indices.dim()

    def where_valid(self, valid: Tensor) -> SampledLogits:
        """A copy whose rows outside ``valid`` (the leading shape, bool) weigh nothing (token 0,
        weight 0, negative entropy 0): a cache's padding rows hold zeros, which a mask drops."""
        keep = valid.unsqueeze(-1)
        return SampledLogits(torch.where(keep, self.indices, torch.zeros_like(self.indices)),
                             torch.where(keep, self.weights, torch.zeros_like(self.weights)),
                             torch.where(valid, self.neg_entropy,
                                         torch.zeros_like(self.neg_entropy)),
                             self.num_classes)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        raise TopKLogitsError(
            f"'{name}' is not available: the teacher's logits are {self.k} tokens sampled from "
            f"its distribution over {self.num_classes} classes (a teacher cache with sample), "
            "and only the forward KL at temperature 1 (forward_kl) reads them; build the cache "
            "with dense or top-k logits for this loss")


def sample_logits(logits: Tensor, draws: int, proposal_temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> SampledLogits:
    """``draws`` tokens per row of ``logits`` ``[..., C]`` drawn with replacement from
    ``r = softmax(z / proposal_temperature)`` (on the CPU, with ``generator``), their importance
    weights ``p(x) / (draws r(x))`` and the rows' negative entropy (see the module notes)."""
    if draws < 1:
        raise ValueError(f"sample_logits: draws must be at least 1, got {draws}")
    if not proposal_temperature > 0:
        raise ValueError(f"sample_logits: proposal_temperature must be > 0, got "
                         f"{proposal_temperature!r}")
    z = logits.detach().float().cpu().reshape(-1, logits.shape[-1])
    log_p = F.log_softmax(z, dim=-1)
    log_r = log_p if proposal_temperature == 1.0 else F.log_softmax(z / proposal_temperature, -1)
    indices = torch.multinomial(log_r.exp(), draws, replacement=True, generator=generator)
    weights = (log_p.gather(1, indices) - log_r.gather(1, indices)).exp() / draws
    neg_entropy = (log_p.exp() * log_p).nan_to_num().sum(-1)  # 0 log 0 = 0 (-inf logits)
    lead = logits.shape[:-1]
    return SampledLogits(indices.reshape(*lead, draws), weights.reshape(*lead, draws),
                         neg_entropy.reshape(lead), logits.shape[-1])


def sampled_kl(student_logits: Tensor, teacher: SampledLogits,
               temperature: float = 1.0) -> Tensor:
    """The unbiased estimate of ``KL(p_t || p_s)`` for every row, ``[...]``::

        KL_hat = s - sum_j w_j log p_s(x_j),   p_s = softmax(z_s)

    (``s`` the teacher's negative entropy, ``x_j`` the draws, ``w_j`` their importance
    weights; see the module notes). Random-sampling KD: Anshumann et al. (2025), "Sparse Logit
    Sampling: Accelerating Knowledge Distillation in LLMs". The draws estimate the teacher at
    temperature 1 only: any other ``temperature`` is refused."""
    if temperature != 1.0:
        raise ValueError(f"sampled teacher logits estimate the teacher's distribution at "
                         f"temperature 1; a tempered one (temperature {temperature}) needs the "
                         "whole row's logits: set temperature 1, or cache dense or top-k logits")
    if tuple(student_logits.shape) != tuple(teacher.shape):
        raise ValueError(f"sampled_kl: student and teacher shapes must match, got student "
                         f"{tuple(student_logits.shape)} and teacher {tuple(teacher.shape)}")
    log_q = F.log_softmax(_as_float(student_logits), dim=-1)
    drawn = log_q.gather(-1, teacher.indices)
    return teacher.neg_entropy - (teacher.weights * drawn).sum(-1)
