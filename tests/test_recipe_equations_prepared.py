"""Equation tests of the recipes whose ``prepare`` stacks copies of the batch:
``regression_kd`` (noisy copies), ``denoise`` (two identical augmented copies),
``adversarial`` (PGD) and ``mean_teacher`` with input noise.

``prepare``'s row layout is pinned by the tensor values it returns (the clean rows first and
unchanged, then the copies; the name of the key marking the rows is the recipe's own
business). The terms are then computed on a batch built from that output with hand-made
labels - known labels on the copies too, so a term that reads rows it must not read changes
value - and hand-made taps for every row.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from recipe_maths import ce, check_terms, d, hinton_kd_rows, kl, log_p, mean_over, seeded
from torch import nn

from kdistill.batch import UNLABELED
from kdistill.recipes import build_recipe
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps

U = UNLABELED
STATE = TrainState(epoch=1, step=5, epoch_progress=1.5, steps_per_epoch=4, total_steps=12)


def no_student(batch: Any) -> Taps:
    raise AssertionError("this prepare must not run the student")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN."""
    return a.shape == b.shape and bool(torch.equal(a.isnan(), b.isnan())) and bool(
        torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))


# ------------------------------------------------------------------------------ regression_kd


def test_regression_kd_prepare_appends_noisy_copies_with_hidden_scores() -> None:
    x = torch.rand(300, 5, generator=torch.Generator().manual_seed(60))
    labels = seeded(300, seed=61)
    labels[::3] = float("nan")
    batch = {"input": x, "labels": labels, "index": torch.arange(300)}
    torch.manual_seed(0)
    out = build_recipe("regression_kd", copies=2, noise_std=0.3).prepare(batch, no_student,
                                                                         STATE)
    assert out["input"].shape == (900, 5)
    assert torch.equal(out["input"][:300], x)
    noise = [out["input"][300 * c:300 * (c + 1)] - x for c in (1, 2)]
    assert not torch.equal(noise[0], noise[1])
    for n in noise:
        assert float(n.std()) == pytest.approx(0.3, abs=0.02)
        assert float(n.mean()) == pytest.approx(0.0, abs=0.02)
    assert same(out["labels"][:300], labels) and bool(out["labels"][300:].isnan().all())
    assert torch.equal(out["index"], torch.arange(300).repeat(3))


@pytest.mark.parametrize("shape", [(12,), (12, 1)])
def test_regression_kd_terms_on_a_prepared_batch(shape: tuple[int, ...]) -> None:
    """MSE(s(x), t(x)) + w_aug MSE(s(x~), t(x~)) + w_gold MSE(s(x), y) over known y of the
    original rows."""
    raw = {"input": seeded(4, 3, seed=62), "labels": torch.tensor([0.5, float("nan"), -1.0, 2.0]),
           "index": torch.arange(4)}
    recipe = build_recipe("regression_kd", copies=2, noise_std=0.3, augmented_weight=0.4,
                          gold_weight=0.7)
    batch = recipe.prepare(raw, no_student, STATE)
    # scores known on the copies too: the gold term must still read the original rows only
    batch["labels"] = torch.tensor([0.5, float("nan"), -1.0, 2.0] + [1.0, 2, 3, 4, 5, 6, 7, 8])
    s, t = seeded(*shape, seed=63), seeded(*shape, seed=64)
    s64, t64 = d(s).reshape(-1), d(t).reshape(-1)
    original = torch.arange(12) < 4
    known = original & ~batch["labels"].isnan()
    squared = (s64 - t64) ** 2
    gold = (s64 - d(batch["labels"])) ** 2
    terms = recipe.terms(Taps({"logits": s}), Taps({"logits": t}), batch, STATE)
    check_terms(terms, {"kd": (mean_over(squared, original), 1.0, "examples"),
                        "kd_augmented": (mean_over(squared, ~original), 0.4, "examples"),
                        "gold": (mean_over(gold, known), 0.7, "labeled")})


