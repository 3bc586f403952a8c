"""``atsen``: two teacher-student pairs of different architectures that label data for each
other (adaptive teacher learning) with fine-grained EMA teachers (student ensemble)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill import losses
from kdistill.batch import UNLABELED
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import Weight, as_schedule, valid_rows
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps
from kdistill.teachers import EMATeacher, PeerTeacher, SourceGroup, TeacherSource

# Order of the sources in ATSEN's SourceGroup, i.e. of ``teacher.members``.
TEACHER_A, PEER, TEACHER_B = 0, 1, 2


@dataclass(frozen=True)
class PseudoLabels:
    """What two teachers' predictions give each row (sample or token).

    ``labels``: the teachers' common class where ``kept``, ``UNLABELED`` (-100) elsewhere;
    ``kept``: valid rows where the teachers agree and both are confident; ``disagree``: valid
    rows where their top classes differ (the rows distilled from both teachers).
    """

    labels: Tensor
    kept: Tensor
    disagree: Tensor


def sharpen(logits: Tensor, power: float, valid: Tensor | None = None) -> Tensor:
    """Sharpened probabilities q_c = p_c^k / sum_j p_j^k = softmax(k z)_c (k = ``power``).

    With ``valid`` (a mask over the leading dimensions) each class is also divided by its soft
    frequency over the valid rows, f_c = sum_rows p_c (DEC's target distribution, Xie et al.
    2016, as BOND and ATSEN use it): q_c = (p_c^k / f_c) / sum_j (p_j^k / f_j), which keeps a
    frequent class (``O`` in NER) from taking over the confident rows.
    """
    log_q = power * logits.float().log_softmax(dim=-1)
    if valid is not None:
        probs = logits.float().softmax(dim=-1)[valid.bool()]
        log_q = log_q - probs.sum(dim=0).clamp_min(1e-12).log()
    return log_q.softmax(dim=-1)


def pseudo_labels(teacher_a: Tensor, teacher_b: Tensor, valid: Tensor, threshold: float = 0.9,
                  power: float = 2.0, frequency: bool = False) -> PseudoLabels:
    """Pseudo-labels from two teachers' logits ``[..., C]`` on the rows where ``valid`` (the
    logits' leading shape) is true.

    With q_a, q_b the teachers' sharpened probabilities (:func:`sharpen` with power ``power``,
    divided by the class frequency over the valid rows when ``frequency``) a valid row is
    ``kept``, labelled argmax q_a, iff argmax q_a == argmax q_b and max q_a >= threshold and
    max q_b >= threshold; it is in ``disagree`` iff argmax q_a != argmax q_b. A row where the
    teachers agree without both being confident is in neither; invalid rows (padding) never are.
    """
    if teacher_a.shape != teacher_b.shape:
        raise ValueError(f"pseudo_labels: teacher logits differ in shape: "
                         f"{tuple(teacher_a.shape)} and {tuple(teacher_b.shape)}")
    if valid.shape != teacher_a.shape[:-1]:
        raise ValueError(f"pseudo_labels: valid mask {tuple(valid.shape)} does not match the "
                         f"logits' leading shape {tuple(teacher_a.shape[:-1])}")
    by = valid if frequency else None
    conf_a, top_a = sharpen(teacher_a, power, by).max(dim=-1)
    conf_b, top_b = sharpen(teacher_b, power, by).max(dim=-1)
    valid = valid.bool()
    agree = top_a == top_b
    kept = valid & agree & (conf_a >= threshold) & (conf_b >= threshold)
    labels = torch.where(kept, top_a, torch.full_like(top_a, UNLABELED))
    return PseudoLabels(labels, kept, valid & ~agree)


def share(loss_over_rows: Tensor, rows: Tensor, valid: Tensor) -> Tensor:
    """A loss averaged over the selected ``rows``, rescaled to a sum over them divided by the
    number of valid rows: rows left out count as zero loss, so the term is a mean over the
    engine's unit (examples or tokens) and stays exact under gradient accumulation."""
    return loss_over_rows * rows.sum() / valid.sum().clamp_min(1)


def student_terms(logits: Tensor, labels: Tensor, teacher_a: Tensor, teacher_b: Tensor,
                  targets: PseudoLabels, valid: Tensor, temperature: float) -> dict[str, Tensor]:
    """One student's three losses:

    * ``ce`` = CE(y, z) over the rows with a known label;
    * ``pseudo`` = sum over kept rows of CE(pseudo-label, z) / #valid rows;
    * ``kd`` = sum over disagreement rows of 1/2 [T^2 KL(p_a^T || p^T) + T^2 KL(p_b^T || p^T)]
      / #valid rows (both teachers distilled into the student).
    """
    d = targets.disagree
    kd_both = (losses.kd(logits[d], teacher_a[d], temperature)
               + losses.kd(logits[d], teacher_b[d], temperature)) / 2
    return {
        "ce": losses.cross_entropy(logits, labels),
        "pseudo": share(losses.cross_entropy(logits, targets.labels), targets.kept, valid),
        "kd": share(kd_both, d, valid),
    }


