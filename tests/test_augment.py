"""Augmentations: images keep shape and value range and change as documented; token
augmentations respect the attention mask, keep padding and move per-token tensors with their
tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdistill import augment

PAD = 0
CLS, SEP = 101, 102


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_shift_is_a_translation_with_fill() -> None:
    images = torch.rand(16, 2, 6, 5) + 1.0  # values > 1, so the fill (0) is recognisable
    shifted = augment.random_shift(images, 2, fill=0.0, generator=seeded())
    assert shifted.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    offsets = []
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[i, :, dy:dy + 6, dx:dx + 5], shifted[i])]
        assert len(matches) == 1, f"image {i} is not a shifted copy"
        offsets.append(matches[0])
    assert len(set(offsets)) > 3  # offsets are drawn per image
    assert torch.equal(augment.random_shift(images, 0), images)


def test_random_erasing_blanks_one_box_per_image() -> None:
    images = torch.ones(32, 3, 10, 10)
    erased = augment.random_erasing(images, 1.0, area=(0.1, 0.2), value=0.5, generator=seeded())
    assert erased.shape == images.shape
    for image in erased:
        box = image[0] == 0.5
        assert torch.equal(box.expand(3, -1, -1), image == 0.5)  # every channel, same box
        rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert int(box.sum()) == height * width  # one filled rectangle
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
        assert 5 <= height * width <= 28  # 10-20% of 100 pixels, sides rounded
    assert torch.equal(augment.random_erasing(images, 0.0), images)


def test_gaussian_noise_size_and_clamp() -> None:
    x = torch.full((200, 100), 0.5)
    noisy = augment.gaussian_noise(x, 0.1, generator=seeded())
    assert (noisy - x).std().item() == pytest.approx(0.1, rel=0.03)
    clamped = augment.gaussian_noise(x, 1.0, generator=seeded(), value_range=(0.0, 1.0))
    assert clamped.min() == 0.0 and clamped.max() == 1.0
    with pytest.raises(ValueError, match="float tensor"):
        augment.gaussian_noise(torch.ones(3, dtype=torch.long), 0.1)


def test_augment_images_keeps_shape_range_and_is_reproducible() -> None:
    images = torch.rand(8, 1, 8, 8)
    first = augment.augment_images(images, noise_std=0.3, generator=seeded(3))
    again = augment.augment_images(images, noise_std=0.3, generator=seeded(3))
    assert first.shape == images.shape
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, images)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        augment.augment_images(torch.rand(8, 64))


def token_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[CLS, 11, 12, 13, 14, 15, 16, SEP, PAD, PAD],
                        [CLS, 21, 22, 23, SEP, PAD, PAD, PAD, PAD, PAD],
                        [CLS, 31, 32, 33, 34, 35, 36, 37, 38, SEP]])
    mask = (ids != PAD).long()
    # Per-token labels that name their token: they must travel with it.
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask * 7,
            "labels": labels, "index": torch.arange(3)}


def valid_tokens(batch: dict[str, torch.Tensor], row: int) -> list[int]:
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


def is_subsequence(part: list[int], whole: list[int]) -> bool:
    it = iter(whole)
    return all(token in it for token in part)


def test_token_deletion_closes_up_and_keeps_padding() -> None:
    batch = token_batch()
    out = augment.augment_tokens(batch, replace_probability=0, swap_probability=0,
                                 delete_probability=0.5, generator=seeded(1))
    assert out["input_ids"].shape == batch["input_ids"].shape
    deleted = 0
    for row in range(3):
        before, after = valid_tokens(batch, row), valid_tokens(out, row)
        assert is_subsequence(after, before)
        assert after[0] == CLS and after[-1] == SEP  # the ends are protected
        mask = out["attention_mask"][row]
        assert torch.equal(mask, torch.sort(mask, descending=True).values)  # right padding
        deleted += len(before) - len(after)
    assert deleted > 0
    old_padding = batch["attention_mask"] == 0
    assert torch.equal(out["input_ids"][old_padding], batch["input_ids"][old_padding])
    assert (out["attention_mask"][old_padding] == 0).all()
    freed = (batch["attention_mask"] == 1) & (out["attention_mask"] == 0)
    assert (out["input_ids"][freed] == PAD).all() and (out["labels"][freed] == -100).all()
    valid = out["attention_mask"].bool()
    assert torch.equal(out["labels"][valid], out["input_ids"][valid])  # labels moved along
    assert (out["token_type_ids"] == out["attention_mask"] * 7).all()


def test_token_swaps_exchange_neighbours_only() -> None:
    batch = token_batch()
    out = augment.augment_tokens(batch, replace_probability=0, swap_probability=0.5,
                                 delete_probability=0, generator=seeded(2))
    assert torch.equal(out["attention_mask"], batch["attention_mask"])
    changed = out["input_ids"] != batch["input_ids"]
    assert changed.any()
    for row, col in changed.nonzero().tolist():
        token = int(out["input_ids"][row, col])
        neighbours = batch["input_ids"][row, max(col - 1, 0):col + 2].tolist()
        assert token in neighbours and token not in (CLS, SEP, PAD)
    for row in range(3):
        assert sorted(valid_tokens(out, row)) == sorted(valid_tokens(batch, row))
    assert torch.equal(out["labels"], torch.where(out["attention_mask"].bool(),
                                                  out["input_ids"], -100))


def test_token_replacement_draws_batch_tokens_and_spares_protected_ones() -> None:
    batch = token_batch()
    out = augment.augment_tokens(batch, replace_probability=0.6, swap_probability=0,
                                 delete_probability=0, keep_ids=[13], generator=seeded(4))
    assert torch.equal(out["attention_mask"], batch["attention_mask"])
    changed = out["input_ids"] != batch["input_ids"]
    assert changed.any()
    pool = {t for t in batch["input_ids"].flatten().tolist() if t not in (CLS, SEP, PAD)}
    assert set(out["input_ids"][changed].tolist()) <= pool
    assert not changed[batch["attention_mask"] == 0].any()
    assert not changed[batch["input_ids"] == 13].any()
    assert (out["input_ids"][:, 0] == CLS).all()


def test_left_padding_stays_on_the_left() -> None:
    ids = torch.tensor([[PAD, PAD, CLS, 5, 6, 7, 8, SEP], [CLS, 1, 2, 3, 4, 5, 6, SEP]])
    batch = {"input_ids": ids, "attention_mask": (ids != PAD).long()}
    out = augment.augment_tokens(batch, replace_probability=0, swap_probability=0,
                                 delete_probability=0.7, generator=seeded(0))
    for row in range(2):
        mask = out["attention_mask"][row]
        assert torch.equal(mask, torch.sort(mask).values)  # padding first, tokens last
        assert is_subsequence(valid_tokens(out, row), valid_tokens(batch, row))
    assert out["attention_mask"].sum() < batch["attention_mask"].sum()


def test_token_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="missing \\['attention_mask'\\]"):
        augment.augment_tokens({"input_ids": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="delete_probability"):
        augment.augment_tokens(token_batch(), delete_probability=1.5)
