"""``continuation``: Continuation-KD - cross-entropy blended in over a hinge on the distance to
annealed teacher logits, in one phase."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import anneal_factor, default_anneal_epochs
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps


def hinge_mse(student_logits: torch.Tensor, target_logits: torch.Tensor,
              margin: float) -> torch.Tensor:
    """mean_b max(0, d_b - margin) with d_b = mean over classes of (z_s - z_target)^2.

    Rows (samples, or tokens for ``[B, L, C]`` logits) already within ``margin`` of the target
    contribute neither loss nor gradient. With ``margin = 0`` this is the MSE over rows x
    classes (``losses.logit_mse``) up to float rounding.
    """
    if student_logits.shape != target_logits.shape:
        raise ValueError(f"hinge_mse: student and target shapes must match, got student "
                         f"{tuple(student_logits.shape)} and target "
                         f"{tuple(target_logits.shape)}")
    distance = F.mse_loss(student_logits.float(), target_logits.float(),
                          reduction="none").mean(dim=-1)
    return (distance - margin).clamp_min(0).mean()


class ContinuationParams(RecipeParams):
    t_max: int = Field(default=10, ge=1)
    anneal_epochs: int | None = Field(default=None, ge=1)
    margin: float = Field(default=0.25, ge=0)
    psi: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(
        name="linear", start=0.0, end=1.0, unit="phase"))

    @field_validator("psi")
    @classmethod
    def _psi_is_a_share(cls, psi: ScheduleConfig) -> ScheduleConfig:
        reached = {"constant": [psi.start], "step": psi.values}.get(psi.name, [psi.start, psi.end])
        if not all(0 <= v <= 1 for v in reached):
            raise ValueError(f"psi weighs CE against the hinge and must stay within [0, 1]; "
                             f"this {psi.name} schedule reaches {reached}")
        return psi


@register
class Continuation(Recipe):
    """L = psi(i) CE(y, z_s) + (1 - psi(i)) mean_b max(0, d_b - m phi(T_i)),
    d_b = mean over classes of (z_s - phi(T_i) z_t)^2.

    Jafari, Kobyzev, Rezagholizadeh, Poupart & Ghodsi (2022), "Continuation KD: Improved
    Knowledge Distillation through the Lens of Continuation Optimization". phi(T_i) is
    Annealing-KD's factor (:func:`~kdistill.recipes.shared.anneal_factor`): T steps from
    ``t_max`` down to 1 over ``anneal_epochs`` and phi stays 1 afterwards. The two parts are
    logged as separate terms, ``ce`` (weight psi, over labelled samples) and ``hinge``
    (weight 1 - psi, over every sample).

    Defaults: ``t_max`` = 10, ``anneal_epochs`` two thirds of the phase, ``margin`` m = 0.25,
    psi = e / E, linear from 0 to 1 over the phase (e the fractional epoch, E the phase's
    epochs; any :class:`ScheduleConfig` with values in [0, 1] may replace it). Our choices,
    their measurements and the relation to Annealing-KD: docs/recipes.md.
    """

    name = "continuation"
    summary = "Continuation-KD: psi CE + (1-psi) hinge on ||z_s - phi(T) z_t||^2, margin m phi(T)"
    paper = ("Jafari, Kobyzev, Rezagholizadeh, Poupart, Ghodsi 2022, Continuation KD: Improved "
             "Knowledge Distillation through the Lens of Continuation Optimization")
    Params = ContinuationParams

    def schedules(self, state: TrainState) -> tuple[float, float]:
        """(psi, phi) at ``state``."""
        p = self.params
        span = p.anneal_epochs or default_anneal_epochs(state.phase_epochs)
        return p.psi.at(state), anneal_factor(state.epoch, span, p.t_max)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        psi, phi = self.schedules(state)
        z_s = student["logits"]
        hinge = hinge_mse(z_s, phi * teacher["logits"], self.params.margin * phi)
        return {
            "ce": Term(losses.cross_entropy(z_s, batch["labels"]), weight=psi, unit="labeled"),
            "hinge": Term(hinge, weight=1.0 - psi),
        }
