"""``deit``: a distillation token (or, for other students, a second head on shared features)
learns the teacher, soft or hard (DeiT)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field
from torch import nn

from kdistill import losses
from kdistill.models.heads import TwoHeadStudent
from kdistill.models.vit import has_distillation_token
from kdistill.recipes.base import Recipe, Term, register
from kdistill.recipes.shared import StudentHeadParams, labels_or_teacher_argmax
from kdistill.schedules import TrainState
from kdistill.taps import Taps

DistillationHead = Literal["auto", "token", "shared_features"]


class DeiTParams(StudentHeadParams):
    mode: Literal["soft", "hard"] = "hard"
    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0)
    reduction: Literal["batchmean", "mean"] = "mean"
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    distillation_head: DistillationHead = "auto"
    unlabeled: Literal["teacher", "skip"] = "teacher"


@register
class DeiT(Recipe):
    """A class head learns the labels, a distillation head learns the teacher.

    Touvron et al. (2021), "Training data-efficient image transformers & distillation through
    attention". The distillation head is found by ``distillation_head``:

    * ``token`` - the paper's method: the student has its own distillation token, a learned
      token beside the class token that attends through every block and whose output feeds the
      distillation head (:class:`~kdistill.models.vit.ViT` with ``distillation_token``);
    * ``shared_features`` - the fallback for any other student, *not* the paper's token: a new
      head (:class:`~kdistill.models.heads.TwoHeadStudent`) reads the same penultimate
      features (``features``) as the class head;
    * ``auto`` (default) - ``token`` when the student has a distillation token, otherwise
      ``shared_features``.

    With ``z_cls`` the class head, ``z_dist`` the distillation head, ``y~`` the labels smoothed
    by ``e = label_smoothing`` (``(1 - e) onehot(y) + e / C``) and ``C`` classes:

    * soft: L = (1 - a) CE(z_cls, y~) + a T^2 KL(p_t^T || p_dist^T)
    * hard: L = (1 - a) CE(z_cls, y~) + a CE(z_dist, argmax z_t)

    At inference the prediction averages the two heads' probabilities (the student's
    ``logits``). Defaults, the paper's: hard distillation, a = 0.5, T = 1, e = 0.1 (on the
    class head only; the teacher's hard target is not smoothed), the soft KL summed over the
    batch and divided by B x C as the official code does (``reduction="mean"``;
    ``"batchmean"`` divides by B). ``unlabeled = "teacher"``: the class head's target on an
    unlabelled sample is the teacher's argmax. Our choices and measurements: docs/recipes.md.
    """

    name = "deit"
    summary = ("DeiT: a distillation token (or a head on shared features) learns the teacher "
               "(soft KL or hard argmax CE)")
    paper = ("Touvron et al. 2021, Training data-efficient image transformers & distillation "
             "through attention")
    Params = DeiTParams

    def student_taps(self) -> list[str]:
        return ["heads"]

    def wrap_student(self, student: nn.Module) -> nn.Module:
        p = self.params
        if has_distillation_token(student):
            if p.distillation_head == "shared_features":
                raise ValueError("deit: distillation_head 'shared_features' on a student with "
                                 "its own distillation token; build it without one "
                                 "(distillation_token: false) or use distillation_head: token")
            return student
        if p.distillation_head == "token":
            raise ValueError(f"deit: distillation_head 'token' needs a student with a "
                             f"distillation token (model 'vit', distillation_token: true); "
                             f"{type(student).__name__} has none (distillation_head: "
                             "shared_features gives it a head on shared features instead)")
        if isinstance(student, TwoHeadStudent):
            return student
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
            targets, unit = labels_or_teacher_argmax(batch, z_t), "examples"
        else:
            targets, unit = batch["labels"], "labeled"
        ce = losses.cross_entropy(z_cls, targets, label_smoothing=p.label_smoothing)
        return {"ce": Term(ce, weight=1 - p.alpha, unit=unit),
                "distill": Term(distill, weight=p.alpha)}
