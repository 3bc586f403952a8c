"""The sentence-embedding recipes pinned to their equations: ``embedding_kd`` (MSE or cosine,
with and without a head) and ``ckd`` (InfoNCE against the teacher's batch and a FIFO queue,
learnable scale), each with non-default parameters, against plain float64 maths written
here (never ``kdistill.losses``); the queue's contents step by step."""

from __future__ import annotations

import math

import pytest
import torch
from recipe_maths import check_terms, d, seeded

from kdistill import losses
from kdistill.recipes import build_recipe
from kdistill.schedules import TrainState
from kdistill.taps import Taps

STATE = TrainState(phase=0, epoch=0, step=0, epoch_progress=0.5, steps_per_epoch=2,
                   total_steps=4)


def taps(embeddings: torch.Tensor) -> Taps:
    return Taps({"sentence_embedding": embeddings})


def unit(x: torch.Tensor) -> torch.Tensor:
    return d(x) / d(x).norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------ embedding_kd

def test_embedding_kd_mse_is_the_mean_squared_error_over_rows_and_widths() -> None:
    s, t = seeded(5, 4, seed=1), seeded(5, 4, seed=2, scale=2.0)
    recipe = build_recipe("embedding_kd")
    recipe.build(taps(s), taps(t))
    assert list(recipe.parameters()) == []  # equal widths, head auto: no head
    expected = float(((d(s) - d(t)) ** 2).sum() / (5 * 4))
    check_terms(recipe.terms(taps(s), taps(t), {}, STATE),
                {"embedding": (expected, 1.0, "examples")})


def test_embedding_kd_cosine_goes_through_a_linear_head_when_widths_differ() -> None:
    s, t = seeded(6, 3, seed=3), seeded(6, 5, seed=4)
    recipe = build_recipe("embedding_kd", loss="cosine")
    recipe.build(taps(s), taps(t))
    weight, bias = d(recipe.head.weight), d(recipe.head.bias)
    projected = d(s) @ weight.T + bias
    cosines = (unit(projected) * unit(t)).sum(-1)
    check_terms(recipe.terms(taps(s), taps(t), {}, STATE),
                {"embedding": (float((1 - cosines).mean()), 1.0, "examples")})


def test_embedding_kd_head_linear_adds_a_head_even_for_equal_widths() -> None:
    s, t = seeded(4, 3, seed=5), seeded(4, 3, seed=6)
    recipe = build_recipe("embedding_kd", head="linear")
    recipe.build(taps(s), taps(t))
    projected = d(s) @ d(recipe.head.weight).T + d(recipe.head.bias)
    check_terms(recipe.terms(taps(s), taps(t), {}, STATE),
                {"embedding": (float(((projected - d(t)) ** 2).mean()), 1.0, "examples")})


def test_embedding_recipes_refuse_outputs_that_are_not_sentence_embeddings() -> None:
    recipe = build_recipe("embedding_kd")
    with pytest.raises(ValueError, match=r"embedding_kd: expected sentence embeddings \[B, D\] "
                                         r"from both models, got student \(2, 3, 4\)"):
        recipe.build(taps(torch.zeros(2, 3, 4)), taps(torch.zeros(2, 4)))


# --------------------------------------------------------------------------------------- ckd

def ckd_by_hand(query: torch.Tensor, positives: torch.Tensor, index: list[int],
                queue: list[tuple[int, torch.Tensor]], scale: float) -> float:
    """-(1/B) sum_i log softmax over row i's keys (the batch, then the queued (index, vector)
    pairs), the keys of the row's own sample other than its positive left out."""
    keys = [(i, v) for i, v in zip(index, positives, strict=True)] + queue
    total = 0.0
    for row, (q, own) in enumerate(zip(query, index, strict=True)):
        scores = [scale * float(unit(q) @ unit(v)) for j, (i, v) in enumerate(keys)
                  if j == row or i != own]
        positive = scale * float(unit(q) @ unit(positives[row]))
        total += math.log(sum(math.exp(x) for x in scores)) - positive
    return total / len(index)


def test_ckd_is_info_nce_against_the_batch_and_the_queue_with_a_learnable_scale() -> None:
    recipe = build_recipe("ckd", queue_size=5, scale=7.0, scale_max=50.0)
    assert math.exp(float(recipe.log_scale.detach())) == pytest.approx(7.0)
    assert recipe.log_scale.requires_grad
    queued: list[tuple[int, torch.Tensor]] = []
    # Three micro-batches of 3 texts; the third shows sample 1 again (a later epoch), whose
    # queued embedding must not be a negative of its own row.
    batches = [[0, 1, 2], [3, 4, 5], [1, 6, 7]]
    for step, index in enumerate(batches):
        s = seeded(3, 4, seed=10 + step, scale=2.0)
        t = seeded(3, 6, seed=20 + step)
        if step == 0:
            recipe.build(taps(s), taps(t))
        projected = d(s) @ d(recipe.head.weight).T + d(recipe.head.bias)
        expected = ckd_by_hand(projected, d(t), index, queued, 7.0)
        check_terms(recipe.terms(taps(s), taps(t), {"index": torch.tensor(index)}, STATE),
                    {"ckd": (expected, 1.0, "examples")})
        queued = ([(i, v) for i, v in zip(index, d(t), strict=True)] + queued)[:5]


