"""The unit that is optimised and wrapped for data parallelism, and the guarded first forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdistill.contexts import eval_mode
from kdistill.errors import KdistillError, ModelCallError, describe_batch
from kdistill.recipes.base import Recipe
from kdistill.schedules import TrainState
from kdistill.taps import TapReader, Taps
from kdistill.teachers import TeacherSource

TOTAL = "loss"  # the record key of the weighted total of a step's terms


class TrainingModule(nn.Module):
    """Student plus one phase's recipe (plus the peers of a trainable teacher source): the unit
    wrapped for data parallelism and optimised.

    A trainable source (``source`` given) is called inside :meth:`forward`, with gradients;
    otherwise the teacher's taps come in as an argument. The forward returns
    ``sum_k w_k * value_k * scale_k`` over the recipe's terms, where ``scale_k`` (local count /
    global count of the term's unit) makes the sum over micro-batches and processes the mean over
    the global batch, and each term's scaled value for the record.
    """

    def __init__(self, student: nn.Module, recipe: Recipe, reader: TapReader,
                 source: TeacherSource | None = None):
        super().__init__()
        self.student = student
        self.recipe = recipe
        self.reader = reader
        self.source = source if source is not None and recipe.uses_teacher else None
        self.peers = self.source.trainable_module() if self.source is not None else None

    def forward(self, batch: Mapping[str, Any], teacher: Taps | None, state: TrainState,
                scales: Mapping[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.source is not None:
            teacher = self.source(batch)
        terms = self.recipe.terms(self.reader(batch), teacher, batch, state)
        total: torch.Tensor | None = None
        reported: dict[str, torch.Tensor] = {}
        if TOTAL in terms:
            raise ValueError(f"recipe '{self.recipe.name}': a loss term cannot be named "
                             f"'{TOTAL}', the engine logs the weighted total under that name")
        for name, term in terms.items():
            scale = scales[term.unit]
            if scale == 0:  # no unit of this kind here (say no labelled sample): its share is 0
                reported[name] = torch.zeros((), device=term.value.device)
                continue
            contribution = term.value * (term.weight * scale)
            total = contribution if total is None else total + contribution
            reported[name] = term.value.detach() * scale
        if total is None:  # nothing to learn from in this micro-batch: keep the graph valid
            total = sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        return total, reported


def call_model(role: str, forward: Callable[[Mapping[str, Any]], Taps],
               batch: Mapping[str, Any]) -> Taps:
    """Run the first forward of a phase; a failure inside the model (a shape or dtype that does
    not fit) becomes a :class:`ModelCallError` naming the model and the batch's shapes."""
    try:
        return forward(batch)
    except KdistillError:
        raise
    except (RuntimeError, TypeError, KeyError, IndexError, ValueError) as error:
        raise ModelCallError(f"the {role} cannot run on a training batch ({describe_batch(batch)})"
                             f": {type(error).__name__}: {error}") from error


def build_recipe_modules(recipe: Recipe, reader: TapReader, teacher: TeacherSource | None,
                         batch: Mapping[str, Any], models: Sequence[nn.Module],
                         device: torch.device) -> None:
    """Build a recipe's shape-dependent modules (adapters) on ``batch`` and move them to
    ``device``. ``models`` (the student and any peers) run this forward in eval mode, so
    BatchNorm statistics do not absorb an extra batch and dropout draws no random numbers."""
    with eval_mode(*models), torch.no_grad():
        asks = recipe.uses_teacher and bool(recipe.teacher_taps())
        teacher_taps = call_model("teacher", teacher, batch) if asks else None
        recipe.build(call_model("student", reader, batch), teacher_taps)
    recipe.to(device)
