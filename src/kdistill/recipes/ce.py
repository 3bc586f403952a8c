"""``ce``: the student alone on labels, the baseline every report compares with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdistill.recipes.base import Recipe, Term, register
from kdistill.recipes.shared import label_term
from kdistill.schedules import TrainState
from kdistill.taps import Taps


@register
class CrossEntropy(Recipe):
    """L = CE(y, z_s) on labelled samples only; no teacher. Unlabelled samples are skipped.

    On CTC data (per-frame logits, target sequences) the loss is CTC per target token
    (:func:`kdistill.losses.ctc_loss`) instead of the cross-entropy. On language-modelling data
    it is the cross-entropy of every labelled next token (the usual language-modelling loss).
    """

    name = "ce"
    summary = "Student trained on labels alone (no teacher): the no-KD baseline"
    paper = "-"
    uses_teacher = False
    uses_unlabeled = False
    ctc = True
    lm = True

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        return label_term(student["logits"], batch)
