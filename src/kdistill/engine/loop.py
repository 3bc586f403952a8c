"""The training loop: one :class:`TrainingRun` per call to :meth:`Distiller.fit`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdistill.batch import to_device
from kdistill.checkpoint import Checkpoint
from kdistill.engine.evaluation import EpochEvaluation, Evaluator
from kdistill.engine.feed import Cut, PhaseFeed, PhaseSchedule, TrainingSet
from kdistill.engine.nonfinite import NonFiniteSteps
from kdistill.engine.optim import build_optimizer, build_scheduler
from kdistill.engine.phases import FitResult, Phase
from kdistill.engine.run_folder import RunOpening, StartHook
from kdistill.engine.state import RunState, fit_description
from kdistill.engine.step import OptimizerStep
from kdistill.engine.training_module import TrainingModule, build_recipe_modules
from kdistill.errors import KdistillError
from kdistill.metrics_log import MetricsLog
from kdistill.progress import TrainingProgress
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings
from kdistill.taps import TapReader
from kdistill.teachers import TeacherSource

Callback = Callable[[dict[str, Any]], None]


@dataclass
class PhaseTraining:
    """What one phase trains with: its module (wrapped for data parallelism), optimizer, LR
    schedule, and how it reads the training data (steps per epoch, loaders)."""

    index: int
    phase: Phase
    module: TrainingModule
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: PhaseSchedule

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.cut.steps_per_epoch

    def train_state(self, epoch: int, batch: int) -> TrainState:
        """The state of the step that trains ``batch`` of ``epoch``."""
        return TrainState(phase=self.index, epoch=epoch,
                          step=epoch * self.steps_per_epoch + batch,
                          epoch_progress=epoch + (batch + 1) / self.steps_per_epoch,
                          steps_per_epoch=self.steps_per_epoch,
                          total_steps=self.steps_per_epoch * self.phase.epochs)


class TrainingRun:
    """Runs every phase of one fit (:meth:`kdistill.engine.Distiller.fit`): epochs of optimizer
    steps, evaluations, keep-best phases, the metrics log, checkpoints and the resume from the
    newest one."""

    def __init__(self, student: nn.Module, teacher: TeacherSource | None,
                 phases: Sequence[Phase], settings: TrainerSettings, run_dir: Path | None,
                 evaluator: Evaluator | None, train: Dataset | DataLoader,
                 eval_data: Dataset | DataLoader | None, callbacks: Sequence[Callback]):
        self.phases, self.settings, self.run_dir = phases, settings, run_dir
        self.data = TrainingSet(train, settings)
        self.micro_batch = self.data.batch_size or settings.batch_size
        self.callbacks = callbacks
        self.accelerator = make_accelerator(settings)
        set_seed(settings.seed)
        self.student = student.to(self.accelerator.device)
        self.teacher = teacher
        main = self.accelerator.is_main_process
        self.state = RunState(student, phases, teacher, settings, run_dir, self.accelerator)
        self.state.description = fit_description(
            settings, phases, self.micro_batch * settings.accumulation *
            self.accelerator.num_processes, self.data.length)
        self.log = MetricsLog(None)  # the run folder's log once the run has started (begin)
        self.progress = TrainingProgress(enabled=settings.progress and main)
        self.evaluation = EpochEvaluation(student, teacher, eval_data, evaluator,
                                          settings.batch_size, self.data.collate_fn,
                                          self.accelerator.device)
        self.optimizer_step = OptimizerStep(self.accelerator, teacher, settings)
        self.nonfinite = NonFiniteSteps(settings.on_nonfinite)

    def execute(self, resume: bool, overwrite: bool = False,
                on_start: StartHook | None = None) -> FitResult:
        """Train through every phase (from the newest intact checkpoint with ``resume``).

        Nothing is written into ``run_dir`` before the run has started (:meth:`begin`): the
        checkpoint is loaded and checked, and the first phase to train is built, first."""
        start, checkpoint = {"phase": 0, "epoch": 0, "batch": 0}, None
        run_dir = self.run_dir
        if resume:
            checkpoint, start = self.state.load_newest()
            self.nonfinite.resume(self.state.history, self.state.global_step)
        self.opening = RunOpening(run_dir, self.accelerator.is_main_process, resume, overwrite,
                                  on_start)
        for index, phase in enumerate(self.phases):
            if index == start["phase"]:
                self.run_phase(index, phase, checkpoint, start)
            elif index > start["phase"]:
                self.run_phase(index, phase, None, {"epoch": 0, "batch": 0})
        self.begin()
        self.state.save_student()
        return FitResult(self.student, self.state.history, run_dir, self.phases)

    def begin(self) -> None:
        """Take the run folder, once, after every start-up step has succeeded
        (:meth:`RunOpening.begin`); the metrics log then writes there."""
        if not self.opening.started:
            self.log = self.opening.begin(self.state.history, self.state.global_step) or self.log
            self.accelerator.wait_for_everyone()

    def run_phase(self, index: int, phase: Phase, checkpoint: Checkpoint | None,
                  start: Mapping[str, int]) -> None:
        """Train one phase from ``start`` (epoch, batch), restoring ``checkpoint`` if given."""
        self.build_recipes(index)
        if checkpoint is None:
            self.state.best.reset()
        bind_teacher(self.teacher, phase, self.accelerator.device)
        reader = TapReader(self.student, phase.recipe.student_taps())
        feed: PhaseFeed | None = None
        try:
            training = self.phase_training(index, phase, reader)
            if checkpoint is not None:
                self.state.restore(checkpoint, training.optimizer, training.scheduler)
            training.wrapped = self.accelerator.prepare_model(training.module)
            self.begin()
            self.progress.start_phase(phase.name or phase.recipe.name,
                                      training.steps_per_epoch * phase.epochs,
                                      start["epoch"] * training.steps_per_epoch + start["batch"])
            feed = training.schedule.feed((start["epoch"], start["batch"]))
            for epoch in range(start["epoch"], phase.epochs):
                self.run_epoch(training, feed, epoch,
                               start["batch"] if epoch == start["epoch"] else 0)
            restored = self.state.best.restore(index, phase, self.student, self.state.global_step)
            if restored is not None:
                self.write(restored)
        finally:
            if feed is not None:
                feed.close()
            reader.close()
            self.accelerator.free_memory()

    def phase_training(self, index: int, phase: Phase, reader: TapReader) -> PhaseTraining:
        """The training module, optimizer and LR schedule of a phase (not yet wrapped)."""
        trainable = self.teacher if self.peers() is not None else None
        module = TrainingModule(self.student, phase.recipe, reader, trainable)
        module.train()
        accelerator = self.accelerator
        schedule = self.data.schedule(phase, Cut(
            self.micro_batch, self.settings.accumulation, accelerator.num_processes,
            accelerator.process_index, self.settings.seed, index, phase.epochs))
        optimizer = build_optimizer(module, phase.optimizer or self.settings.optimizer)
        scheduler = build_scheduler(optimizer, phase.scheduler or self.settings.scheduler,
                                    schedule.cut.steps_per_epoch * phase.epochs)
        return PhaseTraining(index, phase, module, module, optimizer, scheduler, schedule)

    def run_epoch(self, training: PhaseTraining, feed: PhaseFeed, epoch: int,
                  first_batch: int) -> None:
        """Train the batches of ``epoch`` from ``first_batch`` on, then evaluate."""
        for b in range(first_batch, training.steps_per_epoch):
            state = training.train_state(epoch, b)
            outcome = self.optimizer_step(training.wrapped, training.module, feed.step(epoch, b),
                                          state, training.optimizer, training.scheduler)
            if outcome.applied and self.teacher is not None:
                self.teacher.after_step(self.student, state)
            self.state.global_step += 1
            record = self.record_step(state, outcome.terms, outcome.lr) if outcome.applied \
                else self.nonfinite.handle(training.index, training.phase,
                                           training.steps_per_epoch, state,
                                           self.state.global_step, outcome, self.write)
            every = self.settings.checkpoint_every
            if every and self.state.global_step % every == 0:
                self.state.save({"phase": training.index, "epoch": epoch, "batch": b + 1},
                                training.optimizer, training.scheduler)
            self.progress.advance(record)
        self.end_epoch(training, epoch)

    def build_recipes(self, upto: int) -> None:
        """Build the recipe modules (adapters) of every phase up to ``upto`` not built yet, each
        on its own phase's taps and the first training batch: a resumed fit builds earlier
        phases' modules to load them."""
        device = self.accelerator.device
        for index in range(upto + 1):
            if index not in self.state.built:
                phase = self.phases[index]
                bind_teacher(self.teacher, phase, device)
                first = to_device(self.data.collate_fn(
                    self.data.first_samples(self.micro_batch)), device)
                with TapReader(self.student, phase.recipe.student_taps()) as reader:
                    build_recipe_modules(phase.recipe, reader, self.teacher, first,
                                         [self.student, *filter(None, [self.peers()])], device)
                self.state.built.add(index)

    def record_step(self, state: TrainState, terms: Mapping[str, float],
                    lr: float) -> dict[str, Any]:
        """The record of a step that was applied (which ends any run of skipped steps): every
        term (mean over the global batch, all processes), the weighted total ``loss`` and the
        learning rate the step used; logged every ``log_every`` steps."""
        self.nonfinite.applied()
        record: dict[str, Any] = {"kind": "train", "phase": state.phase, "epoch": state.epoch,
                                  "step": self.state.global_step, "lr": lr, **terms}
        if self.state.global_step % self.settings.log_every == 0:
            self.write(record)
        return record

    def end_epoch(self, training: PhaseTraining, epoch: int) -> None:
        """Every ``eval_every`` epochs and at the end of the phase: evaluate, log, checkpoint."""
        phase = training.phase
        if (epoch + 1) % self.settings.eval_every and epoch + 1 != phase.epochs:
            return
        if self.accelerator.num_processes > 1:
            broadcast_buffers([self.student, *filter(None, [self.peers()])])
        record: dict[str, Any] = {"kind": "eval", "phase": training.index,
                                  "phase_name": phase.name, "epoch": epoch + 1,
                                  "step": self.state.global_step}
        if self.evaluation.available:
            record.update({f"eval_{k}": v for k, v in self.evaluation().items()})
        self.write(record)
        self.progress.show_eval(record)
        if phase.keep_best:
            self.state.best.track(training.index, phase, record, self.student)
        self.state.save({"phase": training.index, "epoch": epoch + 1, "batch": 0},
                        training.optimizer, training.scheduler)
        for callback in self.callbacks:
            callback(record)

    def write(self, record: dict[str, Any]) -> None:
        """Add a record to the history and the metrics log."""
        self.log.write(record)
        self.state.history.append(record)

    def peers(self) -> nn.Module | None:
        """The teacher source's trainable module (online peers), if any."""
        return self.teacher.trainable_module() if self.teacher is not None else None

    def close(self) -> None:
        self.progress.stop()
        if self.teacher is not None:
            self.teacher.close()


