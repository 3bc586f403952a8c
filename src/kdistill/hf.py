"""Distillation inside a Hugging Face ``transformers.Trainer``: :class:`DistillationTrainer`.

For projects that already train with the Trainer (its data collators, callbacks, logging,
checkpoints, ``torchrun``): the Trainer's model is the student and a frozen ``teacher`` and a
kdistill recipe give the loss. The loss is the engine's own (:class:`kdistill.engine.Distiller`):
the student's and the teacher's taps, the recipe's terms and their weighted sum computed by the
engine's :class:`~kdistill.engine.training_module.TrainingModule`, each term normalised by its
unit (examples, labelled examples, tokens, token pairs) over the whole global batch of an
optimizer step. So with gradient accumulation and several processes the accumulated gradient
is the engine's for the same global batch, not a mean of per-micro-batch means.

How: :meth:`DistillationTrainer.get_batch_samples` (called by the Trainer once per optimizer
step with that step's micro-batches) counts each unit over them and over every process, and
hands these counts on as ``num_items_in_batch``; :meth:`compute_loss` weighs each term of a
micro-batch by local count / global count x processes, the engine's
:func:`~kdistill.batching.unit_scales`. The loss is then already scaled for accumulation
(``loss_is_scaled_for_ga``), and the Trainer adds the micro-batches' gradients as it is.

This module imports transformers (it subclasses its Trainer): nothing else in kdistill imports
it, so the command line does not pay for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import transformers
from torch import nn

from kdistill.batching import unit_counts, unit_scales
from kdistill.engine.step import global_unit_counts
from kdistill.engine.training_module import TrainingModule, build_recipe_modules
from kdistill.errors import KdistillError
from kdistill.models.text import TextModel, check_same_tokens, token_level_taps
from kdistill.recipes.base import Recipe, build_recipe
from kdistill.schedules import TrainState
from kdistill.taps import HF_INPUT_KEYS, TapReader, Taps
from kdistill.teachers import TeacherSource


class StudentTaps:
    """The student's taps for the engine's :class:`TrainingModule`: read by the student's
    :class:`TapReader` (its hooks sit on the student itself) while the forward runs through
    ``through``, the model the Trainer hands to ``compute_loss`` (its data-parallel wrapper,
    which must see the forward to synchronise gradients). ``last`` keeps the last taps: their
    logits are the Trainer's predictions in evaluation."""

    def __init__(self, reader: TapReader):
        self.reader = reader
        self.through: nn.Module = reader.model
        self.last: Taps | None = None

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        student, self.reader.model = self.reader.model, self.through
        try:
            self.last = self.reader(batch)
        finally:
            self.reader.model = student
        return self.last


class RawTextTeacher(TeacherSource):
    """A frozen :class:`TextModel` teacher of a token-id student: it tokenises the batch's raw
    text (``input``) itself and never sees the student's token ids."""

    def __init__(self, source: TeacherSource):
        self.source = source

    @property
    def static(self) -> bool:
        return self.source.static

    def bind(self, tap_names: Iterable[str], device: torch.device) -> None:
        self.source.bind(tap_names, device)

    def close(self) -> None:
        self.source.close()

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        if "input" not in batch:
            raise KdistillError(
                "the teacher is a TextModel and reads raw text, but the batch has no 'input' "
                f"(keys: {sorted(batch)}): keep each sample's text as 'input' (a collator that "
                "keeps it, and TrainingArguments(remove_unused_columns=False))")
        return self.source({k: v for k, v in batch.items() if k not in HF_INPUT_KEYS})


