"""Recipes hand their parameters on: to the registry, to their own state, to the augmentations
and attacks they call, and to the terms they compute.

Each check runs the recipe and the function it delegates to on the same seed with non-default
values and asserts identical results, and asserts that putting back the function's own default
for any one parameter changes the result (so every value is seen to arrive, not just one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from lm_models import tokenizer_folder
from recipe_maths import d, seeded
from torch import nn

from kdistill import augment
from kdistill.adversarial import pgd_perturb
from kdistill.recipes import build_recipe
from kdistill.recipes.adversarial_training import Adversarial
from kdistill.recipes.base import RECIPES, Recipe, RecipeEntry, get_recipe, register
from kdistill.recipes.denoise import CLEAN, FIRST, SECOND, Denoise, augmentation_kind
from kdistill.recipes.okdhp import OKDHP
from kdistill.recipes.regression import RegressionKD
from kdistill.recipes.shared import stack_views
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps

STATE = TrainState()


def same(a: Any, b: Any) -> bool:
    """Equal values: tensors element for element, dicts key for key."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def seeded_run(call: Callable[[], Any], seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return call()


# ---------------------------------------------------------------------------------- registry


def test_register_adds_a_recipe_under_its_name_once(monkeypatch) -> None:
    monkeypatch.setattr("kdistill.recipes.base.RECIPES", dict(RECIPES))

    class Demo(Recipe):
        name = "demo_recipe"
        summary = "a demo"
        paper = "-"

    assert register(Demo) is Demo
    from kdistill.recipes import base
    assert base.RECIPES["demo_recipe"] == RecipeEntry("demo_recipe", Demo)
    assert get_recipe("demo_recipe") is Demo
    assert (base.RECIPES["demo_recipe"].summary, base.RECIPES["demo_recipe"].paper) == \
        ("a demo", "-")

    class Again(Demo):
        summary = "another"

    with pytest.raises(ValueError) as raised:
        register(Again)
    assert str(raised.value) == "recipe 'demo_recipe' is registered twice"
    assert get_recipe("demo_recipe") is Demo  # the first registration stands
    assert "demo_recipe" not in RECIPES  # the real registry never saw it


# ------------------------------------------------------------------- parameters and state

# (recipe, parameters given as an object, overrides given as keywords)
GIVEN = [
    ("hinton", {"temperature": 2.5}, {"alpha": 0.25}),
    ("okdhp", {"temperature": 2.5, "branches": 4}, {"kl_weight": 0.25}),
    ("fitnets", {"temperature": 2.5, "adapter": "none"}, {"alpha": 0.25}),
    ("composite", {"terms": [{"loss": "logit_mse"}]}, {}),
]


@pytest.mark.parametrize(("name", "given", "overrides"), GIVEN, ids=[g[0] for g in GIVEN])
def test_a_parameter_object_and_keyword_overrides_combine(name, given, overrides) -> None:
    cls = get_recipe(name)
    recipe = cls(cls.Params(**given), **overrides)
    assert recipe.params == cls.Params(**given, **overrides)
    assert recipe.params == build_recipe(name, **given, **overrides).params


def test_shape_dependent_state_does_not_exist_before_the_first_batch() -> None:
    for recipe, attribute in ((OKDHP(), "gate"), (build_recipe("fitnets"), "adapter")):
        assert getattr(recipe, attribute) is None
        assert list(recipe.parameters()) == []
    assert list(build_recipe("composite", terms=[{"loss": "logit_mse"}]).parameters()) == []


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_reads_teacher_taps_exactly_when_it_uses_a_teacher(name) -> None:
    params = {"composite": {"terms": [{"loss": "ce"}]},
              "lead": {"student_layers": 3, "teacher_layers": 4},
              "grain": {"hidden_layers": [[0, 0], [2, 4]]},
              "span_kd": {"student_tokenizer": tokenizer_folder(),
                          "teacher_tokenizer": tokenizer_folder()}}.get(name, {})
    recipe = build_recipe(name, **params)
    # seqkd uses its teacher's model to generate (test_recipe_seqkd.py), never its taps.
    assert bool(recipe.teacher_taps()) == (recipe.uses_teacher and name != "seqkd")
    assert recipe.student_taps()  # every recipe reads the student


