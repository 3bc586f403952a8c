"""``bdkd``: balanced-divergence online distillation (teacher and student train together)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from kdistill import losses
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import distinct_from
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import PeerTeacher, TeacherSource

TeacherKL = Literal["teacher_first", "student_first"]


class BDKDParams(RecipeParams):
    temperature: float = Field(default=1.0, gt=0)
    gap_scale: float = Field(default=0.5, gt=0,
                             description="tau_g: entropy gap (nats) that moves w_r to 0.73")
    teacher_kl: TeacherKL = Field(
        default="student_first",
        description="the teacher's KL: KL(p_s || p_t) (student_first, the paper's reverse-KL "
                    "symbol as summaries give it) or KL(p_t || p_s) (teacher_first)")


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(softmax(z / T)) in nats for every row of ``logits [..., C]``, shape ``[...]``
    (0 log 0 = 0)."""
    log_p = F.log_softmax(logits / temperature, dim=-1,
                          dtype=torch.promote_types(logits.dtype, torch.float32))
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


def divergence_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0,
                       gap_scale: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weights ``(w_forward, w_reverse)`` of BD-KD's two KL terms, each ``[B]``.

    Our rule (the paper's exact function is not confirmed)::

        g_b = H(p_s,b^T) - H(p_t,b^T)          entropy gap in nats
        w_r = sigmoid(g_b / tau_g),  w_f = 1 - w_r

    Equal entropies give 0.5 / 0.5. A student much flatter (less certain) than the teacher
    (g >> 0) is trained mostly by the reverse, mode-seeking KL(p_s || p_t), which sharpens it
    onto the teacher's modes; a student sharper than the teacher (g << 0, over-confident) mostly
    by the forward, mass-covering KL(p_t || p_s), which spreads its mass over every class the
    teacher finds plausible. The weights are computed without gradient: they select the
    divergence, they are not themselves trained.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"bdkd: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} must have the same shape")
    with torch.no_grad():
        gap = entropy(student_logits, temperature) - entropy(teacher_logits, temperature)
        reverse = torch.sigmoid(gap / gap_scale)
    return 1 - reverse, reverse


def bdkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               labels: torch.Tensor, temperature: float = 1.0, gap_scale: float = 0.5,
               teacher_kl: TeacherKL = "student_first") -> dict[str, Term]:
    """BD-KD's student and teacher terms for classification logits ``[B, C]``.

    Student (p_t detached)::

        ce          = CE(y, z_s)                                     labelled samples
        forward_kl  = mean_b w_f(b) T^2 KL(p_t^T || p_s^T)_b         all samples
        reverse_kl  = mean_b w_r(b) T^2 KL(p_s^T || p_t^T)_b         all samples

    Teacher (p_s detached)::

        teacher_ce  = CE(y, z_t)                                     labelled samples
        teacher_kl  = mean_b T^2 KL(p_s^T || p_t^T)_b                ``student_first``
                    = mean_b T^2 KL(p_t^T || p_s^T)_b                ``teacher_first``

    ``student_first`` is the paper's reverse-KL symbol KL(p^s || p^t) as summaries of the paper
    give the teacher's term, the direction in which deep mutual learning trains every peer
    (mass-covering for the teacher, whose prediction is the one trained); ``teacher_first`` is
    the reverse KL seen from the teacher (the trained p_t first, mode-seeking). The paper's own
    text could not be checked: docs/recipes.md.
    """
    if student_logits.dim() != 2:
        raise ValueError(f"bdkd: logits have shape {tuple(student_logits.shape)}; expected "
                         "[batch, classes] (per-token logits are not supported)")
    w_forward, w_reverse = divergence_weights(student_logits, teacher_logits, temperature,
                                              gap_scale)
    teacher_divergence = losses.reverse_kl if teacher_kl == "teacher_first" else losses.forward_kl
    t2 = temperature**2
    target_t = teacher_logits.detach()
    forward = losses.per_token_forward_kl(student_logits, target_t, temperature)
    reverse = losses.per_token_reverse_kl(student_logits, target_t, temperature)
    return {
        "ce": Term(losses.cross_entropy(student_logits, labels), unit="labeled"),
        "forward_kl": Term(t2 * (w_forward * forward).mean()),
        "reverse_kl": Term(t2 * (w_reverse * reverse).mean()),
        "teacher_ce": Term(losses.cross_entropy(teacher_logits, labels), unit="labeled"),
        "teacher_kl": Term(t2 * teacher_divergence(teacher_logits, student_logits.detach(),
                                                   temperature=temperature)),
    }


@register
class BDKD(Recipe):
    """BD-KD: online KD where the student balances forward and reverse KL per sample.

    Amara, Sepahvand, Meyer, Gross & Clark (2022), "BD-KD: Balancing the Divergences for
    Online Knowledge Distillation". A larger teacher, built untrained from ``teacher.model``
    (``teacher_model = "fresh"``; re-drawn by :func:`~kdistill.recipes.shared.distinct_from`
    if it copies the student exactly), trains together with the student in one backward::

        L_s = CE(y, z_s) + mean_b [w_f(b) KL(p_t || p_s)_b + w_r(b) KL(p_s || p_t)_b]
        L_t = CE(y, z_t) + KL(p_s || p_t)      (``teacher_kl: teacher_first``: KL(p_t || p_s))
        L   = L_s + L_t

    with p_t detached in L_s and p_s detached in L_t, KLs at temperature T and scaled by T^2,
    w_r = sigmoid((H_s - H_t) / tau_g), w_f = 1 - w_r (our rule, see
    :func:`divergence_weights`), labelled samples only (``uses_unlabeled = False``).
    Defaults T = 1, tau_g = 0.5 nats, ``teacher_kl = student_first``. Our choices and
    measurements (accuracy and ECE): docs/recipes.md.
    """

    name = "bdkd"
    summary = "Online KD: student CE + entropy-gap mix of forward/reverse KL; teacher CE + KL"
    paper = ("Amara, Sepahvand, Meyer, Gross, Clark 2022, BD-KD: Balancing the Divergences for "
             "Online Knowledge Distillation")
    Params = BDKDParams
    teacher_model = "fresh"
    uses_unlabeled = False

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        if teacher is None:
            raise ValueError("bdkd needs a teacher model (a larger network that trains with "
                             "the student); give one, or 'teacher.model' in a config")
        return PeerTeacher(distinct_from(student, teacher))

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        return bdkd_terms(student["logits"], teacher["logits"], batch["labels"],
                          p.temperature, p.gap_scale, p.teacher_kl)
