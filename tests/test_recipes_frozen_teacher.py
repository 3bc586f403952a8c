"""For every registered classification recipe, a short run leaves a frozen teacher untouched
and trains the student; recipes whose teacher trains online (peers) or is made from the student
(EMA) train the student and their teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from lm_models import tokenizer_folder

from kdistill import Distiller
from kdistill.recipes import RECIPES, Recipe, build_recipe

# Recipes that cannot be built from defaults get their configuration here.
RECIPE_PARAMS: dict[str, dict] = {
    "span_kd": {"student_tokenizer": tokenizer_folder(), "teacher_tokenizer": tokenizer_folder()},
    "composite": {"terms": [
        {"loss": "kd", "params": {"temperature": 2.0}},
        {"loss": "hidden_mse", "student": "module:features", "teacher": "module:features",
         "adapter": "linear", "weight": 0.5},
    ]},
    "lead": {"student_layers": 3, "teacher_layers": 4},
}


def make_recipe(name: str) -> Recipe:
    return build_recipe(name, **RECIPE_PARAMS.get(name, {}))


def recipes_with(teacher_model: set[str]) -> list[str]:
    """Classification recipes for any model (one that needs an architecture, such as
    tinybert's transformers, checks its teacher in its own tests)."""
    return sorted(name for name, entry in RECIPES.items()
                  if entry.cls.task == "classification" and entry.cls.architecture is None
                  and entry.cls.teacher_model in teacher_model)


@pytest.mark.parametrize("name", recipes_with({"trained"}))
def test_the_teacher_never_changes_and_the_student_does(name, digits_subset, make_mlp,
                                                        make_cnn, take_snapshot):
    data = digits_subset(64, labeled=24)
    teacher = make_cnn(seed=1)  # BatchNorm: running statistics must not move either
    teacher.train()  # the engine must freeze it, whatever mode it arrives in
    teacher_before = take_snapshot(teacher)
    assert any("running_mean" in k for k in teacher_before)
    student = make_mlp(seed=0, hidden=(16,))
    student_before = take_snapshot(student)

    recipe = make_recipe(name)
    # Two epochs: enough for multi-phase recipes (fitnets: a hint epoch, then KD).
    # (An evaluation set for recipes that keep their best phase weights.)
    result = Distiller(student, teacher, recipe, epochs=2, batch_size=16, progress=False,
                       optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}).fit(
                           data, digits_subset(32))

    after = take_snapshot(teacher)
    assert set(after) == set(teacher_before)
    changed = [k for k in after if not torch.equal(after[k], teacher_before[k])]
    assert changed == [], f"{name} changed teacher tensors {changed}"
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())

    student_after = take_snapshot(student)
    moved = [k for k in student_after if not torch.equal(student_after[k], student_before[k])]
    assert moved, f"{name} did not train the student"
    steps = [r for r in result.history if r["kind"] == "train"]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # Recipes with a trainable adapter train it too.
    for phase in result.phases:
        for param in phase.recipe.parameters():
            assert param.requires_grad


@pytest.mark.parametrize("name", recipes_with({"fresh", "none"}))
def test_online_teachers_train_along_with_the_student(name, digits_subset, make_mlp,
                                                      take_snapshot, weights_diff):
    data = digits_subset(64, labeled=24)
    recipe = make_recipe(name)
    peer = make_mlp(seed=1, hidden=(12,)) if recipe.teacher_model == "fresh" else None
    peer_before = take_snapshot(peer) if peer is not None else None
    student = make_mlp(seed=0, hidden=(16,))
    student_before = take_snapshot(student)
    distiller = Distiller(student, peer, recipe, epochs=2, batch_size=16, progress=False,
                          optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9})
    source = distiller.teacher
    assert source is not None and not source.static
    # The same source made from untrained copies: what the teacher would be without training.
    untrained = make_recipe(name).teacher_source(copy.deepcopy(distiller.student),
                                                 copy.deepcopy(peer))
    untrained.bind(recipe.teacher_taps() or ["logits"], torch.device("cpu"))
    distiller.fit(data, digits_subset(32))
    assert weights_diff(take_snapshot(student), student_before) > 0
    if peer is not None:  # the fresh peer is trained, in place
        assert weights_diff(take_snapshot(peer), peer_before) > 0
    trained, initial = source.state_dict(), untrained.state_dict()
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained
               if trained[k].is_floating_point()), f"{name}: the teacher did not change"


def test_every_registered_recipe_is_covered():
    # A new recipe that needs configuration must be given it in RECIPE_PARAMS.
    for name in RECIPES:
        recipe = make_recipe(name)
        assert isinstance(recipe, Recipe)
        assert recipe.phases(2), name
