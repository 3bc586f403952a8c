"""Mean teacher: the EMA update against its formula through real optimizer steps, the terms
against hand computations on sample and token logits, and the two noisy views of ``prepare``."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kdistill import Distiller
from kdistill.recipes.mean_teacher import MeanTeacher
from kdistill.recipes.shared import VIEW, valid_rows
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps
from kdistill.teachers import EMATeacher


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_the_teacher_source_is_an_ema_of_the_student(make_mlp) -> None:
    student = make_mlp()
    source = MeanTeacher(momentum=0.9).teacher_source(student, None)
    assert isinstance(source, EMATeacher)
    assert source.followed is student and source.skip_prob == 0.0
    assert source.warmup is True  # the official code's warm-up is the default
    assert MeanTeacher(momentum_warmup=False).teacher_source(student, None).warmup is False
    assert MeanTeacher.teacher_model == "none"
    assert MeanTeacher().params.ce_denominator == "labeled"


def test_one_step_moves_the_ema_by_the_formula(digits_subset, make_cnn, take_snapshot) -> None:
    """One optimizer step (the whole set is one batch): theta_t = m theta_0 + (1 - m) theta_1
    for every parameter with m = min(0.9, 1 - 1/2) (the warm-up: the mean of the two), and
    BatchNorm buffers are the student's."""
    student = make_cnn()
    before = take_snapshot(student)
    distiller = Distiller(student, None, MeanTeacher(momentum=0.9), epochs=1, batch_size=32,
                          progress=False, optimizer={"name": "sgd", "lr": 0.5})
    distiller.fit(digits_subset(32, labeled=8))
    after = take_snapshot(student)
    ema = distiller.teacher.model.state_dict()
    names = [n for n, _ in student.named_parameters()]
    assert distiller.teacher.last_updated == names
    for name in names:
        assert not torch.equal(after[name], before[name]), f"{name} did not train"
        expected = 0.5 * before[name] + 0.5 * after[name]
        torch.testing.assert_close(ema[name], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(ema[name], after[name])
    buffers = [n for n, _ in student.named_buffers()]
    assert buffers and all(torch.equal(ema[n], after[n]) for n in buffers)


def test_a_momentum_schedule_is_read_after_each_step(digits_subset, make_mlp,
                                                     take_snapshot) -> None:
    """Two one-step epochs with m linear 0.5 -> 0.9 over 2 epochs (no warm-up): the steps end
    at epoch progress 1 and 2, so m_1 = 0.7 and m_2 = 0.9."""
    student = make_mlp()
    seen = [take_snapshot(student)]
    momentum = ScheduleConfig(name="linear", start=0.5, end=0.9, length=2)
    recipe = MeanTeacher(momentum=momentum, momentum_warmup=False)
    distiller = Distiller(student, None, recipe, epochs=2,
                          batch_size=32, progress=False, optimizer={"name": "sgd", "lr": 0.5})
    distiller.fit(digits_subset(32, labeled=8), digits_subset(16),
                  callbacks=[lambda record: seen.append(take_snapshot(student))])
    theta0, theta1, theta2 = seen
    ema = distiller.teacher.model.state_dict()
    for name, _ in student.named_parameters():
        step1 = 0.7 * theta0[name] + 0.3 * theta1[name]
        torch.testing.assert_close(ema[name], 0.9 * step1 + 0.1 * theta2[name], rtol=0,
                                   atol=1e-6)


def test_terms_against_a_hand_computation() -> None:
    z_s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    z_t = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    labels = torch.tensor([2, -100])
    state = TrainState(epoch_progress=2.5)
    recipe = MeanTeacher(consistency_weight=ScheduleConfig(name="cosine", start=0.0, end=10.0,
                                                           length=5.0))
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), {"labels": labels}, state)
    p_s = [softmax(r) for r in z_s.tolist()]
    p_t = [softmax(r) for r in z_t.tolist()]
    assert terms["ce"].value.item() == pytest.approx(-math.log(p_s[0][2]), rel=1e-6)
    assert terms["ce"].unit == "labeled"
    mse = sum((a - b) ** 2 for rs, rt in zip(p_s, p_t, strict=True)
              for a, b in zip(rs, rt, strict=True)) / 6
    assert terms["consistency"].value.item() == pytest.approx(mse, rel=1e-6)
    assert terms["consistency"].unit == "examples"
    assert terms["consistency"].weight == pytest.approx(10 - 10 * (1 + math.cos(math.pi / 2)) / 2)

    kl = MeanTeacher(consistency="kl").terms(Taps({"logits": z_s}), Taps({"logits": z_t}),
                                             {"labels": labels}, state)["consistency"]
    by_hand = sum(t * math.log(t / s) for rs, rt in zip(p_s, p_t, strict=True)
                  for s, t in zip(rs, rt, strict=True)) / 2
    assert kl.value.item() == pytest.approx(by_hand, rel=1e-6)


