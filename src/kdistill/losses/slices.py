"""Token slices of a hidden state: the few tokens and the few entries of a teacher's hidden
state that hidden-state knowledge compression distils (Liu, Meng, Lin, Wang & Zhou 2021,
"Marginal Utility Diminishes: Exploring the Minimum Knowledge for BERT Knowledge
Distillation").

For one sample with valid tokens V (its token mask), [SEP] tokens S and a teacher hidden state
H [L, d], a slice keeps

* length: the ``tokens`` positions P of V minus S whose pre-softmax attention score from the
  [CLS] token (position 0), averaged over the heads of one self-attention layer, is largest:
  a_j = (1/h) sum_i q_i,0 . k_i,j / sqrt(d_head) (the [CLS] token itself can be kept; a
  sample with fewer candidates keeps them all);
* width: the K = max(1, floor(width |P| d)) entries of H[P] of largest magnitude |H[p, c]|.

:class:`TokenSlice` carries the result for a batch, ``positions`` [B, k] (-1 marks an empty
slot), ``values`` [B, k, d] (the kept entries, 0 elsewhere) and ``kept`` [B, k, d]; a teacher
cache stores only the positions and the kept entries. :func:`sliced_mse` compares a student's
hidden state with it. The selection reads the teacher only, so it is the same for every
student and can be computed once, before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Dropped = Literal["zero", "ignore"]


@dataclass(frozen=True, eq=False)
class TokenSlice:
    """A batch of hidden-state slices (see the module notes): ``positions`` [B, k] (int64, -1
    for an empty slot), ``values`` [B, k, d] (float, 0 outside ``kept``), ``kept`` [B, k, d]
    (bool; False in empty slots).

    It travels through teacher sources like a tensor tap: :meth:`float`, :meth:`clone`,
    :meth:`detach` and :meth:`to` apply to its tensors."""

    positions: Tensor
    values: Tensor
    kept: Tensor

    @property
    def slots(self) -> Tensor:
        """[B, k] bool: the slots that hold a token."""
        return self.positions >= 0

    def float(self) -> TokenSlice:
        return TokenSlice(self.positions, self.values.float(), self.kept)

    def clone(self) -> TokenSlice:
        return TokenSlice(self.positions.clone(), self.values.clone(), self.kept.clone())

    def detach(self) -> TokenSlice:
        return TokenSlice(self.positions.detach(), self.values.detach(), self.kept.detach())

    def to(self, device: torch.device | str) -> TokenSlice:
        return TokenSlice(self.positions.to(device), self.values.to(device),
                          self.kept.to(device))


def cls_attention_positions(query: Tensor, key: Tensor, candidates: Tensor,
                            tokens: int) -> Tensor:
    """[B, tokens] positions of the ``candidates`` ([B, L] bool) with the largest [CLS]
    attention score (the mean over heads of the pre-softmax scores of position 0's row, from
    a layer's ``query`` and ``key`` projections [B, L, H, d_head]), largest first; -1 fills
    the slots of a row with fewer candidates."""
    scores = torch.einsum("bhd,blhd->bl", query[:, 0], key) / (math.sqrt(query.shape[-1])
                                                                * query.shape[2])
    scores = scores.masked_fill(~candidates, float("-inf"))
    length = scores.shape[1]
    best, positions = scores.topk(min(tokens, length), dim=1)
    positions = positions.masked_fill(best == float("-inf"), -1)
    if length < tokens:
        positions = torch.cat([positions, positions.new_full((len(positions),
                                                              tokens - length), -1)], dim=1)
    return positions


def magnitude_mask(values: Tensor, slots: Tensor, width: float) -> Tensor:
    """[B, k, d] bool: per row, the max(1, floor(width n d)) entries of ``values`` [B, k, d]
    of largest magnitude among its n filled ``slots`` [B, k] (none for a row without any); ties
    go to the earlier entry."""
    rows, k, d = values.shape
    magnitude = values.abs().masked_fill(~slots.unsqueeze(-1), -1.0).reshape(rows, k * d)
    keep = torch.clamp((width * slots.sum(dim=1) * d).floor(), min=1)
    keep = torch.where(slots.any(dim=1), keep, torch.zeros_like(keep))
    order = magnitude.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k * d, device=order.device)
                                            .expand_as(order))
    return (rank < keep.unsqueeze(1)).reshape(rows, k, d)


def slice_tokens(hidden: Tensor, mask: Tensor, *, query: Tensor | None = None,
                 key: Tensor | None = None, token_ids: Tensor | None = None,
                 tokens: int | None, width: float, sep_id: int | None) -> TokenSlice:
    """The slice of ``hidden`` [B, L, d] (see the module notes): ``tokens`` positions chosen by
    [CLS] attention (``query`` and ``key`` [B, L, H, d_head] of the attention layer; [SEP]
    tokens, ``token_ids == sep_id``, never kept), or every valid token when ``tokens`` is
    ``None``; then the ``width`` fraction of their entries of largest magnitude. ``mask``
    [B, L] marks the valid tokens."""
    valid = mask.bool()
    if tokens is None:
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device).expand(len(hidden), length)
        positions = positions.masked_fill(~valid, -1)
    else:
        if query is None or key is None:
            raise ValueError("a slice of a few tokens needs the query and key projections of "
                             "the layer whose [CLS] attention chooses them")
        candidates = valid
        if sep_id is not None:
            if token_ids is None:
                raise ValueError("excluding [SEP] tokens needs the token ids")
            candidates = valid & (token_ids != sep_id)
        positions = cls_attention_positions(query, key, candidates, tokens)
    gathered = gather_tokens(hidden, positions)
    slots = (positions >= 0).unsqueeze(-1).expand_as(gathered)
    kept = slots.clone() if width >= 1 else magnitude_mask(gathered, positions >= 0, width)
    return TokenSlice(positions, gathered.masked_fill(~kept, 0.0), kept)


def gather_tokens(hidden: Tensor, positions: Tensor) -> Tensor:
    """[B, k, d]: the rows of ``hidden`` [B, L, d] at ``positions`` [B, k] (0 for -1)."""
    index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index).masked_fill((positions < 0).unsqueeze(-1), 0.0)


def sliced_mse(student: Tensor, teacher: TokenSlice, dropped: Dropped = "zero") -> Tensor:
    """Mean over samples of each sample's mean squared difference between ``student`` [B, k, d]
    (the student's features at the slice's positions, :func:`gather_tokens`, projected to
    the teacher's width) and the teacher's slice.

    ``dropped``: ``zero`` compares every entry of the kept tokens with the masked teacher
    (dropped entries count as teacher value 0, as the paper's code compares
    MSE(H_s, M * H_t)): (1/(n d)) sum_{p, c} (S[p, c] - M[p, c] H_t[p, c])^2;
    ``ignore`` only the kept entries: (1/K) sum_{(p, c) kept} (S[p, c] - H_t[p, c])^2.
    A sample without any kept token contributes 0."""
    compared = teacher.kept if dropped == "ignore" else \
        teacher.slots.unsqueeze(-1).expand_as(teacher.kept)
    squared = ((student - teacher.values) ** 2) * compared
    per_sample = squared.flatten(1).sum(dim=1) / compared.flatten(1).sum(dim=1).clamp(min=1)
    return per_sample.mean()
