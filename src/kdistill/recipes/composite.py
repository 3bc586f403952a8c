"""``composite``: a recipe assembled from config terms (loss, taps, adapter, weight schedule)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from kdistill.losses.registry import LOSSES, check_params, get_loss
from kdistill.recipes.adapters import AdapterKind, make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, TapName, Term, register
from kdistill.recipes.shared import labels_or_teacher_argmax
from kdistill.schedules import ScheduleConfig, TrainState
from kdistill.taps import Taps


class TermConfig(RecipeParams):
    """One term: ``weight(step) * loss(adapter(student[student_tap]), teacher[teacher_tap])``."""

    loss: str
    student: TapName = "logits"
    teacher: TapName = "logits"
    adapter: AdapterKind = "none"
    weight: float | ScheduleConfig = 1.0
    params: dict[str, float | int | bool | str] = Field(default_factory=dict)
    name: str | None = None

    @field_validator("loss")
    @classmethod
    def _registered_loss(cls, name: str) -> str:
        get_loss(name)
        return name

    @field_validator("params")
    @classmethod
    def _loss_parameters(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        loss = info.data.get("loss")  # absent when the loss name itself was invalid
        if loss is not None:
            check_params(loss, params)
        return params


class CompositeParams(RecipeParams):
    terms: list[TermConfig] = Field(min_length=1)


@register
class Composite(Recipe):
    """L = sum_k w_k(step) loss_k(a_k(s[tap_k]), t[tap_k]) over the configured terms.

    Covers feature methods from config alone (FitNets-style hints, TinyBERT-style hidden and
    attention terms, RKD/PKT relations); each adapter ``a_k`` is created on the first batch.
    The losses and term options: docs/recipes.md.
    """

    name = "composite"
    summary = "Weighted sum of configured loss terms over chosen taps, with adapters"
    paper = "-"
    Params = CompositeParams

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.adapters = nn.ModuleDict()
        self.term_names = self._names()

    def _names(self) -> list[str]:
        names: list[str] = []
        for term in self.params.terms:
            base = term.name or term.loss
            name, k = base, 1
            while name in names:
                k += 1
                name = f"{base}_{k}"
            names.append(name)
        return names

    @property
    def uses_teacher(self) -> bool:  # type: ignore[override]
        return any(LOSSES[t.loss].uses_teacher for t in self.params.terms)

    def student_taps(self) -> list[str]:
        return list(dict.fromkeys(t.student for t in self.params.terms))

    def teacher_taps(self) -> list[str]:
        return list(dict.fromkeys(t.teacher for t in self.params.terms
                                  if LOSSES[t.loss].uses_teacher))

    def build(self, student: Taps, teacher: Taps | None) -> None:
        for name, term in zip(self.term_names, self.params.terms, strict=True):
            if LOSSES[term.loss].uses_teacher:
                self.adapters[name] = make_adapter(term.adapter, student[term.student],
                                                   teacher[term.teacher], where=f"term '{name}'")

    def _loss(self, term: TermConfig, name: str, student: Taps, teacher: Taps | None,
              batch: Mapping[str, Any]) -> torch.Tensor:
        spec = LOSSES[term.loss]
        args: list[Any] = []
        kwargs: dict[str, Any] = dict(term.params)
        if spec.uses_teacher:
            args = [self.adapters[name](student[term.student]), teacher[term.teacher]]
            if spec.inputs == "labels":
                args.append(labels_or_teacher_argmax(batch, teacher[term.teacher]))
        else:
            args = [student[term.student], batch["labels"]]
        mask = student.mask_for(args[0]) if spec.inputs == "mask" else None
        if mask is not None:
            kwargs["mask"] = mask
        return spec.fn(*args, **kwargs)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        out = {}
        for name, term in zip(self.term_names, self.params.terms, strict=True):
            weight = term.weight.at(state) if isinstance(term.weight, ScheduleConfig) \
                else term.weight
            out[name] = Term(self._loss(term, name, student, teacher, batch), weight=weight,
                             unit=LOSSES[term.loss].unit)
        return out
