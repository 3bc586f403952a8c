"""What a cache stores for each tap, and how the stored rows become taps again.

Per tap ``name``, a shard holds:

* dense taps: the tensor itself, ``name`` ``[rows, ...]``, float tensors in the cache's dtype;
* top-k logits: ``name.topk.values`` ``[rows, ..., k]`` (the cache's dtype),
  ``name.topk.indices`` and ``name.topk.tail`` (float32), see
  :class:`kdistill.losses.TopKLogits`;
* sampled logits: ``name.sampled.indices`` ``[rows, ..., k]`` (the k draws),
  ``name.sampled.weights`` (float32, their importance weights) and ``name.sampled.entropy``
  ``[rows, ...]`` (float32, the teacher's negative entropy), see
  :class:`kdistill.losses.SampledLogits`;
* class ids (top-k and sampled indices) are int16 for up to 65,536 classes (ids of 32,768 and
  more stored as ``id - 65536``, read back modulo 65,536: a 49,152-token vocabulary fits),
  int32 beyond;
* slice taps (``slice:...``, a :class:`kdistill.losses.TokenSlice` of k tokens of width d):
  ``name.slice.positions`` ``[rows, k]`` (int32, -1 for an empty slot), and the kept entries
  only, ``name.slice.values`` ``[rows, K]`` (the cache's dtype) at ``name.slice.entries``
  ``[rows, K]`` (int32 indices into the row's k x d entries, -1 past its last), K being the
  most a row can keep, max(1, floor(width k d));
* for a tap with a sequence dimension (dim 1) whose length varies from batch to batch (text
  padded per batch), ``name.length`` (int32): each row's length. Rows are padded with zeros to
  the shard's longest, and positions past a row's length hold zeros.

A language model's logits ``[B, L, V]`` follow the batch's ``attention_mask`` like any
per-token logits: every position of a row's prefix is stored, the labelled ones (the batch's
``token_mask``) and the others (a prompt's positions, the last token of a text) alike, as
dense rows of fixed width cannot leave positions out; the losses read the labelled ones.

A row's length comes from a mask. Per-sample and per-word taps (``logits``) follow the batch's
``attention_mask`` (layout ``batch``): the cache answers them as long as the asking batch's
mask. A model that tokenises the raw text itself reports its tokens' mask; its token-level taps
(hidden states, embeddings, module outputs) follow that (layout ``tokens``) and are answered as
long as the longest row asked, which is how the model pads a batch. Where the live teacher
computes values for padding positions, the cache gives zeros; every masked loss ignores them.
A tap whose shape varies with no mask to explain it (attention maps of varying length) cannot
be cached.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.cache.format import DTYPES, CacheError, HiddenSlice, LogitSample
from kdistill.losses import SampledLogits, TokenSlice, TopKLogits, sample_logits
from kdistill.taps import SliceTap, parse_tap

LENGTH = ".length"
TOPK = (".topk.values", ".topk.indices", ".topk.tail")
SAMPLED = (".sampled.indices", ".sampled.weights", ".sampled.entropy")
SHORT_IDS = 1 << 16  # class ids below it are stored in 16 bits
SLICE = (".slice.positions", ".slice.values", ".slice.entries")
BATCH, TOKENS = "batch", "tokens"


@dataclass(frozen=True)
class TapStorage:
    """How one tap is stored: ``top_k`` or ``sample`` (logits only), the float ``dtype``, a
    hidden slice."""

    name: str
    dtype: str
    top_k: int | None = None
    slice: HiddenSlice | None = None
    sample: LogitSample | None = None


@dataclass(frozen=True)
class TapLayout:
    """What a built tap looks like: its sequence ``layout`` (``batch``, ``tokens`` or ``None``
    for a fixed shape); for top-k or ``sampled`` logits, the number of classes; for a slice
    tap, the hidden state's width ``features``."""

    layout: str | None
    classes: int | None = None
    features: int | None = None
    sampled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "classes": self.classes, "features": self.features,
                **({"sampled": True} if self.sampled else {})}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TapLayout:
        return cls(raw["layout"], raw["classes"], raw.get("features"), raw.get("sampled", False))


