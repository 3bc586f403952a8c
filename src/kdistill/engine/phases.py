"""Phases: the stages a fit runs through, and what a fit returns."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdistill.errors import KdistillError
from kdistill.layermap import DEFAULT_SAMPLES, compare_layers_on_data
from kdistill.recipes.base import LayerMapped, Recipe, layer_map_pending
from kdistill.settings import OptimizerSettings, SchedulerSettings
from kdistill.teachers import FrozenTeacher, TeacherSource

logger = logging.getLogger("kdistill")

MINIMISED_METRICS = frozenset({"cer", "ece", "loss", "mse", "mse_teacher", "perplexity"})


@dataclass
class Phase:
    """One stage of training: a recipe for ``epochs`` epochs, optionally with its own optimizer
    and LR schedule (the trainer's otherwise).

    ``keep_best`` (default: the recipe's) names an evaluation metric: the phase then ends with
    the student weights of its best end-of-epoch evaluation (``cer``, ``ece``, ``loss``,
    ``mse`` and ``perplexity`` are minimised, any other metric maximised) instead of its last ones.
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


def resolve_layer_maps(phases: Sequence[Phase], student: nn.Module,
                       teacher: nn.Module | TeacherSource | None, data: Dataset | DataLoader,
                       *, seed: int, samples: int = DEFAULT_SAMPLES,
                       batch_size: int = 32) -> list[Phase]:
    """``phases`` with every ``layer_map: auto`` / ``auto_free`` measured
    (:func:`layer_map_pending`): CKA between ``student`` and the teacher's model measured
    once (:func:`~kdistill.layermap.compare_layers_on_data`: ``samples`` inputs of ``data``
    drawn with ``seed``), and each such recipe given the map it asks for (the proposed map,
    last layer pinned, or the free one; student layer m learns from teacher layer map[m], the
    embeddings keep the embeddings). A teacher with no model at hand (a cached one) is a
    :class:`KdistillError`."""
    if not any(layer_map_pending(phase.recipe) for phase in phases):
        return list(phases)
    model = teacher.model if isinstance(teacher, FrozenTeacher) else teacher
    if not isinstance(model, nn.Module):
        raise KdistillError(f"layer_map 'auto' compares the student's hidden states with the "
                            f"teacher model's, and a {type(teacher).__name__} teacher has no "
                            "model at hand: give layer_map (kdistill layermap proposes one)")
    source = data.dataset if isinstance(data, DataLoader) else data
    measured = compare_layers_on_data(student, model, source, samples,
                                      batch_size=batch_size, seed=seed)
    resolved = []
    for phase in phases:
        recipe = phase.recipe
        if layer_map_pending(recipe):
            assert isinstance(recipe, LayerMapped)
            mapping = measured.chosen(recipe.pins_last_layer)[1:]
            logger.info("layer_map of %s: student layers 1-%d learn from teacher layers %s "
                        "(linear CKA on up to %d training inputs%s)", phase.name, len(mapping),
                        mapping, samples, "" if recipe.pins_last_layer else ", last layer free")
            phase = replace(phase, recipe=recipe.with_layer_map(mapping))
        resolved.append(phase)
    return resolved
