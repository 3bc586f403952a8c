"""``annealing``: Annealing-KD - logits regressed on a teacher whose logits are scaled up from
1/T_max to 1 over phase 1, then cross-entropy on the labels from the best phase-1 student."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.ce import CrossEntropy
from kdistill.recipes.shared import anneal_factor, default_anneal_epochs
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class AnnealingParams(RecipeParams):
    t_max: int = Field(default=10, ge=1)
    phase1_epochs: int | None = Field(default=None, ge=1)


@register
class Annealing(Recipe):
    """Phase 1: L = mean over samples and classes of (z_s - phi(T) z_t)^2; phase 2: CE(y, z_s).

    Jafari, Rezagholizadeh, Sharma & Ghodsi (2021), "Annealing Knowledge Distillation".
    phi(T) = 1 - (T - 1) / T_max with T stepping from T_max down to 1 over phase 1
    (:func:`~kdistill.recipes.shared.anneal_factor`; the span is the phase's own length, read
    from the training state). Phase 1 never reads labels and trains on every sample, labelled
    or not. Phase 2 is the ``ce`` recipe (labelled samples only) and starts from the best
    phase-1 student, the one with the highest top-1 agreement with the teacher on the
    evaluation data (``keep_best = "agreement"``; evaluation data is needed).

    Defaults: ``t_max`` = 10, ``phase1_epochs`` two thirds of the budget. Our choices and
    measurements: docs/recipes.md.
    """

    name = "annealing"
    summary = "Annealing-KD: logits regressed on phi(T) x teacher logits, T_max -> 1; then CE"
    paper = "Jafari, Rezagholizadeh, Sharma, Ghodsi 2021, Annealing Knowledge Distillation"
    Params = AnnealingParams
    keep_best = "agreement"

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        phi = anneal_factor(state.epoch, state.phase_epochs, self.params.t_max)
        return {"mse": Term(losses.logit_mse(student["logits"], phi * teacher["logits"]))}

    def phases(self, epochs: int) -> list[tuple[Recipe, int]]:
        if epochs < 2:
            raise ValueError("annealing needs at least 2 epochs: one annealing phase and one "
                             "cross-entropy phase")
        first = self.params.phase1_epochs or default_anneal_epochs(epochs)
        if first >= epochs:
            raise ValueError(f"annealing: phase1_epochs ({first}) must be smaller than epochs "
                             f"({epochs})")
        return [(self, first), (CrossEntropy(), epochs - first)]
