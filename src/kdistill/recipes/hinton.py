"""``hinton``: response-based knowledge distillation with softened teacher probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class HintonParams(RecipeParams):
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.9, ge=0, le=1)


@register
class Hinton(Recipe):
    """L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(p_t^T || p_s^T).

    Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network". CE is averaged
    over labelled samples, KD over all samples (labelled or not), so unlabelled data is learnt
    from the teacher alone. Defaults T=4, alpha=0.9 (the CIFAR setting of RepDistiller).
    """

    name = "hinton"
    summary = "Soft-label KD: (1-a) CE + a T^2 KL(p_t^T || p_s^T)"
    paper = "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network"
    Params = HintonParams

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        return {
            "ce": Term(losses.cross_entropy(student["logits"], batch["labels"]),
                       weight=1 - p.alpha, unit="labeled"),
            "kd": Term(losses.kd(student["logits"], teacher["logits"], p.temperature),
                       weight=p.alpha),
        }
