"""``deit``: the two-head wrapper, its exported model and the soft and hard terms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from kdistill import Distiller
from kdistill.config import ConfigError, parse_config
from kdistill.models import build_model
from kdistill.models.heads import AveragedHeads, TwoHeadStudent, average_probabilities
from kdistill.recipes.deit import DeiT
from kdistill.run import build_phases, build_student
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


def mean_nll(logits: list[list[float]], targets: list[int], smoothing: float = 0.0) -> float:
    """Mean over the rows given of -sum_c q_c log softmax(z_i)[c], the target q being
    (1 - e) onehot(t_i) + e / C (e = ``smoothing``)."""
    logp = np_log_softmax(np.array(logits))
    classes = logp.shape[1]
    return float(np.mean([-sum(((1 - smoothing) * (c == t) + smoothing / classes) * logp[i, c]
                               for c in range(classes)) for i, t in enumerate(targets)]))


def test_defaults_are_the_papers():
    p = DeiT().params
    assert (p.mode, p.alpha, p.temperature, p.label_smoothing, p.reduction,
            p.distillation_head) == ("hard", 0.5, 1.0, 0.1, "mean", "auto")


def test_hard_targets_are_the_teachers_argmax():
    terms = deit_terms(DeiT(mode="hard", alpha=0.3, label_smoothing=0.0), TEACHER, [1, 1, 1])
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
    assert teacher["ce"].value.item() == pytest.approx(mean_nll(CLS, [3, 0, 1], 0.1), rel=1e-12)
    skip = deit_terms(DeiT(unlabeled="skip"), TEACHER, labels)
    assert skip["ce"].unit == "labeled"
    expected = mean_nll([CLS[0], CLS[2]], [3, 1], 0.1)
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


# ------------------------------------------------------------ the paper's equations, in full


def objective(terms: dict) -> float:
    return sum(t.weight * t.value.item() for t in terms.values())


def test_hard_objective_is_the_papers_equation():
    """L = (1 - a) CE(psi(z_cls), y~) + a CE(psi(z_dist), argmax z_t), y~ the labels smoothed
    as (1 - e) onehot + e / C, at a = 0.3, e = 0.2."""
    a, e, labels = 0.3, 0.2, [3, 1, 0]
    log_cls, log_dist = np_log_softmax(np.array(CLS)), np_log_softmax(np.array(DIST))
    smoothed = (1 - e) * np.eye(4)[labels] + e / 4
    ce = -(smoothed * log_cls).sum(axis=1).mean()
    hard = -np.mean([log_dist[0, 2], log_dist[1, 0], log_dist[2, 3]])  # the teacher's argmax
    terms = deit_terms(DeiT(mode="hard", alpha=a, label_smoothing=e), TEACHER, labels)
    assert objective(terms) == pytest.approx((1 - a) * ce + a * hard, rel=1e-12)


def test_soft_objective_is_the_official_codes():
    """DeiT's DistillationLoss, soft: KL(log_softmax(z_t / T) || log_softmax(z_dist / T))
    summed over the whole batch, times T^2, divided by the number of logits B x C; at a = 0.7,
    T = 3, e = 0.05 (the class head's CE smoothed)."""
    a, tau, e, labels = 0.7, 3.0, 0.05, [2, 2, 1]
    log_pt = np_log_softmax(np.array(TEACHER) / tau)
    log_pd = np_log_softmax(np.array(DIST) / tau)
    kl = (np.exp(log_pt) * (log_pt - log_pd)).sum() * tau * tau / np.array(DIST).size
    smoothed = (1 - e) * np.eye(4)[labels] + e / 4
    ce = -(smoothed * np_log_softmax(np.array(CLS))).sum(axis=1).mean()
    terms = deit_terms(DeiT(mode="soft", alpha=a, temperature=tau, label_smoothing=e),
                       TEACHER, labels)
    assert terms["distill"].value.item() == pytest.approx(kl, rel=1e-10)
    assert objective(terms) == pytest.approx((1 - a) * ce + a * kl, rel=1e-10)


# ---------------------------------------------------------- the distillation token, or not


def tiny_vit(token: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vit", (1, 8, 8), 10, size="tiny", patch_size=2,
                       distillation_token=token)


def test_a_student_with_a_distillation_token_is_used_as_it_is():
    student = tiny_vit(token=True)
    for head in ("auto", "token"):
        assert DeiT(distillation_head=head).wrap_student(student) is student
    with pytest.raises(ValueError, match="^deit: distillation_head 'shared_features' on a "
                                         "student with its own distillation token; build it "
                                         "without one"):
        DeiT(distillation_head="shared_features").wrap_student(student)


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_without_a_token_the_fallback_is_a_head_on_shared_features(kind, make_mlp):
    """``auto`` and ``shared_features`` give a student without a distillation token a second
    head on the class head's features (for the ViT, the class token's output); ``token``
    refuses it."""
    student = make_mlp(seed=0) if kind == "mlp" else tiny_vit(token=False)
    for head in ("auto", "shared_features"):
        wrapped = DeiT(distillation_head=head).wrap_student(student)
        assert isinstance(wrapped, TwoHeadStudent) and wrapped.student is student
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        feats = student.features(x) if kind == "mlp" else student.tokens(x)[:, 0]
        torch.testing.assert_close(wrapped(x)["heads"][1], wrapped.dist_head(feats))
    name = type(student).__name__
    with pytest.raises(ValueError, match=f"^deit: distillation_head 'token' needs a student "
                                         f"with a distillation token .*; {name} has none"):
        DeiT(distillation_head="token").wrap_student(student)


def test_a_config_that_cannot_wrap_its_student_names_the_recipe(digits):
    config = parse_config({
        "name": "x", "data": {"name": "digits"}, "student": {"name": "mlp", "size": "tiny"},
        "teacher": {"model": {"name": "cnn", "size": "tiny"}, "train": {"epochs": 1}},
        "recipe": {"name": "deit", "distillation_head": "token"}, "trainer": {"epochs": 1}})
    with pytest.raises(ConfigError, match="^recipe: deit: distillation_head 'token' needs a "
                                          "student with a distillation token"):
        build_student(config, digits, build_phases(config), ["recipe"])


@pytest.mark.parametrize(("alpha", "frozen"), [(1.0, "head"), (0.0, "dist_head")])
def test_token_student_each_head_learns_only_from_its_own_term(alpha, frozen, digits_subset,
                                                              make_cnn, take_snapshot):
    """The ViT's own distillation head is the one the distillation term trains: with alpha = 1
    the class head never moves, with alpha = 0 the distillation head never moves; the
    distillation token moves either way (the class token attends to it)."""
    student = tiny_vit(token=True)
    parts = {"head": student.head, "dist_head": student.dist_head}
    before = {name: take_snapshot(part) for name, part in parts.items()}
    token = student.dist_token.detach().clone()
    result = Distiller(student, make_cnn(seed=1), DeiT(mode="hard", alpha=alpha), epochs=1,
                       batch_size=16, progress=False,
                       optimizer={"lr": 0.01}).fit(digits_subset(48))
    assert result.student is student
    moved = {name: not all(torch.equal(v, before[name][k])
                           for k, v in take_snapshot(part).items())
             for name, part in parts.items()}
    assert moved == {"head": frozen != "head", "dist_head": frozen != "dist_head"}
    assert not torch.equal(student.dist_token.detach(), token)
