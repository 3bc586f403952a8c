"""BD-KD (``bdkd``): the per-sample weight rule on hand-made predictions, the student and
teacher losses against hand computations, the gradient each model receives, and a short fit
through ``Distiller`` that trains both."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kdistill import Distiller
from kdistill.recipes.bdkd import BDKD, bdkd_terms, divergence_weights, entropy
from kdistill.teachers import PeerTeacher

LABELS = torch.tensor([1, -100, 0, 2, 2])


def log_p(z: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    return z / t - torch.logsumexp(z / t, dim=-1, keepdim=True)


def kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def test_entropy_of_hand_made_distributions() -> None:
    uniform = torch.zeros(1, 10)
    two = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    assert entropy(uniform).item() == pytest.approx(math.log(10))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy(two).item() == pytest.approx(expected, rel=1e-6)
    # The temperature softens first: logits 2z at T=2 are the logits z at T=1.
    assert entropy(2 * two, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_equal_entropies_weigh_both_divergences_equally() -> None:
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    student = teacher[:, [2, 0, 1]]  # other predictions, the same entropies
    w_f, w_r = divergence_weights(student, teacher)
    assert torch.allclose(w_f, torch.full((2,), 0.5))
    assert torch.allclose(w_r, torch.full((2,), 0.5))


def test_a_flatter_student_is_trained_mostly_by_the_reverse_kl() -> None:
    teacher = torch.tensor([[8.0, 0.0, 0.0, 0.0], [8.0, 0.0, 0.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])  # uniform, near it
    w_f, w_r = divergence_weights(student, teacher, gap_scale=0.5)
    h_t = -(torch.softmax(teacher[0], 0) * torch.log_softmax(teacher[0], 0)).sum().item()
    gap = math.log(4) - h_t  # first row: a uniform student, H = log 4 exactly
    assert w_r[0].item() == pytest.approx(1 / (1 + math.exp(-gap / 0.5)), rel=1e-6)
    assert w_r[0] > 0.9 and w_f[0] < 0.1  # reverse dominates
    assert w_r[0] > w_r[1] > 0.5  # the flatter the student, the more reverse
    assert torch.allclose(w_f + w_r, torch.ones(2))


def test_a_sharper_student_is_trained_mostly_by_the_forward_kl() -> None:
    student = torch.tensor([[9.0, 0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.5, 0.0]])
    w_f, w_r = divergence_weights(student, teacher, gap_scale=0.5)
    assert w_f.item() > 0.85 and w_r.item() < 0.15
    # A larger gap_scale softens the rule towards 0.5 / 0.5.
    soft_f, _ = divergence_weights(student, teacher, gap_scale=50.0)
    assert 0.5 < soft_f.item() < 0.51
    # The student's and the teacher's roles are mirror images.
    mirror_f, mirror_r = divergence_weights(teacher, student, gap_scale=0.5)
    assert mirror_r.item() == pytest.approx(w_f.item()) and mirror_f.item() == pytest.approx(
        w_r.item())


def test_weights_are_constants_and_shapes_are_checked() -> None:
    student = torch.randn(3, 4, requires_grad=True)
    w_f, w_r = divergence_weights(student, torch.randn(3, 4, requires_grad=True))
    assert not w_f.requires_grad and not w_r.requires_grad
    with pytest.raises(ValueError, match=r"student logits \(3, 4\).*teacher logits \(3, 5\)"):
        divergence_weights(student, torch.randn(3, 5))


def fixed_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows alternate between a flat student / sharp teacher and the opposite.
    scale_s = torch.tensor([0.3, 4.0, 0.3, 4.0, 1.0], dtype=torch.float64)[:, None]
    scale_t = torch.tensor([4.0, 0.3, 4.0, 0.3, 1.0], dtype=torch.float64)[:, None]
    zs = (torch.randn(5, 4, generator=g, dtype=torch.float64) * scale_s).requires_grad_()
    zt = (torch.randn(5, 4, generator=g, dtype=torch.float64) * scale_t).requires_grad_()
    return zs, zt


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_terms_match_a_hand_computation(temperature: float) -> None:
    zs, zt = fixed_logits()
    terms = bdkd_terms(zs, zt, LABELS, temperature, gap_scale=0.7)
    t = temperature
    lps, lpt = log_p(zs.detach(), t), log_p(zt.detach(), t)
    h_s, h_t = -(lps.exp() * lps).sum(-1), -(lpt.exp() * lpt).sum(-1)
    w_r = 1 / (1 + torch.exp(-(h_s - h_t) / 0.7))
    known = LABELS != -100
    expected = {
        "ce": -log_p(zs.detach())[known, LABELS[known]].mean(),
        "forward_kl": t * t * ((1 - w_r) * kl_rows(lpt, lps)).mean(),
        "reverse_kl": t * t * (w_r * kl_rows(lps, lpt)).mean(),
        "teacher_ce": -log_p(zt.detach())[known, LABELS[known]].mean(),
        "teacher_kl": t * t * kl_rows(lps, lpt).mean(),  # the default: KL(p_s || p_t)
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].value.item() == pytest.approx(value.item(), rel=1e-9), name
        assert terms[name].weight == 1.0
    assert {n for n, term in terms.items() if term.unit == "labeled"} == {"ce", "teacher_ce"}
    # The rule really mixes: some samples lean reverse, others forward.
    assert w_r.max() > 0.7 and w_r.min() < 0.3


@pytest.mark.parametrize("teacher_kl", ["student_first", "teacher_first"])
def test_each_model_receives_only_its_own_loss_gradient(teacher_kl: str) -> None:
    """One backward through every term: the teacher's logits get exactly the gradient of
    CE + T^2 KL(p_s || p_t) (student_first) or CE + T^2 KL(p_t || p_s) (teacher_first) with p_s
    constant; the student's exactly that of its CE plus the weighted forward and reverse KLs
    with p_t and the weights constant."""
    t, tau = 2.0, 0.5
    zs, zt = fixed_logits(seed=3)
    total = sum(term.value * term.weight
                for term in bdkd_terms(zs, zt, LABELS, t, tau, teacher_kl).values())
    total.backward()
    known = LABELS != -100

    ref_t = zt.detach().clone().requires_grad_()
    lpt, lps = log_p(ref_t, t), log_p(zs.detach(), t)
    kl_t = kl_rows(lps, lpt) if teacher_kl == "student_first" else kl_rows(lpt, lps)
    teacher_loss = -log_p(ref_t)[known, LABELS[known]].mean() + t * t * kl_t.mean()
    teacher_loss.backward()
    assert torch.allclose(zt.grad, ref_t.grad, atol=1e-12)

    ref_s = zs.detach().clone().requires_grad_()
    lps, lpt = log_p(ref_s, t), log_p(zt.detach(), t)
    w_f, w_r = divergence_weights(zs.detach(), zt.detach(), t, tau)
    student_loss = (-log_p(ref_s)[known, LABELS[known]].mean()
                    + t * t * (w_f * kl_rows(lpt, lps) + w_r * kl_rows(lps, lpt)).mean())
    student_loss.backward()
    assert torch.allclose(zs.grad, ref_s.grad, atol=1e-12)

    # The two directions give the teacher different gradients.
    other = zt.detach().clone().requires_grad_()
    lpo, lps = log_p(other, t), log_p(zs.detach(), t)
    kl_o = kl_rows(lpo, lps) if teacher_kl == "student_first" else kl_rows(lps, lpo)
    (t * t * kl_o.mean()).backward()
    kl_only = zt.grad - torch.autograd.grad(-log_p(ref_t)[known, LABELS[known]].mean(),
                                            ref_t)[0]
    assert not torch.allclose(kl_only, other.grad, atol=1e-3)


def test_parameters_and_teacher_are_validated(make_mlp) -> None:
    with pytest.raises(ValidationError, match="gap_scale"):
        BDKD(gap_scale=0)
    with pytest.raises(ValidationError, match="temperature"):
        BDKD(temperature=-1)
    with pytest.raises(ValidationError, match="teacher_kl"):
        BDKD(teacher_kl="forward")
    assert BDKD().params.teacher_kl == "student_first"
    with pytest.raises(ValueError, match="bdkd needs a teacher model"):
        BDKD().teacher_source(make_mlp(), None)
    teacher = make_mlp(seed=1, hidden=(32,))
    source = BDKD().teacher_source(make_mlp(), teacher)
    assert isinstance(source, PeerTeacher) and list(source.peers) == [teacher]
    # A teacher built like the student from the same seed would mirror it forever: re-drawn.
    student, twin = make_mlp(seed=0), make_mlp(seed=0)
    assert list(BDKD().teacher_source(student, twin).peers) == [twin]
    assert not torch.equal(twin.head.weight, student.head.weight)


def test_a_fit_trains_teacher_and_student_together(digits_subset, make_mlp,
                                                   take_snapshot) -> None:
    student, teacher = make_mlp(seed=0), make_mlp(seed=1, hidden=(48,))
    student_before, teacher_before = take_snapshot(student), take_snapshot(teacher)
    distiller = Distiller(student, teacher, BDKD(temperature=2.0), epochs=2, batch_size=16,
                          progress=False, optimizer={"name": "sgd", "lr": 0.1})
    assert isinstance(distiller.teacher, PeerTeacher)
    result = distiller.fit(digits_subset(64, labeled=32), digits_subset(32))
    for model, before in [(student, student_before), (teacher, teacher_before)]:
        after = take_snapshot(model)
        assert all(not torch.equal(after[k], before[k]) for k in after)
    assert all(p.requires_grad for p in teacher.parameters())
    names = {"ce", "forward_kl", "reverse_kl", "teacher_ce", "teacher_kl"}
    steps = [r for r in result.history if r["kind"] == "train"]
    assert len(steps) == 4  # 2 epochs of the 32 labelled samples only (all 64: 8 steps)
    for record in steps:
        assert names <= set(record)
        assert record["loss"] == pytest.approx(sum(record[n] for n in names), rel=1e-5)
    # Calibration is reported next to accuracy.
    evaluation = result.evaluations()[-1]
    assert 0 <= evaluation["eval_ece"] <= 1 and 0 <= evaluation["eval_accuracy"] <= 1


def test_per_token_logits_are_refused_by_shape() -> None:
    with pytest.raises(ValueError, match=r"logits have shape \(2, 3, 4\).*\[batch, classes\]"):
        bdkd_terms(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