def _recipe(recipe: Recipe | str, params: Mapping[str, Any] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        if params:
            raise KdistillError("recipe_params go with a recipe name; a Recipe instance "
                                "carries its own parameters")
        return recipe
    return build_recipe(recipe, **(params or {}))


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is a kdistill recipe's, with a frozen teacher.

    ``model`` (the student) and every other Trainer argument as usual, plus ``teacher`` (an
    ``nn.Module``: a transformers model reading the same token ids as the student, or a
    :class:`TextModel` that reads the batch's raw text ``input``), ``recipe`` (a registered
    name such as ``"hinton"``, or a :class:`Recipe`) and ``recipe_params`` (for a name, e.g.
    ``{"temperature": 4, "alpha": 0.5}``). Batches are Hugging Face dicts (``input_ids``,
    ``attention_mask``, ``labels``...).

    The teacher runs in eval mode without gradients and is never trained (it is not part of
    the Trainer's model). A recipe's own trainable modules (adapters) are built on the first
    training batch and optimised with the student; they are not saved with the student.
    Recipes the Trainer cannot run as the engine does are refused: several phases, a student
    the recipe rebuilds (extra heads), or a teacher that trains or follows the student
    (online peers, mean teacher): use :class:`kdistill.engine.Distiller` for those. Data
    selection stays the Trainer's: a recipe that learns from labelled samples only still
    sees every sample given.
    """

    # compute_loss normalises over the whole accumulated global batch (see the module doc).
    loss_is_scaled_for_ga = True

    def __init__(self, model: nn.Module | None = None,
                 args: transformers.TrainingArguments | None = None, *,
                 teacher: nn.Module | None, recipe: Recipe | str = "hinton",
                 recipe_params: Mapping[str, Any] | None = None, **kwargs: Any):
        if model is None:
            raise KdistillError("DistillationTrainer needs the student as model (model_init "
                                "is not supported)")
        super().__init__(model, args, **kwargs)
        if self.args.n_gpu > 1:
            raise KdistillError("DistillationTrainer runs one device per process (torchrun or "
                                "accelerate launch), not DataParallel over "
                                f"{self.args.n_gpu} GPUs")
        self.recipe = _recipe(recipe, recipe_params)
        self._check_recipe()
        self.teacher_source = self._teacher_source(teacher)
        reader = TapReader(self.model, [*self.recipe.student_taps(), "logits"])
        self.student_taps = StudentTaps(reader)
        self.training_module = TrainingModule(self.model, self.recipe,
                                              self.student_taps)  # type: ignore[arg-type]
        self._built = False

    def _check_recipe(self) -> None:
        name, kind = self.recipe.name, type(self.recipe)
        if kind.phases is not Recipe.phases:
            raise KdistillError(f"recipe '{name}' trains in several phases; run it with "
                                "kdistill.engine.Distiller")
        if kind.wrap_student is not Recipe.wrap_student:
            raise KdistillError(f"recipe '{name}' trains a student with extra parts "
                                "(wrap_student); run it with kdistill.engine.Distiller")

    def _teacher_source(self, teacher: nn.Module | None) -> TeacherSource | None:
        recipe = self.recipe
        if not recipe.uses_teacher:
            return None
        if teacher is None:
            raise KdistillError(f"recipe '{recipe.name}' needs a teacher: pass teacher=")
        taps = recipe.teacher_taps()
        check_same_tokens(self.model, teacher, taps)
        source = recipe.teacher_source(self.model, teacher)
        if source is None or source.trainable_module() is not None or not source.static:
            raise KdistillError(f"recipe '{recipe.name}' trains its teacher or makes it from "
                                "the student (online peers, mean teacher); DistillationTrainer "
                                "takes a frozen teacher: run it with kdistill.engine.Distiller")
        if isinstance(teacher, TextModel) and not isinstance(self.model, TextModel):
            token_level = token_level_taps(taps)
            if token_level:
                raise KdistillError(
                    f"taps {token_level} compare tokens position by position, but the "
                    "TextModel teacher tokenises the raw text itself; pass its transformers "
                    "network (teacher.model) when it reads the student's token ids")
            source = RawTextTeacher(source)
        source.bind(taps, self.args.device)
        recipe.attach_teacher(source)
        return source

    def create_optimizer(self) -> torch.optim.Optimizer:
        """The Trainer's optimizer, also over the recipe's own modules (built first, on the
        first training batch)."""
        if not self._built and self.train_dataset is not None:
            # One batch drawn aside: the sampler's random draws must stay those of training.
            with torch.random.fork_rng(devices=[]):
                first = next(iter(self.get_train_dataloader()))
            self._build(self._prepare_inputs(first))
        optimizer = super().create_optimizer()
        extra = [p for p in self.recipe.parameters() if p.requires_grad]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if extra and not held.intersection(map(id, extra)):
            optimizer.add_param_group({"params": extra})
        return optimizer

    def _build(self, batch: Mapping[str, Any]) -> None:
        """The recipe's shape-dependent modules, built on ``batch`` as the engine builds them."""
        build_recipe_modules(self.recipe, self.student_taps.reader, self.teacher_source, batch,
                             [self.model], self.args.device)
        self._built = True

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int,
                          device: torch.device) -> tuple[list, Any]:
        """The micro-batches of one optimizer step and, as ``num_items_in_batch``, each loss
        unit's count over them and over every process
        (:func:`~kdistill.engine.step.global_unit_counts`)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, global_unit_counts(batches, self.accelerator) if batches else None

    def train_state(self) -> TrainState:
        """Where training stands, as the engine tells recipes and schedules."""
        state = self.state
        total = max(state.max_steps, 1)
        per_epoch = max(1, math.ceil(total / max(state.num_train_epochs, 1)))
        return TrainState(phase=0, epoch=state.global_step // per_epoch, step=state.global_step,
                          epoch_progress=(state.global_step + 1) / per_epoch,
                          steps_per_epoch=per_epoch, total_steps=total)

    def compute_loss(self, model: nn.Module, inputs: Mapping[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: Mapping[str, float] | torch.Tensor | int | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The recipe's loss on one micro-batch, ``sum_k w_k * value_k * scale_k``.

        With the global counts of :meth:`get_batch_samples` as ``num_items_in_batch``,
        ``scale_k`` is the micro-batch's share of the term's unit in the global batch (times
        the processes, whose gradients are averaged); otherwise (evaluation, a direct call)
        the micro-batch is the whole batch and each term its mean over it. The outputs are the
        student's ``logits``.
        """
        batch = dict(inputs)
        if not self._built:
            self._build(batch)
        local = unit_counts(batch)
        if isinstance(num_items_in_batch, Mapping):
            scales = unit_scales(local, num_items_in_batch, self.accelerator.num_processes)
        else:
            scales = unit_scales(local, local, 1)
        state = self.train_state()
        batch = self.recipe.prepare(batch, self.student_taps.reader, state)
        teacher = self.teacher_source(batch) if self.teacher_source is not None else None
        self.student_taps.through = model
        loss, _ = self.training_module(batch, teacher, state, scales)
        if not return_outputs:
            return loss
        assert self.student_taps.last is not None  # set by the forward just run
        return loss, {"logits": self.student_taps.last["logits"]}
