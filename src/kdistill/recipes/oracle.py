"""``oracle``: distil a teacher that sees the labels (privileged information) into a student that
sees only the input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class OracleParams(RecipeParams):
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.9, ge=0, le=1)


@register
class Oracle(Recipe):
    """L = (1 - alpha) CE(y, z_s) + alpha T^2 KL(p_t^T || p_s^T), the teacher given the labels.

    Yoon, Kim, Lee, Ahn & Kim (2023), "Oracle Teacher: Leveraging Target Information for Better
    Knowledge Distillation of CTC Models". The mechanism is the teacher model: one that declares
    ``batch_inputs = ("labels",)`` (such as :class:`kdistill.models.oracle.LabelConditioned`)
    receives the batch's labels in its forward, during its own training and when it teaches; the
    student declares nothing and sees the input alone. On an unlabelled sample (label -100) the
    oracle falls back on its "unknown label" embedding, so it still teaches from the input.

    Logits ``[B, C]``: KL summed over classes, averaged over samples (unit ``examples``).
    Logits ``[B, L, C]`` (token classification, the paper's sequence setting): KL per token,
    averaged over the valid tokens of ``attention_mask`` (unit ``tokens``), CE over the labelled
    tokens. The paper distils CTC frame distributions; here the per-token (or per-sample) KL of
    Hinton KD stands for it. Defaults T=4, alpha=0.9 as for ``hinton``.
    """

    name = "oracle"
    summary = "KD from a teacher that also sees the labels: (1-a) CE + a T^2 KL(p_t || p_s)"
    paper = ("Yoon, Kim, Lee, Ahn, Kim 2023, Oracle Teacher: Leveraging Target Information for "
             "Better Knowledge Distillation of CTC Models")
    Params = OracleParams

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        per_token = z_s.dim() == 3
        mask = batch.get("attention_mask") if per_token else None
        kd = p.temperature ** 2 * losses.forward_kl(z_s, z_t, mask=mask,
                                                     temperature=p.temperature)
        return {
            "ce": Term(losses.cross_entropy(z_s, batch["labels"]), weight=1 - p.alpha,
                       unit="labeled"),
            "kd": Term(kd, weight=p.alpha, unit="tokens" if per_token else "examples"),
        }
