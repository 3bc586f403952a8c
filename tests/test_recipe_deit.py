"""``deit``: the two-head wrapper, its exported model and the soft and hard terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdistill import Distiller
from kdistill.models.heads import AveragedHeads, TwoHeadStudent, average_probabilities
from kdistill.recipes.deit import DeiT
from kdistill.schedules import TrainState
from kdistill.taps import Taps

# Hand-made logits: 3 samples, 4 classes. The teacher's argmax is [2, 0, 3].
TEACHER = [[0.1, 0.5, 2.0, -1.0], [3.0, 1.0, 0.0, 0.2], [0.0, 0.3, -0.2, 0.9]]
CLS = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.4, 0.1, -0.3], [2.0, -1.0, 0.0, 0.0]]
DIST = [[0.3, -0.2, 0.8, 0.0], [1.5, 0.0, -0.5, 0.1], [-0.4, 0.6, 0.2, 1.1]]


def deit_terms(recipe: DeiT, teacher: list[list[float]], labels: list[int]) -> dict:
    heads = torch.tensor([CLS, DIST], dtype=torch.float64)
    batch = {"labels": torch.tensor(labels)}
    return recipe.terms(Taps({"heads": heads}), Taps({"logits": torch.tensor(
        teacher, dtype=torch.float64)}), batch, TrainState())


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_nll(logits: list[list[float]], targets: list[int]) -> float:
    """Mean of -log softmax(z_i)[t_i] over the rows given."""
    logp = np_log_softmax(np.array(logits))
    return float(np.mean([-logp[i, t] for i, t in enumerate(targets)]))


def test_hard_targets_are_the_teachers_argmax():
    terms = deit_terms(DeiT(mode="hard", alpha=0.3), TEACHER, [1, 1, 1])
    assert terms["distill"].value.item() == pytest.approx(mean_nll(DIST, [2, 0, 3]), rel=1e-12)
    assert terms["distill"].weight == pytest.approx(0.3)
    assert terms["ce"].weight == pytest.approx(0.7)
    assert terms["ce"].value.item() == pytest.approx(mean_nll(CLS, [1, 1, 1]), rel=1e-12)
    # Only the argmax matters: scaling the teacher's logits (same argmax) changes nothing,
    # moving the first sample's argmax from class 2 to class 1 does.
    scaled = deit_terms(DeiT(mode="hard"), [[5 * v for v in row] for row in TEACHER], [1, 1, 1])
    assert scaled["distill"].value.item() == pytest.approx(terms["distill"].value.item())
    moved = [[0.1, 2.5, 2.0, -1.0], *TEACHER[1:]]
    other = deit_terms(DeiT(mode="hard"), moved, [1, 1, 1])
    assert other["distill"].value.item() == pytest.approx(mean_nll(DIST, [1, 0, 3]), rel=1e-12)


def test_unlabelled_samples_class_head_target():
    """Sample 1 is unlabelled: ``teacher`` gives the class head the teacher's argmax (0) there,
    ``skip`` leaves it out of the class head's CE."""
    labels = [3, -100, 1]
    teacher = deit_terms(DeiT(unlabeled="teacher"), TEACHER, labels)
    assert teacher["ce"].unit == "examples"
    assert teacher["ce"].value.item() == pytest.approx(mean_nll(CLS, [3, 0, 1]), rel=1e-12)
    skip = deit_terms(DeiT(unlabeled="skip"), TEACHER, labels)
    assert skip["ce"].unit == "labeled"
    expected = mean_nll([CLS[0], CLS[2]], [3, 1])
    assert skip["ce"].value.item() == pytest.approx(expected, rel=1e-12)
    # The distillation head learns from the teacher on every sample either way.
    assert teacher["distill"].unit == skip["distill"].unit == "examples"


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_soft_term_against_the_kl_formula(reduction):
    tau = 2.0
    terms = deit_terms(DeiT(mode="soft", temperature=tau, alpha=0.5, reduction=reduction),
                       TEACHER, [0, 1, 2])
    log_pt = np_log_softmax(np.array(TEACHER) / tau)
    log_pd = np_log_softmax(np.array(DIST) / tau)
    per_sample = (np.exp(log_pt) * (log_pt - log_pd)).sum(axis=1)
    expected = tau**2 * per_sample.mean() / (4 if reduction == "mean" else 1)
    assert terms["distill"].value.item() == pytest.approx(expected, rel=1e-10)
    assert terms["distill"].weight == pytest.approx(0.5)