def test_the_ckd_scale_is_clamped_at_scale_max_and_fixed_without_learn_scale() -> None:
    recipe = build_recipe("ckd", scale=3.0, scale_max=4.0)
    with torch.no_grad():
        recipe.log_scale.fill_(math.log(9.0))
    assert float(recipe.logit_scale().detach()) == pytest.approx(4.0)
    fixed = build_recipe("ckd", scale=3.0, learn_scale=False)
    assert list(fixed.parameters()) == [] and "log_scale" in dict(fixed.named_buffers())
    with pytest.raises(ValueError, match="scale 5.0 exceeds scale_max 4.0"):
        build_recipe("ckd", scale=5.0, scale_max=4.0)


def test_the_queue_keeps_the_newest_teacher_embeddings_without_gradient() -> None:
    recipe = build_recipe("ckd", queue_size=4, head="auto")
    for step in range(3):  # 3 x 3 = 9 embeddings through a queue of 4
        s = seeded(3, 2, seed=30 + step).requires_grad_()
        t = seeded(3, 2, seed=40 + step)
        if step == 0:
            recipe.build(taps(s), taps(t))
            assert recipe.queue_index.tolist() == [-1] * 4  # empty slots
        recipe.terms(taps(s), taps(t), {"index": torch.arange(3) + 3 * step}, STATE)
    # Newest first: the last batch in its order, then the previous batch's first sample.
    assert recipe.queue_index.tolist() == [6, 7, 8, 3]
    expected = torch.cat([seeded(3, 2, seed=42), seeded(3, 2, seed=41)[:1]])
    assert torch.equal(recipe.queue, expected)
    assert not recipe.queue.requires_grad and recipe.queue.grad_fn is None
    assert {name for name, _ in recipe.named_buffers()} == {"queue", "queue_index"}
    assert "queue" not in dict(recipe.named_parameters())


def test_the_queue_never_holds_the_students_embeddings() -> None:
    recipe = build_recipe("ckd", queue_size=6, head="auto")
    s, t = seeded(3, 2, seed=50), seeded(3, 2, seed=51)
    recipe.build(taps(s), taps(t))
    recipe.terms(taps(s), taps(t), {"index": torch.arange(3)}, STATE)
    assert torch.equal(recipe.queue[:3], t) and not torch.equal(recipe.queue[:3], s)
    assert torch.equal(recipe.queue[3:], torch.zeros(3, 2))


def test_ckd_needs_the_sample_index() -> None:
    recipe = build_recipe("ckd", queue_size=2)
    s, t = seeded(2, 3, seed=1), seeded(2, 3, seed=2)
    recipe.build(taps(s), taps(t))
    with pytest.raises(ValueError, match="ckd: the batch has no 'index'"):
        recipe.terms(taps(s), taps(t), {"labels": torch.zeros(2)}, STATE)


def test_info_nce_leaves_out_excluded_keys_but_never_the_positive() -> None:
    q, k = seeded(2, 3, seed=60), seeded(4, 3, seed=61)
    exclude = torch.tensor([[True, True, False, False], [False, True, False, True]])
    got = losses.info_nce(q, k, 2.5, exclude)
    scores = 2.5 * unit(q) @ unit(k).T
    row0 = torch.logsumexp(scores[0, [0, 2, 3]], 0) - scores[0, 0]  # own key kept
    row1 = torch.logsumexp(scores[1, [0, 1, 2]], 0) - scores[1, 1]
    assert float(got) == pytest.approx(float((row0 + row1) / 2), rel=1e-6)
    with pytest.raises(ValueError, match=r"info_nce: expected query \[B, D\] and keys "
                                         r"\[K >= B, D\], got query \(2, 3\) and keys \(1, 3\)"):
        losses.info_nce(q, k[:1], 1.0)


def test_a_params_object_passed_as_it_is_sets_the_recipe() -> None:
    from kdistill.recipes.embedding import EmbeddingKD, EmbeddingKDParams

    assert EmbeddingKD(EmbeddingKDParams(loss="cosine", head="linear")).params.model_dump() == {
        "loss": "cosine", "head": "linear"}
