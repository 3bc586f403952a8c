"""The functions recipes compute with, at their edges, against the formulas in ``recipe_maths``.

* The class axis is the last one whatever the leading shape: token logits ``[B, L, C]`` and
  stacked heads ``[k, B, L, C]`` give the same per-row maths as ``[B, C]``.
* Boundaries: a confidence exactly at the threshold, a single valid row, a probability of 0.
* Documented defaults, pinned by calling without them.
* Devices and dtypes: masks and adapters follow the tensors they are made for (checked on the
  ``meta`` device, which every machine has), half-precision logits are computed in float32.
"""

from __future__ import annotations

import math

import pytest
import recipe_maths as maths
import torch
from recipe_maths import check_terms, seeded
from torch import nn

from kdistill.batch import UNLABELED
from kdistill.recipes.adapters import LastDimLinear, make_adapter
from kdistill.recipes.atsen import pseudo_labels, share
from kdistill.recipes.bdkd import bdkd_terms, divergence_weights, entropy
from kdistill.recipes.continuation import hinge_mse
from kdistill.recipes.deit import DeiT
from kdistill.recipes.mean_teacher import consistency_loss
from kdistill.recipes.okdhp import BranchGate
from kdistill.recipes.regression import gold_mse
from kdistill.recipes.shared import VIEW, labels_or_teacher_argmax, stack_views, valid_rows
from kdistill.schedules import TrainState
from kdistill.taps import Taps

U = UNLABELED
Z3 = seeded(2, 3, 4, seed=11, scale=2.0)  # token logits [B, L, C], L != C
T3 = seeded(2, 3, 4, seed=12, scale=3.0)
TOKEN_LABELS = torch.tensor([[1, U, 3], [U, 0, U]])
META = torch.device("meta")


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the class axis is the last


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 4)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_entropy_is_over_the_classes_of_every_row(shape: tuple[int, ...],
                                                  temperature: float) -> None:
    z = seeded(*shape, seed=13, scale=2.0)
    got = entropy(z, temperature)
    assert got.shape == shape[:-1]
    close(got, maths.entropy(z, temperature))


def test_entropy_counts_zero_probabilities_as_zero() -> None:
    """0 log 0 = 0: a class with probability exactly 0 (logit -inf) adds nothing, no NaN."""
    z = torch.tensor([[0.0, -math.inf, 0.0], [0.0, 0.0, 0.0], [3.0, -math.inf, -math.inf]])
    assert entropy(z).tolist() == pytest.approx([math.log(2), math.log(3), 0.0], abs=1e-7)


def test_entropy_of_half_precision_logits_is_computed_in_float32() -> None:
    z = seeded(4, 6, seed=14, scale=3.0).bfloat16()
    got = entropy(z, 2.0)
    assert got.dtype == torch.float32
    close(got, maths.entropy(z, 2.0))  # the bfloat16 values, exactly, in float64


def test_hinge_mse_rows_of_token_logits_are_tokens() -> None:
    """d_b is the mean over the classes of one token; the margin then applies per token."""
    d = ((maths.d(Z3) - maths.d(T3)) ** 2).mean(dim=-1)  # [B, L]
    margin = float(d.flatten().sort().values[2])  # some tokens inside the margin, some not
    close(hinge_mse(Z3, T3, margin), (d - margin).clamp_min(0).mean())


def test_teacher_argmax_of_token_logits_picks_a_class_per_token() -> None:
    got = labels_or_teacher_argmax({"labels": TOKEN_LABELS}, T3)
    expected = torch.where(TOKEN_LABELS >= 0, TOKEN_LABELS, T3.argmax(dim=-1))
    assert got.tolist() == expected.tolist()
    assert labels_or_teacher_argmax({}, T3).tolist() == T3.argmax(dim=-1).tolist()


