"""Top-k teacher logits: each row's k largest logits and one bucket for all the other classes.

A teacher cache (:mod:`kdistill.cache`) can store, in place of a row's ``C`` logits ``z``, the
k largest ``z_i`` (``i`` in ``K``, ``|K| = k``, largest first), their class ids and the tail's
logit as one bucket, ``t = log sum_{j not in K} exp(z_j)`` (float32). At a vocabulary of 30k
and k = 32 a row shrinks about 450 times. :class:`TopKLogits` carries them; the KL losses
:func:`kdistill.losses.kd` and :func:`kdistill.losses.forward_kl` accept it as the teacher's
logits (see :func:`kdistill.losses.logits.topk_kl` for the formula), as do the token-level
:func:`kdistill.losses.tvd` and :func:`kdistill.losses.generalized_jsd` (over the same k + 1
buckets, see :mod:`kdistill.losses.sequence`); every other use fails with
:class:`TopKLogitsError`, which says so.

The tail is stored as a log-sum-exp of its own (rather than the row's log-sum-exp ``L``, from
which ``1 - sum_K p_i`` would be the tail) so that a tail mass of 1e-6 stays exact when the kept
logits are stored in 16 bits: the bucket probabilities are normalised over ``[z_K, t]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TopKLogits", "TopKLogitsError"]


class TopKLogitsError(AttributeError):
    """A tensor operation asked of sparse teacher logits (:class:`TopKLogits`,
    :class:`~kdistill.losses.sampled.SampledLogits`), which only some losses read."""


@dataclass(frozen=True, eq=False)
class TopKLogits:
    """The top-k logits of every row of ``[..., C]`` teacher logits.

    ``values`` ``[..., k]`` (float, largest first), ``indices`` ``[..., k]`` (int64 class ids),
    ``tail`` ``[...]`` (float: ``log sum exp`` of the other ``C - k`` logits) and
    ``num_classes`` = ``C``. ``shape`` is the dense logits' shape ``[..., C]``, so shape checks
    against the student's logits work unchanged.
    """

    values: Tensor
    indices: Tensor
    tail: Tensor
    num_classes: int

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.values.shape[:-1], self.num_classes))

    def dim(self) -> int:
        return self.values.dim()

    def bucket_log_probs(self, temperature: float = 1.0) -> Tensor:
        """``log P`` over the ``k + 1`` buckets (the kept classes, then the tail) at
        ``temperature`` T: ``P = softmax([z_K / T, log n + (t - log n) / T])`` with ``n = C - k``
        tail classes - exact at T = 1; at other T as if the tail's mass were spread evenly
        over its classes (see :func:`kdistill.losses.logits.topk_kl`)."""
        n = self.num_classes - self.k
        tail = math.log(n) + (self.tail.float() - math.log(n)) / temperature
        buckets = torch.cat([self.values.float() / temperature, tail.unsqueeze(-1)], dim=-1)
        return F.log_softmax(buckets, dim=-1)

    def where_valid(self, valid: Tensor) -> TopKLogits:
        """A copy whose rows outside ``valid`` (the leading shape, bool) are a harmless
        placeholder (kept logits 0 on classes ``0..k-1``, tail 0) that a mask then drops:
        padding rows of a cache hold zeros, whose repeated class ids mean nothing."""
        keep = valid.unsqueeze(-1)
        placeholder = torch.arange(self.k, device=self.indices.device).expand_as(self.indices)
        return TopKLogits(torch.where(keep, self.values, torch.zeros_like(self.values)),
                          torch.where(keep, self.indices, placeholder),
                          torch.where(valid, self.tail, torch.zeros_like(self.tail)),
                          self.num_classes)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        raise TopKLogitsError(
            f"'{name}' is not available: the teacher's logits are top-k logits (k={self.k} of "
            f"{self.num_classes} classes, from a teacher cache) and only the KL losses kd and "
            "forward_kl (and the token-level tvd and generalized_jsd) read them; build the "
            "cache with dense logits (no top_k) for this recipe")