def pack_ids(ids: Tensor, classes: int) -> Tensor:
    """Class ids in as few bits as ``classes`` allows: int16 up to :data:`SHORT_IDS` classes
    (ids from 32,768 on wrap to ``id - 65536``), int32 beyond."""
    if classes > SHORT_IDS:
        return ids.int()
    return torch.where(ids >= SHORT_IDS // 2, ids - SHORT_IDS, ids).to(torch.int16)


def unpack_ids(stored: Tensor) -> Tensor:
    """The int64 class ids :func:`pack_ids` stored."""
    ids = stored.long()
    return ids % SHORT_IDS if stored.dtype == torch.int16 else ids


def prefix_lengths(mask: Tensor, tap: str) -> Tensor:
    """The length of every row of a ``[B, T]`` mask that marks a prefix of each row."""
    valid = mask.bool()
    lengths = valid.sum(dim=1)
    if not torch.equal(valid, torch.arange(valid.shape[1], device=valid.device) <
                       lengths.unsqueeze(1)):
        raise CacheError(f"tap '{tap}': the attention mask does not mark a prefix of each row "
                         "(padding on the left?); the cache stores rows padded on the right")
    return lengths


def sequence_of(name: str, value: Tensor, batch_mask: Tensor | None,
                token_mask: Tensor | None) -> tuple[str | None, Tensor | None]:
    """The layout and row lengths of tap ``name``'s ``value`` in one batch (see the module
    notes): ``(None, None)`` for a tap without a masked sequence dimension."""
    if value.dim() < 3:
        return None, None
    layout, mask = ((BATCH, batch_mask) if name == "logits" or token_mask is None
                    else (TOKENS, token_mask))
    if mask is None or tuple(mask.shape) != tuple(value.shape[:2]):
        return None, None
    return layout, prefix_lengths(mask, name)


def _sliced(value: Tensor, lengths: Tensor | None, cut: HiddenSlice,
            name: str) -> Tensor:
    if cut.positions is not None:
        if value.dim() < 3:
            raise CacheError(f"tap '{name}' has no positions (shape {list(value.shape)}); "
                             "slice it by width only")
        shortest = int(lengths.min()) if lengths is not None else value.shape[1]
        if max(cut.positions) >= shortest:
            raise CacheError(f"tap '{name}': slice position {max(cut.positions)} is past the "
                             f"end of a row of {shortest} positions")
        value = value[:, list(cut.positions)]
    if cut.width is not None:
        if cut.width > value.shape[-1]:
            raise CacheError(f"tap '{name}': slice width {cut.width} exceeds its "
                             f"{value.shape[-1]} features")
        value = value[..., :cut.width]
    return value


def _zero_padding(value: Tensor, lengths: Tensor) -> Tensor:
    """``value`` with the positions past each row's length set to zero."""
    valid = torch.arange(value.shape[1], device=value.device) < lengths.unsqueeze(1)
    return torch.where(valid.view(*valid.shape, *[1] * (value.dim() - 2)), value,
                       torch.zeros((), dtype=value.dtype, device=value.device))


def slice_capacity(tap: SliceTap, features: int) -> int:
    """K, the most entries a row of a slice tap keeps: max(1, floor(width k d))."""
    assert tap.tokens is not None
    return max(1, math.floor(tap.width * tap.tokens * features))


def encode_slice(storage: TapStorage, value: TokenSlice) -> tuple[dict[str, Tensor], TapLayout]:
    """The positions and the kept entries of one batch of a slice tap (see the module notes)."""
    tap = parse_tap(storage.name)
    assert isinstance(tap, SliceTap)
    if tap.tokens is None:
        raise CacheError(f"tap '{tap.name}' keeps every token (tokens=all), as many as each "
                         f"batch has; cache the hidden state itself ('{tap.hidden}') or a "
                         "slice of a number of tokens")
    rows, _, features = value.values.shape
    capacity = slice_capacity(tap, features)
    kept = value.kept.reshape(rows, -1)
    counts = kept.sum(dim=1)
    if int(counts.max()) > capacity:
        raise CacheError(f"tap '{tap.name}': a row keeps {int(counts.max())} entries, more than "
                         f"the {capacity} its width allows")
    # The kept entries first (in entry order), then the others, cut to the capacity.
    order = (~kept).to(torch.int8).argsort(dim=1, stable=True)[:, :capacity]
    filled = torch.arange(capacity, device=kept.device) < counts.unsqueeze(1)
    entries = torch.where(filled, order, torch.full_like(order, -1))
    values = value.values.reshape(rows, -1).gather(1, order).masked_fill(~filled, 0.0)
    stored = (value.positions.int(), values.to(DTYPES[storage.dtype]), entries.int())
    return ({tap.name + suffix: t.cpu() for suffix, t in zip(SLICE, stored, strict=True)},
            TapLayout(None, features=features))


def decode_slice(positions: Tensor, values: Tensor, entries: Tensor,
                 features: int) -> TokenSlice:
    """The :class:`TokenSlice` a slice tap's stored rows hold (float32 values)."""
    rows, tokens = positions.shape
    size = tokens * features
    where = torch.where(entries >= 0, entries.long(), size)  # padding goes to a spare column
    dense = values.new_zeros((rows, size + 1), dtype=torch.float32).scatter_(
        1, where, values.float())
    kept = torch.zeros((rows, size + 1), dtype=torch.bool, device=values.device).scatter_(
        1, where, True)
    shape = (rows, tokens, features)
    return TokenSlice(positions.long(), dense[:, :size].reshape(shape),
                      kept[:, :size].reshape(shape))


def encode_tap(storage: TapStorage, value: Tensor | TokenSlice, batch_mask: Tensor | None,
               token_mask: Tensor | None, generator: torch.Generator | None = None
               ) -> tuple[dict[str, Tensor], TapLayout]:
    """The tensors to store for one batch of a tap (on the CPU), and the tap's layout;
    ``generator`` draws the tokens of sampled logits."""
    name = storage.name
    if isinstance(value, TokenSlice):
        return encode_slice(storage, value)
    layout, lengths = sequence_of(name, value, batch_mask, token_mask)
    if storage.slice is not None:
        value = _sliced(value, lengths, storage.slice, name)
        if storage.slice.positions is not None:
            layout, lengths = None, None
    if lengths is not None:
        value = _zero_padding(value, lengths)
    dtype = DTYPES[storage.dtype]
    stored: dict[str, Tensor] = {}
    classes = None
    if storage.top_k is not None:
        classes = value.shape[-1]
        if storage.top_k >= classes:
            raise CacheError(f"tap '{name}': top_k {storage.top_k} keeps all {classes} classes; "
                             "store dense logits (no top_k) instead")
        values, indices = value.float().topk(storage.top_k, dim=-1)
        tail = value.float().scatter(-1, indices, float("-inf")).logsumexp(dim=-1)
        if lengths is not None:
            tail = _zero_padding(tail.unsqueeze(-1), lengths).squeeze(-1)
            indices = _zero_padding(indices, lengths)
        stored.update(zip(TOPK, (values.to(dtype), pack_ids(indices, classes), tail.float()),
                          strict=True))
    elif storage.sample is not None:
        classes = value.shape[-1]
        drawn = sample_logits(value, storage.sample.draws, storage.sample.proposal_temperature,
                              generator)
        ids, weights, entropy = drawn.indices, drawn.weights, drawn.neg_entropy
        if lengths is not None:  # the draws are on the CPU
            at = lengths.cpu()
            ids, weights = _zero_padding(ids, at), _zero_padding(weights, at)
            entropy = _zero_padding(entropy.unsqueeze(-1), at).squeeze(-1)
        stored.update(zip(SAMPLED, (pack_ids(ids, classes), weights.float(), entropy.float()),
                          strict=True))
    else:
        stored[""] = value.to(dtype) if value.is_floating_point() else value
    if lengths is not None:
        stored[LENGTH] = lengths.int()
    return ({name + suffix: t.cpu() for suffix, t in stored.items()},
            TapLayout(layout, classes, sampled=storage.sample is not None))


def assemble(parts: Sequence[Mapping[str, Tensor]], padded: Collection[str]) -> dict[str, Tensor]:
    """One shard's tensors from its batches' ``parts``: rows concatenated, the ``padded`` ones
    (the tensors of sequence taps) padded with zeros along dim 1 to the shard's longest first."""
    shard: dict[str, Tensor] = {}
    for key in parts[0]:
        pieces = [part[key] for part in parts]
        if key in padded:
            longest = max(p.shape[1] for p in pieces)
            pieces = [pad_to(p, longest) for p in pieces]
        if len({p.shape[1:] for p in pieces}) > 1:
            shapes = sorted({tuple(p.shape[1:]) for p in pieces})
            raise CacheError(f"tap '{key}' has rows of shapes {shapes} in different batches and "
                             "no attention mask tells each row's length; it cannot be cached")
        shard[key] = torch.cat(pieces)
    return shard


def pad_to(value: Tensor, length: int) -> Tensor:
    """Rows ``[B, T, ...]`` padded with zeros, or cut, along dim 1 to ``length`` (only padding
    is ever cut: the rows' lengths are checked first)."""
    if value.shape[1] >= length:
        return value[:, :length]
    padding = [0, 0] * (value.dim() - 2) + [0, length - value.shape[1]]
    return F.pad(value, padding)


# -- reading ----------------------------------------------------------------------------------
def value_keys(name: str, layout: TapLayout) -> list[str]:
    """The stored tensors of tap ``name``'s values (its lengths aside)."""
    if layout.sampled:
        return [name + suffix for suffix in SAMPLED]
    if layout.classes is not None:
        return [name + suffix for suffix in TOPK]
    if layout.features is not None:
        return [name + suffix for suffix in SLICE]
    return [name]


def answer_length(name: str, layout: str, lengths: Tensor, batch: Mapping[str, Any]) -> int:
    """How long the sequence dimension of tap ``name`` is in the answer to ``batch``: the
    batch's mask's for ``batch`` layout, the longest row's for ``tokens`` layout."""
    if layout == TOKENS:
        return int(lengths.max()) if len(lengths) else 0
    mask = batch.get("attention_mask")
    if not isinstance(mask, Tensor):
        raise CacheError(f"tap '{name}' follows the batch's attention_mask, and this batch has "
                         f"none (keys: {sorted(batch)})")
    if len(lengths) and int(lengths.max()) > mask.shape[1]:
        raise CacheError(f"tap '{name}': a cached row has {int(lengths.max())} positions, the "
                         f"batch's attention_mask only {mask.shape[1]}")
    return mask.shape[1]


def as_taps(tensors: Mapping[str, Tensor], name: str, layout: TapLayout,
            device: Any) -> Tensor | TopKLogits | SampledLogits | TokenSlice:
    """The tap ``name`` from its gathered tensors, on ``device``: float32 for the losses,
    :class:`TopKLogits` for top-k logits, :class:`SampledLogits` for sampled ones, or a
    :class:`TokenSlice` for a slice tap."""
    if layout.features is not None:
        positions, values, entries = (tensors[name + suffix].to(device) for suffix in SLICE)
        return decode_slice(positions, values, entries, layout.features)
    if layout.classes is None:
        value = tensors[name].to(device)
        return value.float() if value.is_floating_point() else value
    if layout.sampled:
        ids, weights, entropy = (tensors[name + suffix].to(device) for suffix in SAMPLED)
        return SampledLogits(unpack_ids(ids), weights.float(), entropy.float(), layout.classes)
    values, indices, tail = (tensors[name + suffix].to(device) for suffix in TOPK)
    return TopKLogits(values.float(), unpack_ids(indices), tail.float(), layout.classes)
