"""The public entry points: :class:`Distiller` and :func:`distill`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdistill.checkpoint import check_fresh_run_folder
from kdistill.engine.evaluation import Evaluator
from kdistill.engine.loop import Callback, TrainingRun
from kdistill.engine.phases import (
    FitResult,
    Phase,
    recipe_phases,
    resolve_layer_maps,
    wrap_student,
)
from kdistill.engine.run_folder import FRESH_HINT, StartHook
from kdistill.recipes.base import Recipe, build_recipe, cache_refusal
from kdistill.settings import TrainerSettings
from kdistill.teachers import TeacherSource, as_source


class Distiller:
    """Distil ``teacher`` into ``student`` with a recipe (or a list of phases).

    ``teacher`` is any :class:`TeacherSource`, or a plain ``nn.Module`` (or ``None``) that the
    first teacher-using recipe turns into its source (:meth:`Recipe.teacher_source`: frozen by
    default; peers or an EMA of the student for online methods). ``recipe`` is a
    :class:`Recipe` or a registered name. The student is first wrapped by each phase's recipe
    (:meth:`Recipe.wrap_student`, e.g. an extra head); ``self.student`` and the fit's result
    hold the wrapped model. ``trainer`` holds the settings; keyword overrides such as
    ``epochs=3`` or ``batch_size=32`` update it. ``evaluator(student, teacher)`` replaces the
    default end-of-epoch metrics.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | TeacherSource | None = None,
                 recipe: Recipe | str | None = "hinton", *, phases: Sequence[Phase] | None = None,
                 trainer: TrainerSettings | None = None, run_dir: str | Path | None = None,
                 evaluator: Evaluator | None = None, **overrides: Any):
        base = trainer.model_dump() if trainer is not None else {}
        self.settings = TrainerSettings(**{**base, **overrides})
        self.phases = list(phases) if phases else self._phases_of(recipe)
        self.student = wrap_student(student, self.phases)
        self.teacher = self._source_of(teacher)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.evaluator = evaluator
        if self.settings.mixed_precision == "fp16" and (self.settings.cpu or
                                                        not torch.cuda.is_available()):
            raise ValueError("mixed_precision 'fp16' needs a GPU (on CPU Accelerate would "
                             "silently train in fp32); use 'bf16' on CPU")
        for phase in self.phases:
            if phase.recipe.uses_teacher and self.teacher is None:
                raise ValueError(f"recipe '{phase.recipe.name}' needs a teacher, none was given")
        if self.teacher is not None and self.teacher.answers_by_index:
            refusal = cache_refusal(phase.recipe for phase in self.phases)
            if refusal is not None:
                raise ValueError(refusal)

    def _source_of(self, teacher: nn.Module | TeacherSource | None) -> TeacherSource | None:
        if isinstance(teacher, TeacherSource):
            return teacher
        users = [phase.recipe for phase in self.phases if phase.recipe.uses_teacher]
        if not users:
            return as_source(teacher)
        if teacher is not None and not isinstance(teacher, nn.Module):
            return as_source(teacher)  # raises the type error
        return users[0].teacher_source(self.student, teacher)

    def _phases_of(self, recipe: Recipe | str | None) -> list[Phase]:
        if recipe is None:
            raise ValueError("give a recipe or a list of phases")
        recipe = build_recipe(recipe) if isinstance(recipe, str) else recipe
        return recipe_phases(recipe, self.settings.epochs)

    def fit(self, train: Dataset | DataLoader, eval: Dataset | DataLoader | None = None, *,
            resume: bool = False, overwrite: bool = False, callbacks: Sequence[Callback] = (),
            on_start: StartHook | None = None) -> FitResult:
        """Train through every phase; returns the student and the metrics history.

        ``train`` is a data set, a stream (an ``IterableDataset``) or a ``DataLoader`` of
        either (its data set, ``collate_fn`` and ``batch_size`` are used): see
        :mod:`kdistill.engine.feed` for how batches are drawn and loaded.

        ``callbacks`` receive each end-of-epoch record (every ``eval_every`` epochs and at the
        end of each phase) after its checkpoint is written. With a ``run_dir``:

        * a new fit needs an empty (or absent) folder and raises
          :class:`~kdistill.checkpoint.RunFolderError` otherwise; ``overwrite=True`` replaces
          the folder's contents, but only once the run has started (every start-up step, such
          as building the recipe's modules on a first batch, succeeded);
        * ``resume=True`` continues from the newest intact checkpoint (damaged newer ones are
          named in a warning and skipped), provided it was made by a fit with the same
          settings but progress, logging, checkpoint frequency and retention, and data-loading
          workers and prefetch;
        * nothing is written into the folder before the run has started; then
          ``on_start(step)`` is called with the step training starts from.
        """
        if resume and overwrite:
            raise ValueError("resume continues the run in run_dir and overwrite replaces it: "
                             "give one of them")
        if resume and self.run_dir is None:
            raise ValueError("resume needs a run directory")
        if not resume and self.run_dir is not None:
            check_fresh_run_folder(self.run_dir, overwrite=overwrite, hint=FRESH_HINT)
        self.phases = resolve_layer_maps(self.phases, self.student, self.teacher, train,
                                         seed=self.settings.seed)
        for phase in self.phases:
            if phase.keep_best and eval is None and self.evaluator is None:
                raise ValueError(f"phase '{phase.name or phase.recipe.name}' keeps its best "
                                 f"weights by '{phase.keep_best}' and needs evaluation data: "
                                 "pass eval to fit")
        run = TrainingRun(self.student, self.teacher, self.phases, self.settings, self.run_dir,
                          self.evaluator, train, eval, callbacks)
        try:
            return run.execute(resume, overwrite, on_start)
        finally:
            run.close()


def distill(student: nn.Module, teacher: nn.Module | TeacherSource | None,
            train: Dataset | DataLoader, eval: Dataset | DataLoader | None = None,
            recipe: Recipe | str = "hinton", **kwargs: Any) -> FitResult:
    """One call: ``Distiller(student, teacher, recipe, **kwargs).fit(train, eval)``."""
    return Distiller(student, teacher, recipe, **kwargs).fit(train, eval)
