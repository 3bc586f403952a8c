"""Recipes: one distillation method each, registered by name."""

from kdistill.recipes import ce, composite, dkd, fitnets, hinton  # noqa: F401  (registration)
from kdistill.recipes.base import (
    RECIPES,
    Recipe,
    RecipeParams,
    Term,
    build_recipe,
    get_recipe,
    register,
)

__all__ = ["RECIPES", "Recipe", "RecipeParams", "Term", "build_recipe", "get_recipe", "register"]