@pytest.mark.parametrize("leading", [(2,), (2, 5)], ids=["samples", "tokens"])
def test_branch_gate_weighs_the_branches_of_every_row(leading: tuple[int, ...]) -> None:
    """g = softmax over the k = 3 branches of (W f + b) reshaped [k, C], per row and class;
    z_ens = sum_j g_j * z_j. A fresh gate (W = 0, b = 0) is the plain mean of the branches."""
    k, classes, width = 3, 4, 6
    heads = seeded(k, *leading, classes, seed=15, scale=2.0)
    features = seeded(*leading, width, seed=18)
    gate = BranchGate(width, k, classes)
    close(gate.weights(features), torch.full((k, *leading, classes), 1 / k))
    close(gate(features, heads), heads.mean(dim=0))
    weight, bias = seeded(k * classes, width, seed=16), seeded(k * classes, seed=17)
    with torch.no_grad():
        gate.linear.weight.copy_(weight)
        gate.linear.bias.copy_(bias)
    scores = maths.d(features) @ maths.d(weight).T + maths.d(bias)  # [..., k * C]
    g = torch.softmax(scores.reshape(*leading, k, classes), dim=-2).movedim(-2, 0)
    close(gate.weights(features), g)
    close(gate(features, heads), (g * maths.d(heads)).sum(dim=0))


@pytest.mark.parametrize("valid", [torch.tensor([True, False]),
                                   torch.tensor([[True, True, False], [False, True, True]])],
                         ids=["samples", "tokens"])
def test_mean_teacher_consistency_compares_probabilities_over_classes(valid) -> None:
    """``valid`` may pick whole samples of token logits or single tokens: the softmax is over
    the classes either way."""
    s, t = maths.d(Z3)[valid], maths.d(T3)[valid]
    mse = ((s.softmax(-1) - t.softmax(-1)) ** 2).mean()
    close(consistency_loss(Z3, T3, valid, "mse"), mse)
    rows = s.reshape(-1, 4), t.reshape(-1, 4)
    close(consistency_loss(Z3, T3, valid, "kl"),
          maths.kl(maths.log_p(rows[1]), maths.log_p(rows[0])).mean())


def test_deit_hard_target_is_the_teacher_class_of_every_token() -> None:
    """Heads [2, B, L, C]: the targets are per token (the values only; the units of token terms
    are not DeiT's documented use)."""
    heads = torch.stack([Z3, seeded(2, 3, 4, seed=18, scale=2.0)])
    terms = DeiT(alpha=0.3, label_smoothing=0.0).terms(
        Taps({"heads": heads}), Taps({"logits": T3}), {"labels": TOKEN_LABELS}, TrainState())
    hard = T3.argmax(dim=-1)
    filled = torch.where(TOKEN_LABELS >= 0, TOKEN_LABELS, hard)
    assert terms["ce"].value.item() == pytest.approx(maths.ce(heads[0], filled), rel=1e-5)
    assert terms["distill"].value.item() == pytest.approx(maths.ce(heads[1], hard), rel=1e-5)
    assert (terms["ce"].weight, terms["distill"].weight) == pytest.approx((0.7, 0.3))


# ------------------------------------------------------------------------------- boundaries


def test_a_confidence_exactly_at_the_threshold_is_kept() -> None:
    """Kept iff max q_a >= threshold and max q_b >= threshold: two equal logits sharpen to
    q = (0.5, 0.5) exactly, so at threshold 0.5 each teacher's confidence sits on the bound."""
    sure, tie = [6.0, 0.0], [0.0, 0.0]
    a = torch.tensor([tie, sure, tie])
    b = torch.tensor([tie, tie, sure])
    valid = torch.ones(3, dtype=torch.bool)
    out = pseudo_labels(a, b, valid, threshold=0.5, power=3.0)
    assert out.kept.tolist() == [True, True, True] and out.labels.tolist() == [0, 0, 0]
    assert not out.disagree.any()
    above = pseudo_labels(a, b, valid, threshold=0.5001, power=3.0)
    assert not above.kept.any() and above.labels.tolist() == [U, U, U]


@pytest.mark.parametrize(("rows", "valid", "expected"), [
    ([True, False, False], [True, False, False], 3.0),  # one valid row: divide by 1
    ([True, False, False], [True, True, True], 1.0),
    ([True, True, False], [True, True, True], 2.0),
    ([False, False, False], [False, False, False], 0.0),  # nothing valid: zero, not NaN
])
def test_share_is_a_sum_over_the_rows_divided_by_the_valid_rows(rows, valid, expected) -> None:
    got = share(torch.tensor(3.0), torch.tensor(rows), torch.tensor(valid))
    assert got.item() == pytest.approx(expected)


# --------------------------------------------------------------------------------- defaults


