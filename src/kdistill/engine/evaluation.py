"""The end-of-epoch evaluation of the student during a fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdistill.evaluate import eval_batches, evaluate_model, predict_source
from kdistill.teachers import TeacherSource

Evaluator = Callable[[nn.Module, "TeacherSource | None"], dict[str, float]]


@dataclass(eq=False)
class EpochEvaluation:
    """Metrics of the student on the evaluation data (:func:`kdistill.evaluate.evaluate_model`,
    with agreement against the teacher), or a user's ``evaluator(student, teacher)``.

    The evaluation batches are made once per fit; a static (frozen) teacher's answers too.
    The teacher is asked through :meth:`TeacherSource.evaluation_source` (a teacher cache knows
    the training samples only and hands over its live teacher, if it has one).
    """

    student: nn.Module
    teacher: TeacherSource | None
    data: Dataset | DataLoader | None
    evaluator: Evaluator | None
    batch_size: int
    collate_fn: Callable
    device: torch.device
    batches: list[dict[str, Any]] | None = None
    teacher_logits: torch.Tensor | None = None

    @property
    def available(self) -> bool:
        """Whether there is anything to evaluate on."""
        return self.data is not None or self.evaluator is not None

    def __call__(self) -> dict[str, float]:
        if self.evaluator is not None:
            return self.evaluator(self.student, self.teacher)
        if self.batches is None:
            self.batches = eval_batches(self.data, self.batch_size, self.collate_fn)
        teacher_logits = self.teacher_logits
        source = self.teacher.evaluation_source() if self.teacher is not None else None
        if teacher_logits is None and source is not None:
            teacher_logits = predict_source(source, self.batches, self.device).logits
            if source.static:  # a frozen teacher's answers are computed once per fit
                self.teacher_logits = teacher_logits
        return evaluate_model(self.student, self.batches, self.device, teacher_logits)