class OwnHead(nn.Module):
    """A student whose head is not an ``nn.Linear``: new heads need their size given."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_okdhp_gives_the_head_size_to_the_branches() -> None:
    wrapped = OKDHP(in_features=6, num_classes=3).wrap_student(OwnHead())
    assert wrapped.branches == 3
    assert wrapped(torch.rand(5, 4))["heads"].shape == (3, 5, 3)
    with pytest.raises(ValueError, match="give in_features and num_classes"):
        OKDHP().wrap_student(OwnHead())


# ------------------------------------------------------------------------------- denoise


@pytest.mark.parametrize(("batch", "asked", "kind"), [
    ({"input": torch.zeros(2, 1, 4, 4)}, "auto", "image"),
    ({"input": torch.zeros(2, 3)}, "auto", "noise"),
    ({"input": torch.zeros(2, 3, 4)}, "auto", "noise"),
    ({"input": ["a", "b"]}, "auto", "noise"),
    ({}, "auto", "noise"),
    ({"input_ids": torch.zeros(2, 3), "input": torch.zeros(2, 1, 4, 4)}, "auto", "tokens"),
    ({"input": torch.zeros(2, 3)}, "image", "image"),
    ({"input_ids": torch.zeros(2, 3)}, "noise", "noise"),
])
def test_augmentation_kind_follows_the_batch_only_for_auto(batch, asked, kind) -> None:
    assert augmentation_kind(batch, asked) == kind


def token_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 40, (6, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 1::3] = 7  # a kept id, often
    mask = torch.ones(6, 12, dtype=torch.long)
    mask[::2, 9:] = 0
    return {"input_ids": torch.where(mask.bool(), ids, 0), "attention_mask": mask,
            "labels": torch.arange(6) % 3}


# (augmentation, batch, recipe parameters, the call it must equal, that call's own defaults)
DELEGATED = [
    ("tokens", token_batch(),
     {"replace_probability": 0.3, "swap_probability": 0.4, "delete_probability": 0.25,
      "keep_token_ids": [7]},
     lambda batch, p: augment.augment_tokens(
         batch, replace_probability=p["replace_probability"],
         swap_probability=p["swap_probability"], delete_probability=p["delete_probability"],
         keep_ids=p["keep_token_ids"]),
     {"replace_probability": 0.1, "swap_probability": 0.1, "delete_probability": 0.1,
      "keep_token_ids": []}),
    ("image", {"input": torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(2))},
     {"max_shift": 2, "noise_std": 0.3, "erase_probability": 1.0, "erase_area": (0.3, 0.5),
      "value_range": (0.1, 0.9)},
     lambda batch, p: {"input": augment.augment_images(batch["input"], **p)},
     {"max_shift": 1, "noise_std": 0.1, "erase_probability": 0.5, "erase_area": (0.02, 0.25),
      "value_range": (0.0, 1.0)}),
    ("noise", {"input": torch.rand(6, 5, generator=torch.Generator().manual_seed(3))},
     {"noise_std": 0.5, "value_range": (0.2, 0.8)},
     lambda batch, p: {"input": augment.gaussian_noise(batch["input"], p["noise_std"],
                                                       value_range=p["value_range"])},
     {"noise_std": 0.1, "value_range": None}),
]


@pytest.mark.parametrize(("kind", "batch", "params", "call", "defaults"), DELEGATED,
                         ids=[case[0] for case in DELEGATED])
def test_denoise_augments_with_every_parameter_it_was_given(kind, batch, params, call,
                                                           defaults) -> None:
    recipe = Denoise(augmentation=kind, **params)
    got = seeded_run(lambda: recipe.augment(batch))
    assert same(got, {**batch, **seeded_run(lambda: call(batch, params))})
    for name, default in defaults.items():
        other = seeded_run(lambda p={**params, name: default}: call(batch, p))
        assert not same(got, {**batch, **other}), f"{name} makes no difference on this batch"


# Recipes whose terms read sample or token logits, with the parameters they run with here.
LOGIT_RECIPES = [("ce", {}), ("hinton", {"temperature": 2.0}), ("oracle", {}), ("daft", {}),
                 ("dkd", {}), ("annealing", {}), ("continuation", {}), ("mean_teacher", {}),
                 ("atsen", {"threshold": 0.5}), ("denoise", {"temperature": 2.0})]


@pytest.mark.parametrize(("name", "params"), LOGIT_RECIPES, ids=[r[0] for r in LOGIT_RECIPES])
def test_sample_logits_terms_ignore_the_attention_mask_of_a_text_batch(name, params) -> None:
    """Sequence-classification logits [B, C] of a token batch: the mask is for the tokens, the
    terms average over samples all the same (unit ``examples``, never ``tokens``)."""
    batch = token_batch()
    if name == "denoise":  # its terms read the rows its prepare stacks
        batch = stack_views({CLEAN: batch, FIRST: batch, SECOND: batch}, unlabeled=(1, 2))
    rows = len(batch["labels"])
    student = Taps({"logits": seeded(rows, 3, seed=4, scale=2.0)})
    peers = tuple(Taps({"logits": seeded(rows, 3, seed=s, scale=3.0)}) for s in (5, 6, 7))
    teacher = peers[0].with_members(peers)  # atsen reads three members, the others the logits
    state = TrainState(epoch=2, step=5, epoch_progress=2.5, steps_per_epoch=2, total_steps=8)
    recipe = build_recipe(name, **params)
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    with_mask = recipe.terms(student, teacher, batch, state)
    without = recipe.terms(student, teacher, unmasked, state)
    assert with_mask.keys() == without.keys()
    for term, value in with_mask.items():
        assert torch.equal(value.value, without[term].value), term
        assert (value.weight, value.unit) == (without[term].weight, without[term].unit), term
        assert value.unit != "tokens", term


# --------------------------------------------------------------------------- adversarial


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_adversarial_starts_pgd_at_a_random_point_by_default() -> None:
    batch = {"input": torch.rand(5, 3, generator=torch.Generator().manual_seed(6)),
             "labels": torch.tensor([0, 1, 2, 3, 0]), "index": torch.arange(5)}
    torch.manual_seed(0)
    model = Linear()
    with TapReader(model, ["logits"]) as reader:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return reader({**batch, "input": x})["logits"]

        recipe = Adversarial(epsilon=0.2, step_size=0.01, steps=1)
        got = seeded_run(lambda: recipe.prepare(dict(batch), reader, STATE))["input"]

        def attack(random_start: bool) -> torch.Tensor:
            return seeded_run(lambda: pgd_perturb(forward, batch["input"], batch["labels"], 0.2,
                                                  0.01, 1, random_start=random_start))

        assert torch.equal(got, attack(True))
        assert not torch.equal(got, attack(False))


# ---------------------------------------------------------------------------- regression


def test_regression_kd_on_a_batch_without_views_regresses_every_row() -> None:
    """A batch that did not go through prepare (copies: 0 adds no view) is all original rows."""
    s, t = seeded(5, seed=7), seeded(5, 1, seed=8)
    labels = torch.tensor([0.5, float("nan"), 1.0, -1.0, float("nan")])
    terms = RegressionKD(copies=0, gold_weight=0.5).terms(
        Taps({"logits": s}), Taps({"logits": t}), {"labels": labels}, STATE)
    assert sorted(terms) == ["gold", "kd"]
    assert terms["kd"].value.item() == pytest.approx(float(((d(s) - d(t)[:, 0]) ** 2).mean()))
    known = ~labels.isnan()
    assert terms["gold"].value.item() == pytest.approx(
        float(((d(s) - d(labels)) ** 2)[known].mean()))
    assert (terms["gold"].weight, terms["gold"].unit) == (0.5, "labeled")

