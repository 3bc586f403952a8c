"""Phases: the stages a fit runs through, and what a fit returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.recipes.base import Recipe
from kdistill.settings import OptimizerSettings, SchedulerSettings

MINIMISED_METRICS = frozenset({"cer", "ece", "loss", "mse", "mse_teacher"})


@dataclass
class Phase:
    """One stage of training: a recipe for ``epochs`` epochs, optionally with its own optimizer
    and LR schedule (the trainer's otherwise).

    ``keep_best`` (default: the recipe's) names an evaluation metric: the phase then ends with
    the student weights of its best end-of-epoch evaluation (``cer``, ``ece``, ``loss`` and
    ``mse`` are minimised, any other metric maximised) instead of its last ones.
    """

    recipe: Recipe
    epochs: int
    name: str = ""
    optimizer: OptimizerSettings | None = None
    scheduler: SchedulerSettings | None = None
    keep_best: str | None = None

    def __post_init__(self) -> None:
        if self.keep_best is None:
            self.keep_best = self.recipe.keep_best

    def improves(self, score: float, best: float | None) -> bool:
        """Whether ``score`` of the ``keep_best`` metric beats ``best`` (None: nothing yet)."""
        if best is None:
            return True
        return score < best if self.keep_best in MINIMISED_METRICS else score > best


@dataclass
class FitResult:
    """What :meth:`Distiller.fit` returns."""

    student: nn.Module
    history: list[dict[str, Any]]
    run_dir: Path | None
    phases: list[Phase] = field(default_factory=list)

    def evaluations(self) -> list[dict[str, Any]]:
        """The end-of-epoch evaluation records."""
        return [r for r in self.history if r.get("kind") == "eval"]

    def skipped_steps(self) -> int:
        """How many steps were skipped for a non-finite loss or gradient
        (``on_nonfinite: skip``)."""
        return sum(1 for r in self.history if r.get("kind") == "skipped_step")


def wrap_student(student: nn.Module, phases: Sequence[Phase]) -> nn.Module:
    """The model to train: ``student`` as each phase's recipe wraps it (extra heads...)."""
    for phase in phases:
        student = phase.recipe.wrap_student(student)
    return student


def recipe_phases(recipe: Recipe, epochs: int) -> list[Phase]:
    """The phases a recipe splits a budget of ``epochs`` into, named ``<index>-<recipe>``."""
    return [Phase(r, n, name=f"{i}-{r.name}") for i, (r, n) in enumerate(recipe.phases(epochs))]