SHARDED_TRAINING = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
                    DistributedType.MEGATRON_LM: "Megatron-LM"}


def make_accelerator(settings: TrainerSettings) -> Accelerator:
    """A fresh :class:`Accelerator` for one fit.

    Accelerate keeps one process-wide ``AcceleratorState`` and refuses a second Accelerator
    with other settings (say bf16 after fp32), so each fit starts from fresh settings; the
    distributed set-up (``PartialState``) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=settings.cpu or not torch.cuda.is_available(),
                              mixed_precision=settings.mixed_precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=True)])
    sharding = SHARDED_TRAINING.get(accelerator.distributed_type)
    if sharding is not None:
        raise KdistillError(f"the Accelerate launch config asks for {sharding}, which kdistill "
                            "does not run yet: it wraps the student for data-parallel training "
                            f"alone, so under {sharding} the student's gradients would not be "
                            "synchronised or its parameters would not be the optimizer's; "
                            "launch with a multi-process config without it (accelerate launch "
                            "--multi_gpu, or torchrun), see docs/lm.md, 'Scale'")
    return accelerator


def bind_teacher(teacher: TeacherSource | None, phase: Phase, device: torch.device) -> None:
    """Bind the teacher to the phase's teacher taps plus ``logits`` (agreement in
    evaluations), and hand it to the phase's recipe (:meth:`Recipe.attach_teacher`)."""
    if teacher is not None:
        names = list(phase.recipe.teacher_taps())
        teacher.bind(names if "logits" in names else [*names, "logits"], device)
    phase.recipe.attach_teacher(teacher)


def broadcast_buffers(models: Sequence[nn.Module]) -> None:
    """Copy the main process's buffers of ``models`` to every process.

    DDP broadcasts buffers at the start of each forward, so after the last step each process's
    BatchNorm statistics hold its own micro-batch: without this, replicas would evaluate,
    checkpoint and end differently.
    """
    for model in models:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer.data, src=0)
