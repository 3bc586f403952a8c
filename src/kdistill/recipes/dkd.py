"""``dkd``: decoupled knowledge distillation (target-class and non-target-class parts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import labels_or_teacher_argmax
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class DKDParams(RecipeParams):
    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=8.0, ge=0)
    temperature: float = Field(default=4.0, gt=0)
    ce_weight: float = Field(default=1.0, ge=0)
    warmup_epochs: float = Field(default=20.0, ge=0)


@register
class DKD(Recipe):
    """L = w_ce CE + min(e / warmup, 1) (alpha TCKD + beta NCKD).

    Zhao et al. (2022), "Decoupled Knowledge Distillation". TCKD = T^2 KL(b_t || b_s) on the
    binary (target, rest) probabilities, NCKD = T^2 KL over the non-target classes, ``e`` the
    fractional epoch. Defaults alpha = 1, beta = 8, T = 4, w_ce = 1, warm-up 20 epochs (the
    paper's CIFAR-100 setting). Our choices (the warm-up per step, the teacher's argmax as the
    target class of unlabelled samples) and measurements: docs/recipes.md.
    """

    name = "dkd"
    summary = "Decoupled KD: CE + warm-up x (alpha TCKD + beta NCKD)"
    paper = "Zhao, Cui, Song, Qiu, Liang 2022, Decoupled Knowledge Distillation"
    Params = DKDParams

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        warm = min(state.epoch_progress / p.warmup_epochs, 1.0) if p.warmup_epochs else 1.0
        target = labels_or_teacher_argmax(batch, teacher["logits"])
        tckd, nckd = losses.dkd_parts(student["logits"], teacher["logits"], target,
                                      p.temperature)
        return {
            "ce": Term(losses.cross_entropy(student["logits"], batch["labels"]),
                       weight=p.ce_weight, unit="labeled"),
            "tckd": Term(tckd, weight=warm * p.alpha),
            "nckd": Term(nckd, weight=warm * p.beta),
        }