def test_token_logits_use_the_attention_mask() -> None:
    """[B, L, C] logits: consistency over valid tokens only (NaN padding cannot leak), in
    'tokens' units; CE over labelled tokens."""
    torch.manual_seed(0)
    z_s, z_t = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[0, 2, 1, -100], [1, -100, -100, -100]])
    z_s[mask == 0] = float("nan")
    z_t[mask == 0] = float("nan")
    batch = {"labels": labels, "attention_mask": mask}
    terms = MeanTeacher().terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch,
                                TrainState())
    valid = mask.bool()
    expected = ((z_s[valid].softmax(-1) - z_t[valid].softmax(-1)) ** 2).mean()
    assert terms["consistency"].unit == "tokens"
    torch.testing.assert_close(terms["consistency"].value, expected)
    rows = [(0, 0, 0), (0, 1, 2), (0, 2, 1), (1, 0, 1)]
    ce = sum(-torch.log_softmax(z_s[b, t], -1)[y] for b, t, y in rows) / 4
    torch.testing.assert_close(terms["ce"].value, ce)
    assert valid_rows(z_s, {})[0].all()


def test_noise_gives_the_student_and_the_teacher_their_own_copy() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    batch = {"input": x, "labels": torch.tensor([1, -100, 2, 3, -100]),
             "index": torch.arange(5)}
    recipe = MeanTeacher(noise=0.2)
    prepared = recipe.prepare(dict(batch), lambda b: Taps({}), TrainState())
    views = prepared["input"]
    assert views.shape == (10, 1, 8, 8)
    assert prepared[VIEW].tolist() == [0] * 5 + [1] * 5
    assert torch.equal(prepared["labels"], batch["labels"].repeat(2))
    noise_s, noise_t = views[:5] - x, views[5:] - x
    assert not torch.allclose(noise_s, noise_t)
    assert 0.15 < float(torch.cat([noise_s, noise_t]).std()) < 0.25

    # The terms read the student on its copy (rows 0-4) and the teacher on its copy (5-9).
    z_s, z_t = torch.randn(10, 4), torch.randn(10, 4)
    z_s[5:] = float("nan")
    z_t[:5] = float("nan")
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), prepared, TrainState())
    expected = ((z_s[:5].softmax(-1) - z_t[5:].softmax(-1)) ** 2).mean()
    torch.testing.assert_close(terms["consistency"].value, expected)
    assert torch.isfinite(terms["ce"].value)
    assert MeanTeacher().prepare(batch, lambda b: Taps({}), TrainState()) is batch


def test_noise_refuses_token_ids() -> None:
    batch = {"input": torch.ones(2, 5, dtype=torch.long), "labels": torch.zeros(2, 5)}
    with pytest.raises(ValueError, match="noise needs float inputs.*'input'"):
        MeanTeacher(noise=0.1).prepare(batch, lambda b: Taps({}), TrainState())


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(ValidationError, match="momentum"):
        MeanTeacher(momentum=1.5)
    with pytest.raises(ValidationError, match="consistency_weight"):
        MeanTeacher(consistency_weight=-1.0)
    with pytest.raises(ValidationError, match="consistency"):
        MeanTeacher(consistency="l1")


def test_token_classification_fit_trains_student_and_ema(take_snapshot) -> None:
    from kdistill.data.tagging import VOCAB_SIZE, load_tagging
    from kdistill.models.tagger import Tagger

    data = load_tagging(samples=96)
    torch.manual_seed(0)
    student = Tagger(data.input_shape, data.num_classes, vocab_size=VOCAB_SIZE, embed_dim=8,
                     hidden=8)
    before = take_snapshot(student)
    distiller = Distiller(student, None, MeanTeacher(), epochs=2, batch_size=24,
                          progress=False, optimizer={"lr": 0.01})
    result = distiller.fit(data.train, data.test)
    train = [r for r in result.history if r["kind"] == "train"]
    assert {"ce", "consistency"} <= set(train[-1])
    assert all(math.isfinite(r["consistency"]) for r in train)
    ema = distiller.teacher.model.state_dict()
    after = take_snapshot(student)
    for name, _ in student.named_parameters():
        assert not torch.equal(after[name], before[name])
        assert not torch.equal(ema[name], before[name])
        assert not torch.equal(ema[name], after[name])
    assert 0.0 <= result.evaluations()[-1]["eval_accuracy"] <= 1.0
