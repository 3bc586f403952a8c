"""``regression_kd``: a student regresses the teacher's scores on the original inputs and on
noisy copies that only the teacher labels."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from kdistill import Distiller
from kdistill.data.base import ArrayDataset, keep_labels
from kdistill.models import build_model
from kdistill.recipes.base import Recipe, Term
from kdistill.recipes.regression import GoldMSE, RegressionKD, gold_mse
from kdistill.recipes.shared import ORIGINAL, VIEW
from kdistill.schedules import TrainState
from kdistill.taps import Taps

FEATURES = 6
STATE = TrainState(0, 0, 0, 0.0, 1, 1)


def regression_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth non-linear target of 6 Gaussian features plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, FEATURES, generator=g)
    y = (torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 - x[:, 4] - 0.5
         + 0.1 * torch.randn(count, generator=g))
    return x, y


def mlp(seed: int, hidden: list[int]) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", (FEATURES,), 1, hidden=hidden)


def scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)[:, 0]


class GoldOnly(Recipe):
    """The baseline: MSE to the gold scores of the labelled samples, no teacher."""

    name = "gold_only_test"
    summary = paper = "-"
    uses_teacher = False
    uses_unlabeled = False

    def terms(self, student: Taps, teacher: Taps | None, batch: dict[str, Any],
              state: TrainState) -> dict[str, Term]:
        return {"gold": Term(F.mse_loss(student["logits"][:, 0], batch["labels"]),
                             unit="labeled")}


def test_prepare_appends_noisy_copies_with_hidden_labels():
    x = torch.randn(8, FEATURES)
    labels = torch.randn(8)
    labels[2] = float("nan")
    batch = {"input": x, "labels": labels, "index": torch.arange(8)}
    torch.manual_seed(0)
    prepared = RegressionKD(copies=3, noise_std=0.5).prepare(batch, lambda b: Taps({}), STATE)
    assert prepared["input"].shape == (32, FEATURES)
    assert torch.equal(prepared["input"][:8], x)
    assert torch.equal(prepared[VIEW], torch.arange(32) // 8)  # the original, then copies 1-3
    assert torch.equal(prepared["index"], torch.arange(8).repeat(4))
    assert torch.equal(prepared["labels"][:8].nan_to_num(7.0), labels.nan_to_num(7.0))
    assert bool(prepared["labels"][8:].isnan().all())
    noise = prepared["input"][8:] - x.repeat(3, 1)
    assert 0.4 < float(noise.std()) < 0.6 and abs(float(noise.mean())) < 0.1
    assert batch["input"] is x and batch["labels"].shape == (8,)  # the original is untouched


def test_augmented_rows_are_labelled_by_the_teacher():
    x, y = regression_data(16, seed=0)
    data = ArrayDataset(x, y)
    teacher = mlp(1, [32, 32])
    student = mlp(2, [8])
    initial = copy.deepcopy(student)  # the one step's terms are computed with these weights
    recipe = RegressionKD(copies=2, noise_std=0.3, gold_weight=0.5)
    prepared: list[dict[str, Any]] = []
    original_prepare = recipe.prepare

    def recording(batch, student_call, state):
        out = original_prepare(batch, student_call, state)
        prepared.append(out)
        return out

    recipe.prepare = recording
    result = Distiller(student, teacher, recipe, epochs=1, batch_size=16, progress=False).fit(data)

    assert len(prepared) == 1
    batch = prepared[0]
    aug = batch[VIEW] != ORIGINAL
    record = next(r for r in result.history if r["kind"] == "train")
    s, t = scores(initial, batch["input"]), scores(teacher, batch["input"])
    assert record["kd_augmented"] == pytest.approx(float(((s[aug] - t[aug]) ** 2).mean()),
                                                    rel=1e-5)
    assert record["kd"] == pytest.approx(float(((s[:16] - t[:16]) ** 2).mean()), rel=1e-5)
    gold = y[batch["index"][:16]]  # the batch holds the samples in a shuffled order
    assert record["gold"] == pytest.approx(float(((s[:16] - gold) ** 2).mean()), rel=1e-5)
    assert torch.equal(batch["input"][:16], x[batch["index"][:16]])
    assert record["loss"] == pytest.approx(record["kd"] + record["kd_augmented"]
                                           + 0.5 * record["gold"], rel=1e-5)


def test_gold_term_skips_unknown_scores():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    labels = torch.tensor([0.0, float("nan"), 1.0, 0.0])
    rows = torch.tensor([True, True, True, False])  # the last row is an augmented copy
    value = gold_mse(s, labels, rows)
    assert value.item() == pytest.approx((1 + 4) / 2)
    value.backward()
    assert s.grad.tolist() == [1.0, 0.0, 2.0, 0.0]
    none_known = gold_mse(s, torch.full((4,), float("nan")), rows)
    assert none_known.item() == 0.0 and none_known.requires_grad


def test_mse_recipe_is_the_mean_squared_error_over_known_scores_and_trains_teachers():
    s = torch.tensor([[0.5], [1.0], [-1.0]])
    labels = torch.tensor([1.5, float("nan"), 1.0])
    terms = GoldMSE().terms({"logits": s}, None, {"labels": labels}, STATE)
    assert terms["mse"].value.item() == pytest.approx((1.0 + 4.0) / 2)
    assert terms["mse"].unit == "labeled"
    assert RegressionKD.teacher_recipe == ("mse", {})
    assert GoldMSE.task == RegressionKD.task == "regression"


def test_distilled_student_correlates_better_than_gold_labels_alone():
    x, y = regression_data(400, seed=0)
    x_test, y_test = regression_data(400, seed=1)
    teacher = mlp(0, [64, 64])  # trained on every gold score, as `kdistill run` trains teachers
    Distiller(teacher, None, GoldOnly(), epochs=25, batch_size=32, progress=False,
              optimizer={"lr": 0.01}).fit(ArrayDataset(x, y))
    few = ArrayDataset(x, keep_labels(y, 40, seed=0))  # the student's data: 40 gold scores
    baseline = mlp(1, [16])  # another architecture: one narrow layer against two wide ones
    Distiller(baseline, None, GoldOnly(), epochs=60, batch_size=32, progress=False,
              optimizer={"lr": 0.01}).fit(few)
    student = mlp(1, [16])
    Distiller(student, teacher, RegressionKD(copies=2, noise_std=0.3), epochs=20, batch_size=32,
              progress=False, optimizer={"lr": 0.01}).fit(few)

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    t, b, s = (scores(m, x_test) for m in (teacher, baseline, student))
    found = {name: (round(pearson(p, y_test), 3), round(float(spearmanr(p, y_test)[0]), 3))
             for name, p in (("teacher", t), ("gold only", b), ("regression_kd", s))}
    print("pearson, spearman vs gold:", found, "student vs teacher:", round(pearson(s, t), 3))
    # Seed 0 gave: teacher (0.97, 0.97), gold only (0.71, 0.73), regression_kd (0.92, 0.91).
    assert found["regression_kd"][0] > found["gold only"][0] + 0.1
    assert found["regression_kd"][1] > found["gold only"][1] + 0.1
    assert pearson(s, t) > 0.9


def test_a_classification_teacher_is_refused_with_its_shape(digits_subset):
    recipe = RegressionKD(copies=0)
    batch = {"labels": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"teacher's logits.*shape \(4, 10\).*10 classes"):
        recipe.terms(Taps({"logits": torch.zeros(4, 1)}), Taps({"logits": torch.zeros(4, 10)}),
                     batch, STATE)
    with pytest.raises(ValueError, match=r"student's logits.*shape \(4, 3, 2\)"):
        recipe.terms(Taps({"logits": torch.zeros(4, 3, 2)}), Taps({"logits": torch.zeros(4)}),
                     batch, STATE)
    with pytest.raises(ValueError, match="labels must be float scores.*int64"):
        recipe.terms(Taps({"logits": torch.zeros(4)}), Taps({"logits": torch.zeros(4)}),
                     {"labels": torch.zeros(4, dtype=torch.long)}, STATE)
    with pytest.raises(ValueError, match="needs float inputs.*int64.*copies: 0"):
        RegressionKD(copies=1).prepare({"input": torch.zeros(4, 3, dtype=torch.long)},
                                       lambda b: Taps({}), STATE)
    # Through the engine, a digits classifier as the teacher fails the same way.
    data = digits_subset(16)
    torch.manual_seed(0)
    student = build_model("mlp", (1, 8, 8), 1, hidden=[8])
    teacher = build_model("mlp", (1, 8, 8), 10, hidden=[8])
    with pytest.raises(ValueError, match=r"teacher's logits.*\(32, 10\)"):
        Distiller(student, teacher, RegressionKD(), epochs=1, batch_size=16,
                  progress=False).fit(data)
