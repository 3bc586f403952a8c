"""Recipes: one distillation method each, registered by name."""

from kdistill.recipes import (  # noqa: F401  (registration)
    adversarial_training,
    annealing,
    atsen,
    bdkd,
    ce,
    composite,
    continuation,
    daft,
    deit,
    denoise,
    dkd,
    embedding,
    fitnets,
    grain,
    hinton,
    hsk,
    mean_teacher,
    msd,
    mutual,
    okdhp,
    oracle,
    regression,
    retrieval,
    tinybert,
    token_kd,
)
from kdistill.recipes.base import (
    RECIPES,
    LayerMapped,
    Recipe,
    RecipeParams,
    Term,
    build_recipe,
    cache_refusal,
    get_recipe,
    layer_map_pending,
    register,
)

__all__ = ["RECIPES", "LayerMapped", "Recipe", "RecipeParams", "Term", "build_recipe",
           "cache_refusal", "get_recipe", "layer_map_pending", "register"]
