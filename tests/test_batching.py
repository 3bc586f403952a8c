"""Global batches and unit counts: a loss's mean over micro-batches, rescaled by local / global
unit counts, must equal its mean over the whole global batch."""

from __future__ import annotations

import pytest
import torch

from kdistill import losses
from kdistill.batching import epoch_global_batches, process_micro_batches, unit_counts


def token_batch(lengths: list[int], length: int = 6) -> dict[str, torch.Tensor]:
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"attention_mask": mask, "index": torch.arange(len(lengths)),
            "labels": torch.tensor([0, -100] * (len(lengths) // 2))}


def test_unit_counts_by_hand() -> None:
    counts = unit_counts(token_batch([6, 2, 3, 1]))
    assert counts == {"examples": 4.0, "labeled": 2.0, "tokens": 12.0,
                      "token_pairs": 36.0 + 4.0 + 9.0 + 1.0}


def test_labeled_count_uses_the_label_mask_for_regression_and_token_labels() -> None:
    targets = torch.tensor([0.5, float("nan"), -100.0, float("nan")])  # NaN = hidden target
    assert unit_counts({"labels": targets})["labeled"] == 2.0
    tokens = torch.tensor([[1, -100, 2], [-100, -100, 0]])  # counted per token
    assert unit_counts({"labels": tokens, "index": torch.arange(2)})["labeled"] == 3.0


def rescaled(loss, batch_parts, unit: str) -> torch.Tensor:
    counts = [unit_counts(part["batch"])[unit] for part in batch_parts]
    total = sum(counts)
    return sum(loss(part) * count / total for part, count in zip(batch_parts, counts, strict=True))


@pytest.mark.parametrize("unit,loss_name", [("token_pairs", "attention_mse"),
                                            ("tokens", "forward_kl"), ("tokens", "hidden_mse")])
def test_micro_batch_means_rescaled_equal_the_global_mean(unit: str, loss_name: str) -> None:
    torch.manual_seed(0)
    lengths = [6, 2, 5, 1, 3, 4]
    batch = token_batch(lengths)
    spec = losses.LOSSES[loss_name]
    assert spec.unit == unit
    if loss_name == "attention_mse":
        student, teacher = torch.rand(6, 2, 6, 6), torch.rand(6, 2, 6, 6)
    elif loss_name == "forward_kl":
        student, teacher = torch.randn(6, 6, 5), torch.randn(6, 6, 5)
    else:
        student, teacher = torch.randn(6, 6, 4), torch.randn(6, 6, 4)

    def loss(part: dict) -> torch.Tensor:
        rows = part["rows"]
        return spec.fn(student[rows], teacher[rows], mask=part["batch"]["attention_mask"])

    whole = spec.fn(student, teacher, mask=batch["attention_mask"])
    parts = [{"rows": rows, "batch": token_batch([lengths[i] for i in rows])}
             for rows in ([0, 1], [2, 3], [4, 5])]
    torch.testing.assert_close(rescaled(loss, parts, unit), whole)
    # Averaging the micro-batch means instead is wrong when the padding differs.
    naive = sum(loss(part) for part in parts) / len(parts)
    assert not torch.allclose(naive, whole)


def test_global_batches_do_not_depend_on_the_number_of_processes() -> None:
    indices = list(range(100))
    one = epoch_global_batches(indices, 32, 1, seed=3, phase=0, epoch=2)
    two = epoch_global_batches(indices, 32, 2, seed=3, phase=0, epoch=2)
    assert one == two[: len(one)]
    joined = [process_micro_batches(one[0], 2, rank, 2) for rank in range(2)]
    flat = [i for rank in joined for micro in rank for i in micro]
    assert flat == one[0] and len(joined[0]) == 2
    assert epoch_global_batches(indices, 32, 1, 3, 0, 3) != one  # a new order each epoch
