"""``hinton``: response-based knowledge distillation with softened teacher probabilities."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import label_term
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

    Logits ``[B, C]``: KL summed over classes, averaged over samples (unit ``examples``). Token
    logits ``[B, L, C]``: KL per token, averaged over the valid tokens of the batch's
    ``attention_mask`` (unit ``tokens``), CE over the labelled tokens. CTC data (per-frame
    logits [B, T, C], target sequences): CTC per target token in place of CE
    (:func:`kdistill.losses.ctc_loss`) and the KL per frame, averaged over every frame (the
    frame-level KD of CTC models). More: docs/recipes.md.
    """

    name = "hinton"
    summary = "Soft-label KD: (1-a) CE + a T^2 KL(p_t^T || p_s^T)"
    paper = "Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network"
    Params = HintonParams
    ctc = True

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        label = label_term(z_s, batch, weight=1 - p.alpha)  # first: it names unfit logits
        per_token = z_s.dim() == 3
        mask = batch.get("attention_mask") if per_token else None
        kd = p.temperature**2 * losses.forward_kl(z_s, z_t, mask=mask, temperature=p.temperature)
        return {**label, "kd": Term(kd, weight=p.alpha, unit="tokens" if per_token else "examples")}