def expected_average(z_cls: torch.Tensor, z_dist: torch.Tensor) -> torch.Tensor:
    return torch.log((torch.softmax(z_cls, -1) + torch.softmax(z_dist, -1)) / 2)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exported_model_computes_the_averaged_prediction(kind, make_mlp, make_cnn):
    student = make_mlp(seed=0) if kind == "mlp" else make_cnn(seed=0)
    student.eval()
    wrapped = DeiT().wrap_student(student)
    assert isinstance(wrapped, TwoHeadStudent)
    torch.manual_seed(3)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        # The penultimate features computed by hand: the MLP's `features` is its whole trunk,
        # the CNN's `features` pools the output of its `blocks`.
        feats = student.features(x) if kind == "mlp" else student.features(student.blocks(x))
        z_cls, z_dist = student(x), wrapped.dist_head(feats)
        assert not torch.allclose(z_cls, z_dist)
        expected = expected_average(z_cls, z_dist)
        exported = wrapped.export()
        assert isinstance(exported, AveragedHeads)
        assert not hasattr(exported, "export")
        prediction = exported(x)
        output = wrapped(x)
    assert isinstance(prediction, torch.Tensor)
    torch.testing.assert_close(prediction, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output["logits"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output["heads"], torch.stack([z_cls, z_dist]))
    # The exported model shares the trained weights (no copy) and leaves no hook behind.
    assert exported.student is student and exported.extra[0] is wrapped.dist_head
    assert all(not m._forward_hooks for m in student.modules())


def test_wrapping_twice_is_a_no_op(make_mlp):
    student = make_mlp(seed=0, hidden=(16,))
    recipe = DeiT()
    once = recipe.wrap_student(student)
    assert recipe.wrap_student(once) is once
    count = sum(p.numel() for p in once.parameters())
    assert count == sum(p.numel() for p in student.parameters()) + 16 * 10 + 10


def test_a_head_that_is_not_linear_needs_its_sizes():
    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU())
            self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(12, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x))

    with pytest.raises(ValueError, match="head 'head' is not an nn.Linear: give in_features"):
        DeiT().wrap_student(Student())
    wrapped = DeiT(in_features=12, num_classes=5).wrap_student(Student())
    assert wrapped(torch.randn(2, 1, 8, 8))["heads"].shape == (2, 2, 5)
    with pytest.raises(ValueError, match="^features: unknown Student module 'trunk'; valid "
                                         "names: features, "):
        DeiT(features="trunk", in_features=12, num_classes=5).wrap_student(Student())
    with pytest.raises(ValueError, match="num_classes=7 disagrees"):
        TwoHeadStudent(nn.Sequential(nn.Linear(3, 4)), features="0", head="0", num_classes=7)
    with pytest.raises(ValidationError, match="mode"):
        DeiT(mode="medium")


def test_average_of_identical_heads_is_their_log_softmax():
    """Two equal heads average to the single head's distribution."""
    z = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(average_probabilities(torch.stack([z, z])),
                               torch.log_softmax(z, -1).float(), rtol=1e-6, atol=1e-6)
    assert math.isclose(float(average_probabilities(torch.stack([z, z])).exp().sum()), 4.0,
                        rel_tol=1e-5)


@pytest.mark.parametrize(("alpha", "frozen"), [(1.0, "head"), (0.0, "dist_head")])
def test_each_head_learns_only_from_its_own_term(alpha, frozen, digits_subset, make_mlp,
                                                 make_cnn, take_snapshot):
    """Through ``Distiller``: with alpha = 1 only the distillation term trains, so the class
    head never moves; with alpha = 0 the distillation head never moves. The trunk always does.
    The student is wrapped beforehand; ``Distiller`` keeps that wrapper (wrapping is
    idempotent)."""
    recipe = DeiT(mode="hard", alpha=alpha)
    wrapped = recipe.wrap_student(make_mlp(seed=0, hidden=(16,)))
    parts = {"head": wrapped.student.head, "dist_head": wrapped.dist_head,
             "trunk": wrapped.student.features}
    before = {name: take_snapshot(part) for name, part in parts.items()}
    result = Distiller(wrapped, make_cnn(seed=1), recipe, epochs=1, batch_size=16,
                       progress=False, optimizer={"lr": 0.01}).fit(digits_subset(48, labeled=24))
    assert result.student is wrapped
    moved = {name: not all(torch.equal(v, before[name][k])
                           for k, v in take_snapshot(part).items())
             for name, part in parts.items()}
    assert moved == {"head": frozen != "head", "dist_head": frozen != "dist_head", "trunk": True}
