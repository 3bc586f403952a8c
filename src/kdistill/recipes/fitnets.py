"""``fitnets``: a hint stage (adapted student feature regressed on a teacher feature), then KD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kdistill import losses
from kdistill.recipes.adapters import AdapterKind, make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, TapName, Term, register
from kdistill.recipes.hinton import Hinton
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class FitNetsParams(RecipeParams):
    student_tap: TapName = "module:features"
    teacher_tap: TapName = "module:features"
    adapter: AdapterKind = "linear"
    hint_epochs: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.9, ge=0, le=1)


@register
class FitNets(Recipe):
    """Phase 1 (hint): L = ||r(f_s) - f_t||^2 (mean over entries) with a trainable adapter r;
    phase 2: Hinton KD with ``temperature`` and ``alpha``.

    Romero et al. (2015), "FitNets: Hints for Thin Deep Nets". Defaults: taps
    ``module:features`` for both models, a ``linear`` adapter, ``hint_epochs`` a third of the
    budget (at least 1), T = 4, alpha = 0.9. Our choices: docs/recipes.md.
    """

    name = "fitnets"
    summary = "Hint on an adapted intermediate feature, then KD (two phases)"
    paper = "Romero et al. 2015, FitNets: Hints for Thin Deep Nets"
    Params = FitNetsParams

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.adapter: Any = None

    def student_taps(self) -> list[str]:
        return [self.params.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.params.teacher_tap]

    def build(self, student: Taps, teacher: Taps | None) -> None:
        p = self.params
        self.adapter = make_adapter(p.adapter, student[p.student_tap], teacher[p.teacher_tap],
                                    where="fitnets")

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        hint = losses.hidden_mse(self.adapter(student[p.student_tap]), teacher[p.teacher_tap])
        return {"hint": Term(hint)}

    def phases(self, epochs: int) -> list[tuple[Recipe, int]]:
        if epochs < 2:
            raise ValueError("fitnets needs at least 2 epochs: one hint phase and one KD phase")
        hint = self.params.hint_epochs or max(1, epochs // 3)
        if hint >= epochs:
            raise ValueError(f"fitnets: hint_epochs ({hint}) must be smaller than epochs "
                             f"({epochs})")
        kd = Hinton(temperature=self.params.temperature, alpha=self.params.alpha)
        return [(self, hint), (kd, epochs - hint)]