class ATSENParams(RecipeParams):
    threshold: float = Field(default=0.9, gt=0, le=1,
                             description="confidence a sharpened teacher prediction needs")
    sharpen: float = Field(default=2.0, ge=1, description="power k of the sharpening p^k")
    frequency: bool = Field(default=True, description="divide sharpened probabilities by the "
                                                       "class frequency in the micro-batch")
    temperature: float = Field(default=2.0, gt=0, description="KD temperature on disagreement")
    pseudo_weight: float = Field(default=1.0, ge=0)
    kd_weight: float = Field(default=1.0, ge=0)
    ce_weight: Weight | ScheduleConfig = Field(
        default=1.0, description="weight of CE on the known (gold or distant) labels")
    warmup_epochs: float = Field(default=2.0, ge=0,
                                 description="epochs trained on the known labels only")
    skip_prob: float = Field(default=0.8, ge=0, lt=1,
                             description="probability that a teacher tensor skips an EMA step")
    momentum: ScheduleConfig = Field(
        default_factory=lambda: ScheduleConfig(name="cosine", start=0.8, end=1.0, unit="phase"),
        description="EMA momentum; default the paper's cosine ramp 0.8 -> 1 over the phase's "
                    "optimizer steps")
    seed: int = Field(default=0, description="seed of the EMA skip draws (teacher B: seed + 1)")


@register
class ATSEN(Recipe):
    """ATSEN: adaptive teacher learning and fine-grained student ensemble.

    Qu, Zeng, Liu, Wang, Huai & Zhou (2023), "Distantly-Supervised Named Entity Recognition
    with Adaptive Teacher Learning and Fine-grained Student Ensemble" (AAAI). Two students of
    different architectures train together: the run's student A and a peer B (a fresh model of
    the config's ``teacher.model``, trained with A by the same optimizer). Each has a teacher,
    its fine-grained EMA: after every step each parameter tensor independently is either
    skipped (probability ``skip_prob``) or updated theta_t <- m theta_t + (1 - m) theta_s.

    On every row (sample, or valid token of token logits [B, L, C]) the two teachers' sharpened
    predictions q_c = (p_c^k / f_c) / sum_j (p_j^k / f_j) (f_c the soft frequency of class c
    over the micro-batch's valid rows; :func:`sharpen`) give :func:`pseudo_labels`: rows where
    the teachers' top classes agree and both max q >= ``threshold`` are kept with that class;
    rows where they disagree are distilled from both teachers; other rows get nothing from the
    teachers. Each student X in {A, B} minimises

        L_X = w_ce CE(y, z_X) + [e > warm-up] (w_p PSEUDO_X + w_kd KD_X)

    (:func:`student_terms`; terms ``ce``, ``pseudo``, ``kd`` for A and ``peer_ce``,
    ``peer_pseudo``, ``peer_kd`` for B).

    Defaults: ``threshold`` 0.9, ``sharpen`` k = 2, ``temperature`` T = 2, w_p = w_kd = 1,
    ``ce_weight`` w_ce = 1 (a number or a schedule), ``warmup_epochs`` 2 (CE only before),
    ``skip_prob`` 0.8, momentum m rising from 0.8 to 1 on a cosine ramp over the phase's
    optimizer steps (the official code's). Our choices where the paper and its code differ,
    and measurements: docs/recipes.md.
    """

    name = "atsen"
    summary = "Two student-teacher pairs: agreed confident pseudo-labels, KD where teachers differ"
    paper = ("Qu, Zeng, Liu, Wang, Huai, Zhou 2023, Distantly-Supervised Named Entity "
             "Recognition with Adaptive Teacher Learning and Fine-grained Student Ensemble")
    Params = ATSENParams
    teacher_model = "fresh"

    def teacher_source(self, student: nn.Module, teacher: nn.Module | None) -> TeacherSource:
        if teacher is None:
            raise ValueError("atsen needs a peer model (the config's teacher.model, of another "
                             "architecture than the student) to train as its second student")
        p = self.params
        return SourceGroup([EMATeacher(student, p.momentum, p.skip_prob, p.seed),
                            PeerTeacher(teacher),
                            EMATeacher(teacher, p.momentum, p.skip_prob, p.seed + 1)])

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        if teacher is None or len(teacher.members) != 3:
            raise ValueError("atsen: the teacher source must be the SourceGroup of "
                             "ATSEN.teacher_source (teacher A, peer student B, teacher B)")
        z_a = student["logits"]
        z_b = teacher.members[PEER]["logits"]
        t_a = teacher.members[TEACHER_A]["logits"]
        t_b = teacher.members[TEACHER_B]["logits"]
        valid, unit = valid_rows(z_a, batch)
        targets = pseudo_labels(t_a, t_b, valid, p.threshold, p.sharpen, p.frequency)
        on = float(state.epoch_progress > p.warmup_epochs)
        ce_weight = as_schedule(p.ce_weight).at(state)
        terms: dict[str, Term] = {}
        for prefix, logits in (("", z_a), ("peer_", z_b)):
            values = student_terms(logits, batch["labels"], t_a, t_b, targets, valid,
                                   p.temperature)
            terms[f"{prefix}ce"] = Term(values["ce"], weight=ce_weight, unit="labeled")
            terms[f"{prefix}pseudo"] = Term(values["pseudo"], weight=on * p.pseudo_weight,
                                            unit=unit)
            terms[f"{prefix}kd"] = Term(values["kd"], weight=on * p.kd_weight, unit=unit)
        return terms
