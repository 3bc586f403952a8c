"""The CTC oracle benchmark's protocol pieces that need no training: the configs it runs, the
teacher figures and the resumption of saved runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import oracle_ctc as bench  # noqa: E402

from kdistill.data import DataSplits, SequenceDataset  # noqa: E402

U = -100


def test_each_variant_changes_only_the_recipe_the_teacher_and_the_seed() -> None:
    ce, hinton, oracle = (bench.variant_config(v, 2) for v in ("ce", "hinton", "oracle"))
    assert ce.recipe == {"name": "ce"}
    assert hinton.recipe == {"name": "hinton", "temperature": 2.0, "alpha": 0.5}
    assert oracle.recipe == {**hinton.recipe, "name": "oracle"}
    assert hinton.teacher.model.name == "crnn" and oracle.teacher.model.name == "oracle_ctc"
    assert hinton.teacher.model.size == oracle.teacher.model.size == "base"
    assert hinton.teacher.train == oracle.teacher.train and oracle.teacher.train.seed == 2
    assert ce.trainer == hinton.trainer == oracle.trainer and oracle.trainer.seed == 2
    assert ce.student == oracle.student and ce.data == oracle.data and oracle.data.seed == 0


class Copier(nn.Module):
    """A teacher that ignores the image and spells the targets it is given: token k at frame
    2k, blanks elsewhere (4 frames, tokens 0-2, the blank 3)."""

    batch_inputs = ("labels",)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 4, 4)
        logits[..., 3] = 10.0
        for row, target in enumerate(labels.tolist()):
            for k, token in enumerate(t for t in target if t != U):
                logits[row, 2 * k] = F.one_hot(torch.tensor(token), 4) * 10.0
        return logits + images.sum() * 0


class Uniform(nn.Module):
    """A teacher giving every class the same probability at each of 2 frames."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(images), 2, 3) + images.sum() * 0


def lines(labels: list[list[int]]) -> DataSplits:
    data = SequenceDataset(torch.zeros(len(labels), 1, 2, 2), torch.tensor(labels))
    return DataSplits("toy", data, data, num_classes=4, input_shape=(1, 2, 2), task="ctc")


def test_a_teacher_that_copies_its_targets_is_told_apart() -> None:
    """Given the next line's targets, a copier reads exactly those (CER 0 against them) and
    is as wrong against the truth as those targets are: here 0 1 | 2 | 1 1 read as 1 1 |
    0 1 | 2: edit distances 1, 2 and 2 over 5 digits."""
    figures = bench.teacher_figures(Copier(), lines([[0, 1], [2, U], [1, 1]]))
    assert figures["cer"] == 0.0 and figures["accuracy"] == 1.0
    assert figures["cer_vs_given_other_targets"] == 0.0
    assert figures["cer_with_other_targets"] == pytest.approx(5 / 5)
    assert 0.99 < figures["p_target"] <= 1.0


def test_the_target_probability_of_a_uniform_teacher() -> None:
    """Two frames, three classes (blank 2): of the 9 equally likely paths, 00, 0- and -0
    read as "0", so p(y | x) = 3/9; only 01 reads as "0 1", so 1/9."""
    data = lines([[0, U], [0, 1]])
    assert bench.target_probability(Uniform(), data.test) == pytest.approx((3 / 9 + 1 / 9) / 2)
    figures = bench.teacher_figures(Uniform(), data)
    assert "cer_with_other_targets" not in figures  # it reads no targets



def test_the_summary_gives_mean_and_spread_per_recipe() -> None:
    results = {"runs": [{"variant": "ce", "seed": 0, "cer": 0.1, "accuracy": 0.5,
                         "train_seconds": 10.0},
                        {"variant": "ce", "seed": 1, "cer": 0.2, "accuracy": 0.7,
                         "train_seconds": 20.0}],
               "teachers": [{"variant": "oracle", "seed": 0, "model": "oracle_ctc",
                             "cer": 0.01, "accuracy": 0.9, "p_target": 0.8,
                             "cer_vs_given_other_targets": 0.5,
                             "cer_with_other_targets": 0.3}]}
    students, teachers = bench.summary(results).strip().split("\n\n")
    assert students.splitlines()[2] == "| ce | 15.00 ± 7.07 | 60.00 ± 14.14 | 0 1 | 15 |"
    assert len(students.splitlines()) == 3  # no row for the recipes without runs
    assert teachers.splitlines()[2] == "| oracle_ctc | 1.00 | 90.00 | 80.00 | 50.00 | 30.00 | 0 |"