def test_regression_kd_without_copies_distils_the_original_rows_only() -> None:
    raw = {"input": seeded(4, 3, seed=65), "labels": torch.tensor([0.5, float("nan"), -1.0, 2.0]),
           "index": torch.arange(4)}
    recipe = build_recipe("regression_kd", copies=0, gold_weight=0.7)
    batch = recipe.prepare(raw, no_student, STATE)
    assert torch.equal(batch["input"], raw["input"]) and same(batch["labels"], raw["labels"])
    s, t = seeded(4, seed=66), seeded(4, seed=67)
    known = ~raw["labels"].isnan()
    gold = ((d(s) - d(raw["labels"])) ** 2)[known].mean()
    check_terms(recipe.terms(Taps({"logits": s}), Taps({"logits": t}), batch, STATE),
                {"kd": (float(((d(s) - d(t)) ** 2).mean()), 1.0, "examples"),
                 "gold": (float(gold), 0.7, "labeled")})


# ------------------------------------------------------------------------------------ denoise

DENOISE_PARAMS = {"augmentation": "noise", "noise_std": 0.2, "value_range": None,
                  "temperature": 2.0, "ce_weight": 0.3, "soft_weight": 0.6,
                  "consistency_weight": 1.7}


def test_denoise_prepare_gives_clean_rows_then_the_same_augmented_copy_twice() -> None:
    x = torch.rand(300, 4, generator=torch.Generator().manual_seed(68)) * 0.1
    labels = torch.arange(300) % 5
    labels[::4] = U
    torch.manual_seed(0)
    out = build_recipe("denoise", **DENOISE_PARAMS).prepare(
        {"input": x, "labels": labels, "index": torch.arange(300)}, no_student, STATE)
    assert torch.equal(out["input"][:300], x)
    assert torch.equal(out["input"][300:600], out["input"][600:])
    noise = out["input"][300:600] - x
    assert float(noise.std()) == pytest.approx(0.2, abs=0.015)
    assert float(out["input"].min()) < 0  # no value range: nothing clamped
    assert torch.equal(out["labels"][:300], labels) and bool((out["labels"][300:] == U).all())
    assert torch.equal(out["index"], torch.arange(300).repeat(3))


def denoise_expected(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor,
                     rows: int, valid: torch.Tensor, unit: str) -> dict:
    """ce over the clean labelled rows; soft = T^2 KL(p_t^T || p_s^T) averaged over both
    augmented passes; consistency = (KL(p_1 || p_2) + KL(p_2 || p_1)) / 2 at T = 1."""
    clean, first, second = slice(0, rows), slice(rows, 2 * rows), slice(2 * rows, 3 * rows)
    soft = hinton_kd_rows(z_s[rows:], z_t[rows:], 2.0)
    one, two = log_p(z_s[first]), log_p(z_s[second])
    symmetric = (kl(one, two) + kl(two, one)) / 2
    return {"ce": (ce(z_s[clean], labels[clean]), 0.3, "labeled"),
            "soft": (mean_over(soft, valid[rows:]), 0.6, unit),
            "consistency": (mean_over(symmetric, valid[first]), 1.7, unit)}


def test_denoise_terms_on_a_prepared_batch() -> None:
    raw = {"input": seeded(4, 3, seed=69), "labels": torch.tensor([2, U, 0, 3]),
           "index": torch.arange(4)}
    recipe = build_recipe("denoise", **DENOISE_PARAMS)
    batch = recipe.prepare(raw, no_student, STATE)
    batch["labels"] = torch.tensor([2, U, 0, 3, 1, 1, 2, 0, 4, 3, 2, 1])
    z_s, z_t = seeded(12, 5, seed=70, scale=2.0), seeded(12, 5, seed=71, scale=2.0)
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch, STATE)
    check_terms(terms, denoise_expected(z_s, z_t, batch["labels"], 4,
                                        torch.ones(12, dtype=torch.bool), "examples"))


