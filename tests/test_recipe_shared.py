"""The pieces recipes share (``kdistill.recipes.shared``): stacked views of a batch and their
marks, the rows of logits that count, targets for unlabelled rows, weights as schedules; and
the rule that recipes import one another only as recipes (to subclass or run as a phase)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.recipes import Recipe
from kdistill.recipes.adversarial_training import Adversarial
from kdistill.recipes.denoise import Denoise
from kdistill.recipes.mean_teacher import MeanTeacher
from kdistill.recipes.regression import RegressionKD
from kdistill.recipes.shared import (
    ORIGINAL,
    VIEW,
    StudentHeadParams,
    as_schedule,
    default_anneal_epochs,
    labels_or_teacher_argmax,
    row_views,
    select_rows,
    stack_views,
    valid_rows,
)
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import TapReader

RECIPES_DIR = Path(importlib.import_module("kdistill.recipes").__file__).parent
HELPER_MODULES = {"base", "shared", "adapters", "layer_stages", "completions",
                  "completion_store"}


def batch_of(rows: int = 3) -> dict:
    return {"input": torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2),
            "labels": torch.arange(rows), "index": torch.arange(10, 10 + rows),
            "name": "digits"}


# -- stack_views -------------------------------------------------------------------------------
def test_stack_views_keeps_the_views_in_order_and_marks_every_row() -> None:
    clean, noisy = batch_of(), {**batch_of(), "input": -batch_of()["input"], "name": "other"}
    out = stack_views({ORIGINAL: clean, 1: noisy, 2: noisy})
    assert out[VIEW].dtype == torch.long
    assert out[VIEW].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(out["input"], torch.cat([clean["input"], noisy["input"], noisy["input"]]))
    assert out["index"].tolist() == [10, 11, 12] * 3
    assert out["labels"].tolist() == [0, 1, 2] * 3  # every view keeps its labels by default
    assert out["name"] == "digits"  # a value that is not per sample comes from the first view
    assert VIEW not in clean and clean["labels"].tolist() == [0, 1, 2]  # inputs untouched


def test_stack_views_row_order_follows_the_mapping_not_the_ids() -> None:
    a, b = batch_of(2), {**batch_of(2), "input": torch.full((2, 2), 7.0)}
    out = stack_views({5: b, 3: a})
    assert out[VIEW].tolist() == [5, 5, 3, 3]
    assert out["input"][:2].eq(7).all() and torch.equal(out["input"][2:], a["input"])


def test_stack_views_hides_the_labels_of_the_unlabeled_views() -> None:
    out = stack_views({ORIGINAL: batch_of(), 1: batch_of(), 2: batch_of()}, unlabeled=(1, 2))
    assert out["labels"].tolist() == [0, 1, 2] + [-100] * 6
    scores = {**batch_of(2), "labels": torch.tensor([0.5, float("nan")])}
    out = stack_views(dict(enumerate([scores, scores])), unlabeled=range(1, 2))
    assert out["labels"][0] == 0.5 and out["labels"][1:].isnan().all()
    per_token = {"input_ids": torch.ones(2, 4, dtype=torch.long),
                 "labels": torch.tensor([[1, 2, -100, -100], [0, 0, 1, -100]])}
    out = stack_views({ORIGINAL: per_token, 1: per_token}, unlabeled=[1])
    assert torch.equal(out["labels"][:2], per_token["labels"]) and (out["labels"][2:] == -100).all()
    assert out[VIEW].tolist() == [0, 0, 1, 1]
    no_labels = {"input": torch.zeros(2, 3)}
    assert "labels" not in stack_views({ORIGINAL: no_labels, 1: no_labels}, unlabeled=[1])


def test_a_one_view_stack_marks_every_row_with_that_view() -> None:
    batch = batch_of(4)
    out = stack_views({1: batch})
    assert out[VIEW].tolist() == [1, 1, 1, 1]
    assert all(torch.equal(out[k], batch[k]) for k in ("input", "labels", "index"))


def test_stack_views_concatenates_per_sample_tensors_only() -> None:
    """Rows are counted on the first 1-D-or-more tensor of ``index``/``labels``/``input``/
    ``input_ids``; a 0-d tensor or a non-tensor value (raw texts, a name) comes from the first
    view even when its length equals the number of rows."""
    first = {"labels": torch.tensor([1, 2, 0]), "texts": ["a", "b", "c"], "name": "abc",
             "step": torch.tensor(7)}
    second = {"labels": torch.tensor([2, 2, 1]), "texts": ["x", "y", "z"], "name": "xyz",
              "step": torch.tensor(8)}
    out = stack_views({ORIGINAL: first, 1: second})
    assert out["labels"].tolist() == [1, 2, 0, 2, 2, 1]
    assert out[VIEW].tolist() == [0, 0, 0, 1, 1, 1]
    assert out["texts"] == ["a", "b", "c"] and out["name"] == "abc"
    assert out["step"].dim() == 0 and out["step"].item() == 7


def test_stack_views_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least one view"):
        stack_views({})
    with pytest.raises(ValueError, match=r"unlabeled names views \[2\]"):
        stack_views({ORIGINAL: batch_of(), 1: batch_of()}, unlabeled=(2,))
    with pytest.raises(ValueError, match="how many samples.*keys: \\['other'\\]"):
        stack_views({ORIGINAL: {"other": torch.zeros(2)}})


def test_row_views_and_select_rows_read_a_stack_back() -> None:
    a, b = batch_of(), {**batch_of(), "input": torch.zeros(3, 2)}
    out = stack_views({ORIGINAL: a, 1: b}, unlabeled=[1])
    views = row_views(out, "demo")
    back = select_rows(out, views == ORIGINAL)
    assert set(back) == {"input", "labels", "index", "name", VIEW}
    assert all(torch.equal(back[k], a[k]) for k in ("input", "labels", "index"))
    assert back["name"] == "digits" and back[VIEW].tolist() == [0, 0, 0]
    copy = select_rows(out, views == 1)
    assert torch.equal(copy["input"], b["input"]) and (copy["labels"] == -100).all()
    with pytest.raises(ValueError, match="^demo: the batch has no 'view' key"):
        row_views(batch_of(), "demo")


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@pytest.mark.parametrize(("recipe", "views", "hidden", "original"), [
    (MeanTeacher(noise=0.1), [0, 1], [], False),  # two noisy copies, neither the original
    (Denoise(augmentation="noise"), [0, 1, 2], [1, 2], True),
    (RegressionKD(copies=2), [0, 1, 2], [1, 2], True),
    (Adversarial(clean_weight=0.5, steps=1), [0, 1], [], True),
    (Adversarial(steps=1), [1], [], False),  # the perturbed rows alone
], ids=["mean_teacher", "denoise", "regression_kd", "adversarial", "adversarial_only"])
def test_every_recipe_that_stacks_views_follows_the_one_convention(recipe, views, hidden,
                                                                   original) -> None:
    """Rows grouped by view in the stated order, one long mark per row, the same samples in
    every view, labels hidden exactly on the copies whose labels the method drops, and view
    ``ORIGINAL`` unchanged in the stacks that keep the batch as it came."""
    batch = {"input": torch.rand(4, 2), "index": torch.arange(4),
             "labels": torch.rand(4) if isinstance(recipe, RegressionKD)
             else torch.tensor([0, 1, 2, -100])}
    torch.manual_seed(0)
    with TapReader(Linear(), ["logits"]) as reader:
        out = recipe.prepare(dict(batch), reader, TrainState())
    assert out[VIEW].dtype == torch.long
    assert out[VIEW].tolist() == [v for v in views for _ in range(4)]
    for view in views:
        part = select_rows(out, out[VIEW] == view)
        assert torch.equal(part["index"], batch["index"])
        labels_hidden = ~torch.nan_to_num(part["labels"], nan=-100).ne(-100)
        assert bool(labels_hidden.all()) == (view in hidden)
        assert torch.equal(part["input"], batch["input"]) == (original and view == ORIGINAL)


# -- rows of logits ----------------------------------------------------------------------------
def test_valid_rows_of_sample_logits_are_every_sample_in_examples() -> None:
    valid, unit = valid_rows(torch.zeros(5, 3), {"attention_mask": torch.zeros(5, 7)})
    assert unit == "examples" and valid.dtype == torch.bool and valid.tolist() == [True] * 5


def test_valid_rows_of_token_logits_follow_the_attention_mask() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    valid, unit = valid_rows(torch.zeros(2, 3, 4), {"attention_mask": mask})
    assert unit == "tokens" and valid.dtype == torch.bool
    assert valid.tolist() == [[True, True, False], [True, False, False]]
    valid, unit = valid_rows(torch.zeros(2, 3, 4), {})
    assert unit == "tokens" and valid.shape == (2, 3) and valid.all()
    with pytest.raises(ValueError, match=r"attention_mask \(2, 2\) does not match"):
        valid_rows(torch.zeros(2, 3, 4), {"attention_mask": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"expected logits \[B, C\].*\(2, 3, 4, 5\)"):
        valid_rows(torch.zeros(2, 3, 4, 5), {})


def test_labels_or_teacher_argmax_fills_only_the_hidden_labels() -> None:
    teacher = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    batch = {"labels": torch.tensor([0, -100, -100])}
    assert labels_or_teacher_argmax(batch, teacher).tolist() == [0, 0, 2]
    assert labels_or_teacher_argmax({}, teacher).tolist() == [1, 0, 2]


# -- weights, heads, annealing ------------------------------------------------------------------
def test_as_schedule_turns_a_number_into_a_constant_and_keeps_a_schedule() -> None:
    state = TrainState(epoch=3, step=40, epoch_progress=3.5)
    assert as_schedule(2.5).at(state) == 2.5
    ramp = ScheduleConfig(name="linear", start=0.0, end=1.0, length=7.0)
    assert as_schedule(ramp) is ramp
    assert as_schedule(ramp).at(state) == pytest.approx(0.5)


def test_student_head_params_are_shared_by_the_recipes_that_add_heads() -> None:
    from kdistill.recipes.deit import DeiTParams
    from kdistill.recipes.okdhp import OKDHPParams
    assert issubclass(DeiTParams, StudentHeadParams) and issubclass(OKDHPParams, StudentHeadParams)
    assert StudentHeadParams().model_dump() == {"features": "features", "head": "head",
                                                "in_features": None, "num_classes": None}
    with pytest.raises(ValueError, match="num_classes"):
        StudentHeadParams(num_classes=1)


def test_default_anneal_epochs_is_two_thirds_rounded_and_at_least_one() -> None:
    assert [default_anneal_epochs(e) for e in (1, 2, 3, 4, 15, 300)] == [1, 1, 2, 3, 10, 200]


# -- the import rule -----------------------------------------------------------------------------
def recipe_imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, name) for every import of one recipe module's
    names by another."""
    found = []
    for path in sorted(RECIPES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "kdistill.recipes."):
                source = node.module.rsplit(".", 1)[1]
                if source not in HELPER_MODULES:
                    found += [(path.stem, node.module, alias.name) for alias in node.names]
    return found


def test_recipes_import_one_another_only_as_recipes() -> None:
    imports = recipe_imports()
    assert ("atsen", "kdistill.recipes.mean_teacher", "valid_rows") not in imports
    assert imports, "expected the subclassing imports (daft, oracle from hinton...)"
    helpers = [(where, f"{module}.{name}") for where, module, name in imports
               if not (isinstance(obj := getattr(importlib.import_module(module), name), type)
                       and issubclass(obj, Recipe))]
    assert helpers == [], "recipes share helpers through kdistill.recipes.shared"
