"""``mean_teacher``: the teacher is an exponential moving average of the student."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import Field
from torch import Tensor, nn

from kdistill import losses
from kdistill.augment import gaussian_noise
from kdistill.batch import UNLABELED
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import (
    VIEW,
    Weight,
    as_schedule,
    select_rows,
    stack_views,
    valid_rows,
)
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps
from kdistill.teachers import EMATeacher, TeacherSource

# The views MeanTeacher.prepare stacks when ``noise`` > 0 (see shared.stack_views).
STUDENT_VIEW, TEACHER_VIEW = 0, 1


def consistency_loss(student_logits: Tensor, teacher_logits: Tensor, valid: Tensor,
                     kind: Literal["mse", "kl"]) -> Tensor:
    """Mean over the valid rows of the distance between student and teacher predictions.

    ``mse``: mean over rows and classes of (softmax z_s - softmax z_t)^2 (the paper's choice,
    its code's ``softmax_mse_loss``); ``kl``: KL(p_t || p_s) summed over classes, mean over rows.
    """
    s, t = student_logits[valid], teacher_logits[valid]
    if kind == "mse":
        return losses.logit_mse(s.float().softmax(-1), t.float().softmax(-1))
    return losses.kd(s, t, temperature=1.0)


def supervised_loss(logits: Tensor, labels: Tensor, valid: Tensor,
                    denominator: Literal["labeled", "batch"]) -> Tensor:
    """The CE summed over the labelled rows, divided by their number (``labeled``) or by the
    number of ``valid`` rows, labelled or not (``batch``: the official code's
    ``class_criterion(...) / minibatch_size`` with a summing criterion)."""
    ce = losses.cross_entropy(logits, labels)
    if denominator == "labeled":
        return ce
    return ce * (labels != UNLABELED).sum() / valid.sum().clamp_min(1)


Momentum = Annotated[float, Field(ge=0.0, le=1.0)]


class MeanTeacherParams(RecipeParams):
    momentum: Momentum | ScheduleConfig = Field(
        default=0.99, description="EMA momentum m (a number in [0, 1] or a schedule)")
    momentum_warmup: bool = Field(
        default=True, description="cap m at 1 - 1/(n + 1) after n optimizer steps, as the "
                                  "official code: the teacher is the plain average of the "
                                  "weights seen so far while the run is shorter than its memory")
    consistency: Literal["mse", "kl"] = "mse"
    consistency_weight: Weight | ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(name="cosine", start=0.0, end=10.0, length=5.0),
        description="weight of the consistency term; default a cosine ramp 0 -> 10 over 5 epochs")
    ce_weight: float = Field(default=1.0, ge=0)
    ce_denominator: Literal["labeled", "batch"] = Field(
        default="labeled", description="divide the summed CE by the labelled samples (tokens) "
                                       "or by every sample (valid token) of the batch, as the "
                                       "official code")
    noise: float = Field(default=0.0, ge=0,
                         description="std of Gaussian input noise, drawn independently for the "
                                     "student's and the teacher's copy; 0 = no noise")


@register
class MeanTeacher(Recipe):
    """Mean teacher: CE on the labelled samples plus consistency with an EMA of the student.

    Tarvainen & Valpola (2017), "Mean teachers are better role models". The teacher's weights
    follow the student's, theta_t <- m theta_t + (1 - m) theta_s after every optimizer step
    (:class:`~kdistill.teachers.EMATeacher`), with m capped at 1 - 1/(n + 1) after n steps
    (``momentum_warmup``, as the official code), and

        L = w_ce CE(y, z_s) + w(t) C(z_s, z_t)

    with the CE summed over the labelled samples (labelled tokens) and divided by their number
    (``ce_denominator = labeled``) or by every sample (valid token) of the batch (``batch``, as
    the official code), and the consistency C over every sample (every valid token of token
    logits [B, L, C]), labelled or not: ``mse`` between the softmax outputs (mean over rows and
    classes) or ``kl`` = KL(p_t || p_s).

    Defaults: m = 0.99 (the paper's ramp-up value; a number or a schedule) with the warm-up,
    ``consistency`` = ``mse`` (the paper's), w(t) a cosine ramp 0 -> 10 over 5 epochs (a number
    or a schedule), w_ce = 1 over the labelled samples, ``noise`` = 0 (with ``noise`` > 0 the
    student and the teacher each read their own noisy copy of the inputs). Which follow the
    official code, our choices and measurements: docs/recipes.md.
    """

    name = "mean_teacher"
    summary = "Mean teacher: CE + ramped consistency with an EMA of the student"
    paper = ("Tarvainen, Valpola 2017, Mean teachers are better role models: weight-averaged "
             "consistency targets improve semi-supervised deep learning results")
    Params = MeanTeacherParams
    teacher_model = "none"

    def teacher_source(self, student: nn.Module, teacher: nn.Module | None) -> TeacherSource:
        return EMATeacher(student, self.params.momentum, warmup=self.params.momentum_warmup)

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        if not self.params.noise:
            return batch
        x = batch["input"]
        if not x.is_floating_point():
            raise ValueError(f"mean_teacher: noise needs float inputs, got 'input' of type "
                             f"{x.dtype}; set noise to 0 for token ids")
        doubled = stack_views({STUDENT_VIEW: batch, TEACHER_VIEW: batch})
        doubled["input"] = gaussian_noise(doubled["input"], self.params.noise)
        return doubled

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        if VIEW in batch:  # the student reads its own noisy copy, the teacher the other one
            z_s, z_t = z_s[batch[VIEW] == STUDENT_VIEW], z_t[batch[VIEW] == TEACHER_VIEW]
            batch = select_rows(batch, batch[VIEW] == STUDENT_VIEW)
        labels = batch["labels"]
        valid, unit = valid_rows(z_s, batch)
        return {
            "ce": Term(supervised_loss(z_s, labels, valid, p.ce_denominator), weight=p.ce_weight,
                       unit="labeled" if p.ce_denominator == "labeled" else unit),
            "consistency": Term(consistency_loss(z_s, z_t, valid, p.consistency),
                                weight=as_schedule(p.consistency_weight).at(state), unit=unit),
        }
