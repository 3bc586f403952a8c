"""``ka``: knowledge accumulation from several existing language models, token by token."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from kdistill import losses
from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import Weight, label_term
from kdistill.schedules import TrainState
from kdistill.taps import Taps
from kdistill.teachers import FrozenTeacher, SnapshotTeacher, SourceGroup, TeacherSource

LOG_2 = math.log(2.0)


class KAParams(RecipeParams):
    temperature: float = Field(default=1.0, gt=0)
    toward_weight: Weight = 1.0
    away_weight: Weight = 0.5
    previous_weight: Weight = 1.0
    ce_weight: Weight = 1.0
    refresh: Annotated[int, Field(ge=1, strict=True)] | Literal["epoch"] = "epoch"


def beneficial(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor) -> Tensor:
    """Per model k and position: whether model k puts more probability on the reference token
    than the student does (both at temperature 1; the student's probability is detached, so
    the selection carries no gradient). ``teacher_logits`` [K, B, L, V], ``student_logits``
    [B, L, V], ``labels`` [B, L] (``UNLABELED`` positions give False); result [K, B, L]."""
    target = labels.clamp_min(0).unsqueeze(-1)
    student = student_logits.detach().log_softmax(-1).gather(-1, target).squeeze(-1)
    teachers = teacher_logits.log_softmax(-1).gather(
        -1, target.expand(teacher_logits.shape[0], *target.shape)).squeeze(-1)
    return (teachers > student) & (labels != UNLABELED)


@register
class KnowledgeAccumulation(Recipe):
    """Knowledge accumulation from K existing models (checkpoints, or different language
    models sharing one tokenizer) into one student, token by token, plus distillation from the
    student's own previous version against forgetting.

    At every labelled position (b, t) with reference token y, the K models are split by
    whether each is *beneficial* there: model k is when p_k(y) > p_s(y) (temperature 1, the
    current student's probability detached). With p = softmax(z / T) otherwise::

        b_k       = 1[p_k(y | x_<t) > p_s(y | x_<t)]
        toward    = (1/N) sum_{b,t} (1/K) sum_k  b_k      KL(p_k || p_s)
        away      = (1/N) sum_{b,t} (1/K) sum_k (1 - b_k) (log 2 - JS(p_k, p_s))
        previous  = (1/N) sum_{b,t} KL(p_prev || p_s)
        L = toward_weight toward + away_weight away + previous_weight previous
            + ce_weight CE(y, z_s)

    where JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q)/2 is the Jensen-Shannon
    divergence, bounded by log 2: minimising log 2 - JS pushes the student's distribution away
    from a harmful model's without the unbounded growth of a negated KL (the term is 0 when
    the two distributions no longer overlap). N counts the labelled tokens of the global batch
    (the engine's ``tokens`` unit); the CE is the next-token cross-entropy. No T^2 factor.

    **Previous version.** p_prev is a frozen snapshot of the student
    (:class:`~kdistill.teachers.SnapshotTeacher`): taken when training starts and refreshed
    every ``refresh`` optimizer steps, by default (``refresh: epoch``) at the end of every
    epoch, so each epoch distils from the student as the previous epoch left it (during the
    first epoch: the student it started as, e.g. an existing model being improved).

    Paper: the method follows Y. Zhang, P. Li, M. Sun & Y. Liu (2023), "Continual Knowledge
    Distillation for Neural Machine Translation" (ACL; arXiv 2212.09097): a comparison-based
    knowledge filter that keeps, per token, the knowledge of the models that do better than
    the student on the reference and turns away from the others, and knowledge inheritance
    from the student's previous version. The paper meets its teachers one after another, the
    previous version being the student before the current teacher; here all K models are
    present at once (the ``teacher.models`` of a config run) and the previous version is the
    periodic snapshot above. The bounded JS form of the away term and the 1/K averaging are
    our choices (the paper's exact negative term is unconfirmed). Defaults: T = 1, weights
    toward 1, away 0.5, previous 1, CE 1.
    """

    name = "ka"
    summary = ("Knowledge accumulation: per token, KD towards the models beating the student "
               "on the reference, away from the others, plus KD from the previous student")
    paper = ("Zhang, Li, Sun & Liu 2023, Continual Knowledge Distillation for Neural Machine "
             "Translation (knowledge filtration and inheritance)")
    Params = KAParams
    teacher_model = "pretrained"
    task = "lm"
    builds_teacher_source = True
    several_teachers = True

    def teacher_signal_varies(self) -> str | None:
        return "its previous-version teacher is a snapshot of the student that it refreshes"

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        """Each of the models (``teacher``: one model or an ``nn.ModuleList`` of them),
        frozen, then the snapshot of ``student``: the members of a
        :class:`~kdistill.teachers.SourceGroup`, in that order."""
        if teacher is None:
            raise ValueError("ka needs the models to accumulate from as its teacher")
        models = list(teacher) if isinstance(teacher, nn.ModuleList) else [teacher]
        return SourceGroup([*(FrozenTeacher(model) for model in models),
                            SnapshotTeacher(student, self.params.refresh)])

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        if TOKEN_MASK not in batch:
            raise ValueError(f"ka: the batch has no '{TOKEN_MASK}'; it trains language models "
                             "on language-modelling data (lm_text, lm_hf_dataset)")
        members = teacher.members if teacher is not None else ()
        if len(members) < 2:
            raise ValueError("ka: the teacher source must give the models then the student's "
                             f"previous version as members, got {len(members)} member(s) (use "
                             "the recipe's teacher_source)")
        p = self.params
        z_s = student["logits"]
        z_k = torch.stack([m["logits"] for m in members[:-1]])
        if z_k.shape[-1] != z_s.shape[-1]:
            raise ValueError(f"ka: the student predicts {z_s.shape[-1]} tokens and the models "
                             f"{z_k.shape[-1]}; knowledge accumulation compares distributions "
                             "over one vocabulary, so every model must share the student's "
                             "tokenizer")
        mask = batch[TOKEN_MASK].bool()
        good = beneficial(z_k, z_s, batch["labels"]).float()
        kl = losses.per_token_forward_kl(z_s.expand_as(z_k), z_k, p.temperature)
        js = losses.per_token_generalized_jsd(z_s.expand_as(z_k), z_k, 0.5, p.temperature)
        count = mask.sum().clamp_min(1)
        toward = (good * kl).mean(0)[mask].sum() / count
        away = ((1 - good) * (LOG_2 - js)).mean(0)[mask].sum() / count
        previous = losses.forward_kl(z_s, members[-1]["logits"], mask=mask,
                                     temperature=p.temperature)
        terms = {"toward": Term(toward, weight=p.toward_weight, unit="tokens"),
                 "away": Term(away, weight=p.away_weight, unit="tokens"),
                 "previous": Term(previous, weight=p.previous_weight, unit="tokens")}
        if p.ce_weight > 0:
            terms.update(label_term(z_s, batch, weight=p.ce_weight))
        return terms