def test_denoise_token_terms_average_valid_tokens() -> None:
    ids = torch.tensor([[5, 8, 9, 7, 6], [5, 9, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    raw = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(
        [[1, 2, 0, U, 3], [4, U, 1, U, U]]), "index": torch.arange(2)}
    recipe = build_recipe("denoise", **{**DENOISE_PARAMS, "augmentation": "tokens",
                                        "replace_probability": 0.3, "swap_probability": 0.3,
                                        "delete_probability": 0.2, "keep_token_ids": [5]})
    batch = recipe.prepare(raw, no_student, STATE)
    assert torch.equal(batch["input_ids"][:2], ids)
    assert torch.equal(batch["input_ids"][2:4], batch["input_ids"][4:])
    # hand-made masks and labels (the augmented copy's mask shared by both passes)
    copy_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    batch["attention_mask"] = torch.cat([mask, copy_mask, copy_mask])
    batch["labels"] = torch.cat([raw["labels"], torch.tensor([[1, 1, 2, 2, U], [0, 3, U, U, U]]
                                                             ).repeat(2, 1)])
    valid = batch["attention_mask"].bool()
    garbage = seeded(6, 5, 5, seed=72, scale=30.0)
    z_s = torch.where(valid.unsqueeze(-1), seeded(6, 5, 5, seed=73, scale=2.0), garbage)
    z_t = torch.where(valid.unsqueeze(-1), seeded(6, 5, 5, seed=74, scale=2.0), -garbage)
    terms = recipe.terms(Taps({"logits": z_s}, batch["attention_mask"]),
                         Taps({"logits": z_t}, batch["attention_mask"]), batch, STATE)
    check_terms(terms, denoise_expected(z_s, z_t, batch["labels"], 2, valid, "tokens"))


# -------------------------------------------------------------------------------- adversarial


def pgd_by_hand(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, epsilon: float,
                alpha: float, steps: int, value_range: tuple[float, float]) -> torch.Tensor:
    """x_{k+1} = Proj(x_k + alpha sign grad_x CE(f(x_k), y)) from x_0 = x, Proj onto the
    L-inf ball of radius epsilon around x intersected with the value range."""
    low = torch.clamp(x - epsilon, min=value_range[0])
    high = torch.clamp(x + epsilon, max=value_range[1])
    point = x.clone()
    for _ in range(steps):
        point.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(point), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, point)
        point = torch.minimum(torch.maximum(point.detach() + alpha * grad.sign(), low), high)
    return point


class Wavy(nn.Module):
    """sin(60 x): the input gradient changes sign within the ball, so the PGD path depends on
    the step size (with a linear model every step would reach the same corner of the ball)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(60 * x)


@pytest.mark.parametrize(("step_size", "steps", "alpha"), [(0.01, 3, 0.01),
                                                           (None, 4, 2.5 * 0.05 / 4)])
def test_adversarial_prepare_is_pgd_on_the_student(step_size: float | None, steps: int,
                                                   alpha: float) -> None:
    torch.manual_seed(75)
    model = nn.Sequential(nn.Linear(4, 8), Wavy(), nn.Linear(8, 3))
    x = 0.1 + 0.8 * torch.rand(6, 4, generator=torch.Generator().manual_seed(76))
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    params = {"epsilon": 0.05, "step_size": step_size, "steps": steps, "random_start": False,
              "value_range": (0.12, 0.85)}
    expected = pgd_by_hand(model, x, labels, 0.05, alpha, steps, (0.12, 0.85))
    assert (expected != x).any()
    for other in (0.8 * alpha, 1.25 * alpha):  # the step size shows in the result
        assert not torch.allclose(pgd_by_hand(model, x, labels, 0.05, other, steps,
                                              (0.12, 0.85)), expected)
    raw = {"input": x, "labels": labels, "index": torch.arange(6)}
    with TapReader(model, ["logits"]) as reader:
        only = build_recipe("adversarial", **params).prepare(dict(raw), reader, STATE)
        both = build_recipe("adversarial", clean_weight=0.3, **params).prepare(dict(raw),
                                                                              reader, STATE)
    torch.testing.assert_close(only["input"], expected)
    assert torch.equal(only["labels"], labels)
    torch.testing.assert_close(both["input"], torch.cat([x, expected]))
    assert torch.equal(both["labels"], labels.repeat(2))
    assert torch.equal(both["index"], torch.arange(6).repeat(2))


def test_adversarial_terms_on_prepared_batches() -> None:
    """(1 - w) CE(y, f(x_adv)) + w CE(y, f(x)); with w = 0 the batch is the attacked rows."""
    torch.manual_seed(77)
    model = nn.Linear(4, 3)
    raw = {"input": torch.rand(4, 4), "labels": torch.tensor([2, 0, 1, 1]),
           "index": torch.arange(4)}
    with TapReader(model, ["logits"]) as reader:
        recipe = build_recipe("adversarial", clean_weight=0.3, epsilon=0.05, steps=2)
        both = recipe.prepare(dict(raw), reader, STATE)
        default = build_recipe("adversarial", epsilon=0.05, steps=2)
        only = default.prepare(dict(raw), reader, STATE)
    both["labels"] = torch.tensor([2, 0, U, 1, 1, 2, 0, 2])  # the copies' labels differ
    z = seeded(8, 3, seed=78, scale=2.0)
    check_terms(recipe.terms(Taps({"logits": z}), None, both, STATE),
                {"adversarial_ce": (ce(z[4:], both["labels"][4:]), 0.7, "labeled"),
                 "clean_ce": (ce(z[:4], both["labels"][:4]), 0.3, "labeled")})
    check_terms(default.terms(Taps({"logits": z[4:]}), None, only, STATE),
                {"adversarial_ce": (ce(z[4:], only["labels"]), 1.0, "labeled")})


# ------------------------------------------------------------------------ mean_teacher, noise


def test_mean_teacher_noise_gives_each_model_its_own_copy() -> None:
    x = torch.rand(300, 4, generator=torch.Generator().manual_seed(79))
    labels = torch.arange(300) % 5
    torch.manual_seed(0)
    recipe = build_recipe("mean_teacher", noise=0.25, ce_weight=0.6, consistency="kl",
                          consistency_weight=2.5)
    out = recipe.prepare({"input": x, "labels": labels, "index": torch.arange(300)},
                         no_student, STATE)
    noise = [out["input"][:300] - x, out["input"][300:] - x]
    for n in noise:
        assert float(n.std()) == pytest.approx(0.25, abs=0.015)
    assert float((noise[0] - noise[1]).std()) == pytest.approx(0.25 * 2**0.5, abs=0.02)
    assert torch.equal(out["labels"], labels.repeat(2))
    assert torch.equal(out["index"], torch.arange(300).repeat(2))

    raw = {"input": seeded(4, 3, seed=80), "labels": torch.tensor([2, U, 0, 3]),
           "index": torch.arange(4)}
    batch = recipe.prepare(raw, no_student, STATE)
    batch["labels"] = torch.tensor([2, U, 0, 3, 1, 1, 1, 1])
    z_s, z_t = seeded(8, 5, seed=81, scale=2.0), seeded(8, 5, seed=82, scale=2.0)
    terms = recipe.terms(Taps({"logits": z_s}), Taps({"logits": z_t}), batch, STATE)
    # the student reads its copy (rows 0-3), the teacher the other one (rows 4-7)
    consistency = float(kl(log_p(z_t[4:]), log_p(z_s[:4])).mean())
    check_terms(terms, {"ce": (ce(z_s[:4], batch["labels"][:4]), 0.6, "labeled"),
                        "consistency": (consistency, 2.5, "examples")})
