"""``deit``: distillation through a second (distillation) head, soft or hard (DeiT)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field
from torch import nn

from kdistill import losses
from kdistill.models.heads import TwoHeadStudent
from kdistill.recipes.base import Recipe, Term, register
from kdistill.recipes.shared import StudentHeadParams, labels_or_teacher_argmax
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class DeiTParams(StudentHeadParams):
    mode: Literal["soft", "hard"] = "hard"
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0)
    reduction: Literal["batchmean", "mean"] = "batchmean"
    unlabeled: Literal["teacher", "skip"] = "teacher"


@register
class DeiT(Recipe):
    """A class head learns the labels, a distillation head learns the teacher.

    Touvron et al. (2021), "Training data-efficient image transformers & distillation through
    attention". The student gets a second head (:class:`~kdistill.models.heads.TwoHeadStudent`)
    on its penultimate features; with ``z_cls`` its own head and ``z_dist`` the new one:

    * soft: L = (1 - a) CE(z_cls, y) + a T^2 KL(p_t^T || p_dist^T)
    * hard: L = (1 - a) CE(z_cls, y) + a CE(z_dist, argmax z_t)

    At inference the prediction averages the two heads' probabilities (the wrapped student's
    ``logits``; ``export()`` gives it as a plain model). Defaults: hard distillation, a = 0.5,
    T = 1 (the paper's recommended setting), the soft KL summed over classes and averaged over
    samples (``reduction="batchmean"``), ``unlabeled = "teacher"`` (the class head's target on
    an unlabelled sample is the teacher's argmax). Our choices and measurements:
    docs/recipes.md.
    """

    name = "deit"
    summary = "DeiT: a distillation head learns the teacher (soft KL or hard argmax CE)"
    paper = ("Touvron et al. 2021, Training data-efficient image transformers & distillation "
             "through attention")
    Params = DeiTParams

    def student_taps(self) -> list[str]:
        return ["heads"]

    def wrap_student(self, student: nn.Module) -> nn.Module:
        if isinstance(student, TwoHeadStudent):
            return student
        p = self.params
        return TwoHeadStudent(student, p.features, p.head, p.in_features, p.num_classes)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        heads = student["heads"]
        if heads.shape[0] != 2:
            raise ValueError(f"deit: tap 'heads' must stack 2 heads (class, distillation), "
                             f"got shape {tuple(heads.shape)}")
        z_cls, z_dist = heads[0], heads[1]
        z_t = teacher["logits"]
        if p.mode == "soft":
            distill = losses.kd(z_dist, z_t, p.temperature, p.reduction)
        else:
            distill = losses.cross_entropy(z_dist, z_t.argmax(dim=-1))
        if p.unlabeled == "teacher":
            ce = Term(losses.cross_entropy(z_cls, labels_or_teacher_argmax(batch, z_t)),
                      weight=1 - p.alpha)
        else:
            ce = Term(losses.cross_entropy(z_cls, batch["labels"]), weight=1 - p.alpha,
                      unit="labeled")
        return {"ce": ce, "distill": Term(distill, weight=p.alpha)}
