"""For every registered recipe, a short run leaves the teacher untouched and trains the student."""

from __future__ import annotations

import pytest
import torch

from kdistill import Distiller
from kdistill.recipes import RECIPES, Recipe, build_recipe

# Recipes that cannot be built from defaults get their configuration here.
RECIPE_PARAMS: dict[str, dict] = {
    "composite": {"terms": [
        {"loss": "kd", "params": {"temperature": 2.0}},
        {"loss": "hidden_mse", "student": "module:features", "teacher": "module:features",
         "adapter": "linear", "weight": 0.5},
    ]},
}


def make_recipe(name: str) -> Recipe:
    return build_recipe(name, **RECIPE_PARAMS.get(name, {}))


@pytest.mark.parametrize("name", sorted(RECIPES))
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
    result = Distiller(student, teacher, recipe, epochs=2, batch_size=16, progress=False,
                       optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9}).fit(data)

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


def test_every_registered_recipe_is_covered():
    # A new recipe that needs configuration must be given it in RECIPE_PARAMS.
    for name in RECIPES:
        recipe = make_recipe(name)
        assert isinstance(recipe, Recipe)
        assert recipe.phases(2), name
