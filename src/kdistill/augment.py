"""Simple data augmentations for training batches (images, token sequences, any float tensor).

Every function works on a whole batch already on its device and draws its randomness from
torch's global RNG (which the engine checkpoints, so a resumed run augments exactly as an
uninterrupted one), or from ``generator`` when one is given. Shapes never change.

Images (``[B, C, H, W]``):

* :func:`random_shift` - translate each image by up to ``max_shift`` pixels in each direction,
  filling the uncovered border with ``fill``: the "random crop with padding" of CIFAR training;
* :func:`random_erasing` - with probability ``p`` blank one rectangle of each image (Zhong et
  al. 2020, "Random Erasing Data Augmentation");
* :func:`gaussian_noise` - add N(0, std^2) noise (any float tensor);
* :func:`augment_images` - all three, then clamp to the value range.

Token sequences (``input_ids`` and ``attention_mask`` ``[B, L]``, in the style of EDA, Wei & Zou
2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text Classification
Tasks"): :func:`augment_tokens` replaces, swaps and deletes valid tokens. Padding positions are
never touched and never become tokens; deleted tokens close up and the freed positions become
padding on the batch's padding side, so padding stays contiguous.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.batch import hidden_like

PaddingSide = Literal["right", "left"]
TOKEN_KEYS = ("input_ids", "attention_mask")


def _check_images(fn: str, images: Tensor) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{fn}: images must be a float tensor [B, C, H, W], got "
                         f"{tuple(images.shape)} of {images.dtype}")


def _uniform(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(tuple(shape), device=like.device, generator=generator)


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator | None = None,
                   value_range: tuple[float, float] | None = None) -> Tensor:
    """``x + std * N(0, 1)`` for any float tensor, clamped to ``value_range`` when given."""
    if not x.is_floating_point():
        raise ValueError(f"gaussian_noise: needs a float tensor, got {x.dtype}")
    if std < 0:
        raise ValueError(f"gaussian_noise: std must be >= 0, got {std}")
    noisy = x + std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return noisy if value_range is None else noisy.clamp(*value_range)


def random_shift(images: Tensor, max_shift: int, fill: float = 0.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by its own integer offsets (dy, dx) in [-max_shift, max_shift].

    Equivalent to padding every side by ``max_shift`` with ``fill`` and cropping an ``H x W``
    window at a uniformly drawn position.
    """
    _check_images("random_shift", images)
    if max_shift < 0:
        raise ValueError(f"random_shift: max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=fill)
    offsets = (_uniform((2, b), images, generator) * (2 * max_shift + 1)).long()
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # [B, W]
    batch = torch.arange(b, device=images.device)[:, None, None]
    # Advanced indices around a slice put their dimensions first: [B, H, W, C].
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def random_erasing(images: Tensor, probability: float, area: tuple[float, float] = (0.02, 0.25),
                   aspect: tuple[float, float] = (0.3, 3.3), value: float = 0.0,
                   generator: torch.Generator | None = None) -> Tensor:
    """With ``probability``, set one rectangle of each image to ``value`` (all channels).

    The rectangle covers a fraction of the image drawn uniformly from ``area`` with an aspect
    ratio h/w drawn log-uniformly from ``aspect``, sides rounded and clipped to the image, at a
    uniform position where it fits (Zhong et al. 2020 draw it the same way; they retry a box
    that does not fit, here it is clipped).
    """
    _check_images("random_erasing", images)
    if not 0 <= probability <= 1:
        raise ValueError(f"random_erasing: probability must be in [0, 1], got {probability}")
    if not 0 < area[0] <= area[1] <= 1 or not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"random_erasing: need 0 < area[0] <= area[1] <= 1 and "
                         f"0 < aspect[0] <= aspect[1], got area {area}, aspect {aspect}")
    b, _, h, w = images.shape
    u = _uniform((5, b), images, generator)
    fraction = area[0] + (area[1] - area[0]) * u[0]
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    size = fraction * h * w
    eh = torch.sqrt(size * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(size / ratio).round().clamp(1, w).long()
    top = (u[2] * (h - eh + 1)).long()
    left = (u[3] * (w - ew + 1)).long()
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # [B, H]
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # [B, W]
    box = inside_rows[:, :, None] & inside_cols[:, None, :] & (u[4] < probability)[:, None, None]
    return images.masked_fill(box[:, None], value)


def augment_images(images: Tensor, *, max_shift: int = 1, noise_std: float = 0.1,
                   erase_probability: float = 0.5, erase_area: tuple[float, float] = (0.02, 0.25),
                   value_range: tuple[float, float] | None = (0.0, 1.0),
                   generator: torch.Generator | None = None) -> Tensor:
    """Shift, add Gaussian noise, erase a box, then clamp to ``value_range`` (when given).

    Shift borders and erased boxes are filled with the low end of ``value_range`` (0 without
    one), the background of images scaled to [0, 1].
    """
    fill = value_range[0] if value_range is not None else 0.0
    out = random_shift(images, max_shift, fill=fill, generator=generator)
    out = gaussian_noise(out, noise_std, generator=generator, value_range=value_range)
    return random_erasing(out, erase_probability, area=erase_area, value=fill,
                          generator=generator)


# -------------------------------------------------------------------------- token sequences


def _padding_side(mask: Tensor) -> PaddingSide:
    """``left`` when some row is padded and every padded row starts with padding."""
    padded = ~mask.all(dim=1)
    return "left" if padded.any() and not mask[padded, 0].any() else "right"


def _pairs(mask: Tensor, protected: Tensor, probability: float,
           generator: torch.Generator | None) -> Tensor:
    """Permutation [B, L] swapping some valid, unprotected neighbours (i, i + 1); a position
    drawn while its left neighbour was drawn too is dropped, so the swaps never overlap."""
    b, length = mask.shape
    movable = mask & ~protected
    start = (_uniform((b, length), mask, generator) < probability) & movable
    start[:, :-1] &= movable[:, 1:]
    start[:, -1] = False
    start[:, 1:] &= ~start[:, :-1].clone()
    order = torch.arange(length, device=mask.device).expand(b, length).clone()
    after = torch.zeros_like(start)
    after[:, 1:] = start[:, :-1]
    order[start] += 1
    order[after] -= 1
    return order


def _gather_tokens(batch: Mapping[str, Any], order: Tensor, new_mask: Tensor,
                   pad_id: int) -> dict[str, Any]:
    """Reorder every per-token tensor ([B, L, ...] like ``input_ids``) of the batch by
    ``order`` and install ``new_mask`` as ``attention_mask``.

    Positions that were padding and stay padding keep their values; positions freed by a
    deletion get ``pad_id`` in ``input_ids``, hidden labels in ``labels`` and 0 elsewhere.
    """
    shape = batch["input_ids"].shape
    old_mask = batch["attention_mask"].bool()
    out = dict(batch)
    for key, value in batch.items():
        if key == "attention_mask" or not isinstance(value, Tensor) or value.shape[:2] != shape:
            continue
        trailing = [1] * (value.dim() - 2)
        moved = value.gather(1, order.reshape(*shape, *trailing).expand_as(value))
        if key == "labels":
            freed = hidden_like(value)
        else:
            freed = torch.full_like(value, pad_id if key == "input_ids" else 0)
        padding = torch.where(old_mask.reshape(*shape, *trailing), freed, value)
        out[key] = torch.where(new_mask.reshape(*shape, *trailing), moved, padding)
    out["attention_mask"] = new_mask.to(batch["attention_mask"].dtype)
    return out


def _pad_id(ids: Tensor, mask: Tensor) -> int:
    """The id at a padding position of the batch (0 when nothing is padded)."""
    padding = ~mask
    return int(ids[padding][0]) if padding.any() else 0


def augment_tokens(batch: Mapping[str, Any], *, replace_probability: float = 0.1,
                   swap_probability: float = 0.1, delete_probability: float = 0.1,
                   keep_ids: Sequence[int] = (), keep_ends: bool = True,
                   pad_id: int | None = None,
                   generator: torch.Generator | None = None) -> dict[str, Any]:
    """A copy of a token batch with tokens replaced, swapped and deleted (in that order).

    * replace: each valid token, with ``replace_probability``, becomes a token drawn uniformly
      from the valid, unprotected tokens of the batch (the batch's own unigram distribution:
      no vocabulary size is needed and no special or padding id is introduced);
    * swap: each valid token, with ``swap_probability``, trades places with its right
      neighbour when both are valid and unprotected (swaps never overlap);
    * delete: each valid token, with ``delete_probability``, is removed; the remaining tokens
      close up and the freed positions become padding (``attention_mask`` 0) on the batch's
      padding side. A row keeps at least one token.

    Protected tokens - ids in ``keep_ids`` and, with ``keep_ends``, the first and last valid
    token of each row (``[CLS]``/``[SEP]``, ``<s>``/``</s>``) - are never replaced, moved
    relative to their neighbours or deleted. Every other per-token tensor of the batch
    (``token_type_ids``, per-token ``labels``...) is moved with its tokens. Padding keeps its
    ids and its mask; positions freed by deletion get ``pad_id`` (default: the id found at the
    batch's padding, 0 when nothing is padded).
    """
    for name, p in (("replace", replace_probability), ("swap", swap_probability),
                    ("delete", delete_probability)):
        if not 0 <= p <= 1:
            raise ValueError(f"augment_tokens: {name}_probability must be in [0, 1], got {p}")
    missing = [k for k in TOKEN_KEYS if k not in batch]
    if missing:
        raise ValueError(f"augment_tokens: the batch needs {list(TOKEN_KEYS)}; missing "
                         f"{missing} (keys: {sorted(batch)})")
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    if ids.dim() != 2 or mask.shape != ids.shape:
        raise ValueError(f"augment_tokens: input_ids and attention_mask must both be [B, L], got "
                         f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    b, length = ids.shape
    protected = torch.isin(ids, torch.as_tensor(list(keep_ids), dtype=ids.dtype,
                                                device=ids.device))
    if keep_ends:
        positions = torch.arange(length, device=ids.device).expand(b, length)
        first = torch.where(mask, positions, length).min(dim=1).values
        last = torch.where(mask, positions, -1).max(dim=1).values
        protected |= (positions == first[:, None]) | (positions == last[:, None])
    candidates = ids[mask & ~protected]
    out = dict(batch)
    if candidates.numel() and replace_probability > 0:
        replace = (_uniform((b, length), ids, generator) < replace_probability) & mask & \
            ~protected
        drawn = (_uniform((b, length), ids, generator) * candidates.numel()).long()
        out["input_ids"] = torch.where(replace, candidates[drawn], ids)
    pad = _pad_id(ids, mask) if pad_id is None else pad_id
    # Swaps involve unprotected tokens only, so ``protected`` still holds afterwards.
    out = _gather_tokens(out, _pairs(mask, protected, swap_probability, generator), mask, pad)
    drop = (_uniform((b, length), ids, generator) < delete_probability) & mask & ~protected
    drop &= ~(drop.sum(dim=1) == mask.sum(dim=1))[:, None]  # never empty a row
    kept = mask & ~drop
    # A stable sort moves kept tokens to the non-padding side, keeping their order.
    key = (~kept).long() if _padding_side(mask) == "right" else kept.long()
    order = torch.sort(key, dim=1, stable=True).indices
    return _gather_tokens(out, order, kept.gather(1, order), pad)