def test_bdkd_functions_default_to_t_1_and_gap_scale_half() -> None:
    """w_r = sigmoid((H_s - H_t) / 0.5) at T = 1 and the teacher's KL(p_s || p_t) when none is
    given (BDKD's defaults)."""
    s, t = seeded(6, 5, seed=19, scale=2.0), seeded(6, 5, seed=20, scale=0.5)
    labels = torch.tensor([1, U, 0, 4, 2, U])
    reverse = torch.sigmoid((maths.entropy(s) - maths.entropy(t)) / 0.5)
    w_forward, w_reverse = divergence_weights(s, t)
    close(w_reverse, reverse)
    close(w_forward, 1 - reverse)
    forward_rows = maths.kl(maths.log_p(t), maths.log_p(s))  # KL(p_t || p_s) per sample
    reverse_rows = maths.kl(maths.log_p(s), maths.log_p(t))
    check_terms(bdkd_terms(s, t, labels), {
        "ce": (maths.ce(s, labels), 1.0, "labeled"),
        "forward_kl": (float(((1 - reverse) * forward_rows).mean()), 1.0, "examples"),
        "reverse_kl": (float((reverse * reverse_rows).mean()), 1.0, "examples"),
        "teacher_ce": (maths.ce(t, labels), 1.0, "labeled"),
        "teacher_kl": (float(reverse_rows.mean()), 1.0, "examples")})


# ------------------------------------------------------------------------- devices and dtypes


@pytest.mark.parametrize(("shape", "batch"), [
    ((2, 3), {}),
    ((2, 3), {"attention_mask": torch.ones(2, 5)}),
    ((2, 3, 4), {}),
    ((2, 3, 4), {"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}),
], ids=["samples", "samples+mask", "tokens", "tokens+mask"])
def test_valid_rows_are_a_boolean_mask_on_the_logits_device(shape, batch) -> None:
    rows, _ = valid_rows(torch.zeros(shape, device=META), batch)
    assert rows.device == META and rows.dtype == torch.bool and rows.shape == shape[:-1]


def test_teacher_argmax_targets_live_on_the_teacher_device() -> None:
    labels = torch.tensor([1, U, 2])  # on the CPU
    got = labels_or_teacher_argmax({"labels": labels}, torch.zeros(3, 4, device=META))
    assert got.device == META and got.shape == (3,) and got.dtype == torch.long


def test_stacked_view_marks_live_on_the_batch_device() -> None:
    batch = {"input": torch.zeros(2, 3, device=META), "labels": torch.zeros(2, device=META)}
    out = stack_views({0: batch, 1: batch})
    assert out[VIEW].device == META and out[VIEW].dtype == torch.long
    assert out[VIEW].shape == (4,) and out["input"].shape == (4, 3)


@pytest.mark.parametrize(("kind", "student", "teacher", "layer", "weight"), [
    ("linear", (2, 3, 5), (2, 3, 7), LastDimLinear, (7, 5)),
    ("conv1x1", (2, 3, 5, 5), (2, 4, 5, 5), nn.Conv2d, (4, 3, 1, 1)),  # C_s = 3, H = W = 5
    ("none", (2, 3), (2, 3), nn.Identity, None),
])
def test_adapters_map_student_to_teacher_shape_on_the_student_device_and_dtype(
        kind, student, teacher, layer, weight) -> None:
    s = torch.rand(student, dtype=torch.float64)
    adapter = make_adapter(kind, s, torch.zeros(teacher))
    assert type(adapter) is layer
    assert adapter(s).shape == teacher and adapter(s).dtype == torch.float64
    if weight is not None:
        assert adapter.weight.shape == weight
        assert {p.dtype for p in adapter.parameters()} == {torch.float64}
    on_meta = make_adapter(kind, torch.zeros(student, device=META, dtype=torch.float16),
                           torch.zeros(teacher, device=META))
    for p in on_meta.parameters():
        assert p.device == META and p.dtype == torch.float16


def test_gold_mse_is_in_the_scores_dtype_whatever_the_labels_dtype() -> None:
    """Float64 labels (numpy, CSV) do not turn a float32 model's loss into float64."""
    s = torch.tensor([0.5, 1.0, -2.0], requires_grad=True)
    labels = torch.tensor([0.25, float("nan"), -1.0], dtype=torch.float64)
    got = gold_mse(s, labels, torch.ones(3, dtype=torch.bool))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(((0.5 - 0.25) ** 2 + 1.0) / 2)
