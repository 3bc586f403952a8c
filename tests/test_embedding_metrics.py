"""The embedding task's metrics on hand-made embeddings whose answers are worked out here:
Spearman of pairwise cosines, NN@k overlap, the linear probe, and their place in the
evaluation's rows and reports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill.embedding_metrics import (
    MAX_ROWS,
    embedding_metrics,
    linear_probe,
    neighbour_overlap,
    probe_accuracy,
    sample_rows,
    similarity_spearman,
)
from kdistill.evaluate import benchmark_models
from kdistill.report import markdown_table


def at_angles(*degrees: float) -> torch.Tensor:
    """Unit vectors in the plane at ``degrees`` from the x axis."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_identical_or_rescaled_embeddings_agree_perfectly() -> None:
    teacher = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    scaled = teacher * torch.linspace(0.5, 3.0, 12).unsqueeze(1)  # cosines do not change
    assert similarity_spearman(scaled, teacher) == pytest.approx(1.0)
    assert neighbour_overlap(scaled, teacher) == 1.0  # k = 10 of the 11 others


def test_spearman_of_pairwise_cosines_has_the_worked_out_value() -> None:
    # Teacher pairs (0,1), (0,2), (1,2) at 30, 90, 60 degrees: cosines rank 3, 1, 2.
    # Student pairs at 60, 90, 30 degrees: ranks 2, 1, 3. d = (1, 0, -1), so
    # rho = 1 - 6 * 2 / (3 * (9 - 1)) = 0.5.
    teacher, student = at_angles(0, 30, 90), at_angles(0, 60, 90)
    assert similarity_spearman(student, teacher) == pytest.approx(0.5)
    assert math.isnan(similarity_spearman(student[:2], teacher[:2]))  # one pair: undefined


def test_nearest_neighbour_overlap_has_the_worked_out_value() -> None:
    # Teacher at 0, 10, 50, 60 degrees: nearest 1, 0, 3, 2; two nearest {1,2} {0,2} {3,1} {2,1}.
    # Student at 0, 40, 50, 130: nearest 1, 2, 1, 2: rows 0 and 3 agree, 2 / 4; two nearest
    # {1,2} {2,0} {1,0} {2,1}: shared 2, 2, 1, 2 of 2 each, 7 / 8.
    teacher, student = at_angles(0, 10, 50, 60), at_angles(0, 40, 50, 130)
    assert neighbour_overlap(student, teacher, k=1) == 0.5
    assert neighbour_overlap(student, teacher, k=2) == 7 / 8
    # k beyond the other rows takes them all: every row agrees.
    assert neighbour_overlap(student, teacher, k=10) == 1.0


def test_a_student_that_swaps_two_texts_scores_the_worked_out_values() -> None:
    # Teacher at 0, 20, 70, 150 degrees. Pairs (01, 02, 03, 12, 13, 23) at 20, 70, 150, 50,
    # 130, 80 degrees: ranks 1, 3, 6, 2, 5, 4. Swapping texts 0 and 1 puts them at 20, 50,
    # 130, 70, 150, 80: ranks 1, 2, 5, 3, 6, 4; d^2 sums to 4: rho = 1 - 6 * 4 / (6 * 35).
    teacher = at_angles(0, 20, 70, 150)
    swapped = teacher[[1, 0, 2, 3]]
    assert similarity_spearman(swapped, teacher) == pytest.approx(31 / 35)
    # Nearest: teacher 1, 0, 1, 2; swapped 1, 0, 0, 2 (text 2's 50-degree neighbour is now 0).
    assert neighbour_overlap(swapped, teacher, k=1) == 0.75


def test_the_linear_probe_separates_separable_classes_and_scores_the_test_split() -> None:
    generator = torch.Generator().manual_seed(1)
    train = torch.cat([torch.randn(20, 3, generator=generator) + 4,
                       torch.randn(20, 3, generator=generator) - 4])
    labels = torch.tensor([1] * 20 + [0] * 20)
    test = torch.tensor([[4.0, 4, 4], [-4.0, -4, -4], [5.0, 3, 4], [-3.0, -5, -4]])
    assert linear_probe(train, labels, test, torch.tensor([1, 0, 1, 0])) == 1.0
    assert linear_probe(train, labels, test, torch.tensor([1, 0, 0, 0])) == 0.75
    rows = torch.cat([train, test])
    assert probe_accuracy(rows, torch.cat([labels, torch.tensor([1, 0, 1, 0])])) == 1.0


def test_the_probe_is_nan_without_two_classes_to_split() -> None:
    rows = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    assert math.isnan(probe_accuracy(rows, torch.full((6,), -100)))
    assert math.isnan(probe_accuracy(rows, torch.tensor([1, 1, 1, -100, 1, 1])))
    assert math.isnan(probe_accuracy(rows, torch.tensor([1, 1, 1, 0, 1, 1])))  # one 0


def test_large_sets_are_sampled_reproducibly() -> None:
    assert torch.equal(sample_rows(5), torch.arange(5))
    drawn = sample_rows(MAX_ROWS + 10, seed=3)
    assert len(drawn) == MAX_ROWS and len(set(drawn.tolist())) == MAX_ROWS
    assert torch.equal(drawn, sample_rows(MAX_ROWS + 10, seed=3))
    assert not torch.equal(drawn, sample_rows(MAX_ROWS + 10, seed=4))


def test_embedding_metrics_gathers_the_three_and_checks_shapes() -> None:
    teacher = at_angles(0, 10, 50, 60, 120, 130)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    metrics = embedding_metrics(teacher, labels, teacher)
    assert metrics["similarity_spearman"] == pytest.approx(1.0)
    assert metrics["nn10_overlap"] == 1.0
    assert set(metrics) == {"similarity_spearman", "nn10_overlap", "probe_accuracy"}
    assert set(embedding_metrics(teacher, labels)) == {"probe_accuracy"}
    with pytest.raises(ValueError, match=r"expected embeddings \[N, D\] and labels \[N\]"):
        embedding_metrics(teacher, labels[:3])


class Encoder(nn.Module):
    """A sentence encoder over tensor inputs: a fixed linear map."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.map = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.map.weight.data.copy_(weight)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sentence_embedding": self.map(x)}


def test_benchmark_rows_of_sentence_encoders_carry_the_embedding_metrics() -> None:
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(24, 4, generator=generator)
    batch = {"input": inputs, "labels": (inputs[:, 0] > 0).long(), "index": torch.arange(24)}
    teacher = Encoder(torch.randn(6, 4, generator=generator))
    student = Encoder(torch.randn(3, 4, generator=generator))
    rows = benchmark_models({"teacher": teacher, "student": student}, [batch],
                            reference="teacher", teacher_logits_from="teacher",
                            latency_batch=batch, threads=1, repeats=1)
    assert rows[0]["similarity_spearman"] == pytest.approx(1.0)
    assert rows[0]["nn10_overlap"] == 1.0
    assert rows[1]["similarity_spearman"] < 1.0 and 0 <= rows[1]["nn10_overlap"] < 1.0
    assert "accuracy" not in rows[1] and rows[1]["throughput"] > 0
    table = markdown_table(rows)
    assert "| Model | Sim. Spearman | NN@10 | Probe acc | Params |" in table
