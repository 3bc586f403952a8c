"""The engine: one training loop for every recipe, on Hugging Face Accelerate.

``Distiller(student, teacher, recipe, ...).fit(train, eval)`` trains ``student`` through a list of
phases (each a recipe, a number of epochs and optionally its own optimizer and LR schedule).
Per optimizer step it

1. takes this process's micro-batches of the next global batch (:mod:`kdistill.batching`),
2. counts each loss unit (examples, labelled examples, tokens) over the whole global batch,
3. for every micro-batch: teacher taps, student taps, the recipe's terms, and
   ``sum_k w_k * value_k * local_count_k / global_count_k`` backpropagated (gradients are
   synchronised across processes on the last micro-batch only),
4. clips, steps the optimizer and LR schedule, lets the teacher source update (EMA), logs a
   record with every term (its mean over the global batch), their weighted total ``loss`` and
   the learning rate the step used (history and ``<run_dir>/metrics.jsonl``).

Only the student and the recipe's own modules are wrapped for data parallelism; the teacher
runs outside the wrapper on every process. Checkpoints are written every ``checkpoint_every``
steps and at the end of every ``eval_every``-th epoch and of each phase; ``fit(...,
resume=True)`` continues from the newest one and ends with the same weights, history and metrics
log as an uninterrupted run. A fit without ``resume`` starts its run directory afresh (earlier
metrics and checkpoints are removed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from kdistill.batching import (
    epoch_global_batches,
    process_micro_batches,
    to_device,
    unit_counts,
)
from kdistill.checkpoint import (
    atomic_save_tensors,
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from kdistill.data.base import IndexedDataset, collate, labeled_indices
from kdistill.errors import KdistillError, ModelCallError, describe_batch
from kdistill.metrics_log import MetricsLog
from kdistill.progress import TrainingProgress
from kdistill.recipes.base import Recipe, build_recipe
from kdistill.schedules import TrainState, lr_multiplier
from kdistill.settings import OptimizerSettings, SchedulerSettings, TrainerSettings
from kdistill.taps import TapReader, Taps
from kdistill.teachers import TeacherSource, as_source

TOTAL = "loss"  # the record key of the weighted total of a step's terms

Evaluator = Callable[[nn.Module, "TeacherSource | None"], dict[str, float]]


MINIMISED_METRICS = frozenset({"ece", "loss", "mse", "mse_teacher"})


@dataclass
class Phase:
    """One stage of training: a recipe for ``epochs`` epochs, optionally with its own optimizer
    and LR schedule (the trainer's otherwise).

    ``keep_best`` (default: the recipe's) names an evaluation metric: the phase then ends with
    the student weights of its best end-of-epoch evaluation (``ece``, ``loss`` and ``mse`` are
    minimised, any other metric maximised) instead of its last ones.
    """

    recipe: Recipe
    epochs: int
    name: str = ""
    optimizer: OptimizerSettings | None = None
    scheduler: SchedulerSettings | None = None
    keep_best: str | None = None

    def __post_init__(self) -> None:
        if self.keep_best is None:
            self.keep_best = self.recipe.keep_best

    def improves(self, score: float, best: float | None) -> bool:
        """Whether ``score`` of the ``keep_best`` metric beats ``best`` (None: nothing yet)."""
        if best is None:
            return True
        return score < best if self.keep_best in MINIMISED_METRICS else score > best


@dataclass
class FitResult:
    """What :meth:`Distiller.fit` returns."""

    student: nn.Module
    history: list[dict[str, Any]]
    run_dir: Path | None
    phases: list[Phase] = field(default_factory=list)

    def evaluations(self) -> list[dict[str, Any]]:
        """The end-of-epoch evaluation records."""
        return [r for r in self.history if r.get("kind") == "eval"]


class TrainingModule(nn.Module):
    """Student plus one phase's recipe (plus the peers of a trainable teacher source): the unit
    wrapped for data parallelism and optimised.

    A trainable source (``peers`` given) is called inside :meth:`forward`, with gradients;
    otherwise the teacher's taps come in as an argument.
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


def wrap_student(student: nn.Module, phases: Sequence[Phase]) -> nn.Module:
    """The model to train: ``student`` as each phase's recipe wraps it (extra heads...)."""
    for phase in phases:
        student = phase.recipe.wrap_student(student)
    return student


def recipe_phases(recipe: Recipe, epochs: int) -> list[Phase]:
    """The phases a recipe splits a budget of ``epochs`` into, named ``<index>-<recipe>``."""
    return [Phase(r, n, name=f"{i}-{r.name}") for i, (r, n) in enumerate(recipe.phases(epochs))]


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


def _as_dataset(data: Dataset | DataLoader) -> tuple[Dataset, Callable, int | None]:
    if isinstance(data, DataLoader):
        collate_fn = data.collate_fn if data.collate_fn is not default_collate else collate
        return IndexedDataset(data.dataset), collate_fn, data.batch_size
    return IndexedDataset(data), collate, None


def _build_optimizer(params: Iterable[nn.Parameter],
                     settings: OptimizerSettings) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    return torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas,
                             weight_decay=settings.weight_decay)


def _build_scheduler(optimizer: torch.optim.Optimizer, settings: SchedulerSettings,
                     total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_multiplier(settings.name, step, total_steps, settings.warmup_steps,
                             settings.min_ratio, settings.step_size, settings.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
            resume: bool = False,
            callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> FitResult:
        """Train through every phase; returns the student and the metrics history.

        ``callbacks`` receive each end-of-epoch record (every ``eval_every`` epochs and at the
        end of each phase) after its checkpoint is written. ``resume=True`` continues from the
        newest checkpoint in ``run_dir``; without it an earlier run's metrics and checkpoints
        there are removed.
        """
        run = _Run(self, train, eval, callbacks)
        try:
            return run.execute(resume)
        finally:
            run.close()


class _Run:
    """The state of one call to :meth:`Distiller.fit`."""

    def __init__(self, distiller: Distiller, train: Dataset | DataLoader,
                 eval_data: Dataset | DataLoader | None,
                 callbacks: Sequence[Callable[[dict[str, Any]], None]]):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.d = distiller
        self.s = distiller.settings
        self.dataset, self.collate_fn, loader_batch = _as_dataset(train)
        self.micro_batch = loader_batch or self.s.batch_size
        self.eval_data = eval_data
        self.callbacks = callbacks
        # Accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator
        # with other settings (say bf16 after fp32). Each fit starts from fresh settings; the
        # distributed set-up (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=self.s.cpu or not torch.cuda.is_available(),
            mixed_precision=self.s.mixed_precision,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(self.s.seed)
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.d.student.to(self.device)
        self.history: list[dict[str, Any]] = []
        self.global_step = 0
        self.log = MetricsLog(distiller.run_dir / "metrics.jsonl" if distiller.run_dir and
                              self.main else None)
        self.progress = TrainingProgress(enabled=self.s.progress and self.main)
        self.built: set[int] = set()
        self.eval_batches: list[dict[str, Any]] | None = None
        self.teacher_eval_logits: torch.Tensor | None = None
        # The best evaluation of the current phase, for phases that keep their best weights.
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        for phase in distiller.phases:
            if phase.keep_best and eval_data is None and distiller.evaluator is None:
                raise ValueError(f"phase '{phase.name or phase.recipe.name}' keeps its best "
                                 f"weights by '{phase.keep_best}' and needs evaluation data: "
                                 "pass eval to fit")

    # -- trainable teacher sources ----------------------------------------------------------
    def peers(self) -> nn.Module | None:
        """The teacher source's trainable module (online peers), if any."""
        return self.d.teacher.trainable_module() if self.d.teacher is not None else None

    # -- phases -------------------------------------------------------------------------------
    def teacher_tap_names(self, phase: Phase) -> list[str]:
        names = list(phase.recipe.teacher_taps())
        return names if "logits" in names else [*names, "logits"]

    def bind_teacher(self, phase: Phase) -> None:
        if self.d.teacher is not None:
            self.d.teacher.bind(self.teacher_tap_names(phase), self.device)

    def materialise(self, index: int, phase: Phase, reader: TapReader) -> None:
        """Build the recipe's shape-dependent modules on the first batch of the phase.

        The student runs this forward in eval mode (modes restored after), so BatchNorm
        statistics do not absorb an extra batch and dropout draws no random numbers.
        """
        if index in self.built:
            return
        first = to_device(self.collate_fn([self.dataset[i] for i in
                                           range(min(self.micro_batch, len(self.dataset)))]),
                          self.device)
        models = [self.d.student, *filter(None, [self.peers()])]
        modes = [(m, m.training) for model in models for m in model.modules()]
        for model in models:
            model.eval()
        try:
            with torch.no_grad():
                teacher = call_model("teacher", self.d.teacher, first) \
                    if phase.recipe.uses_teacher else None
                phase.recipe.build(call_model("student", reader, first), teacher)
        finally:
            for module, mode in modes:
                module.training = mode
        phase.recipe.to(self.device)
        self.built.add(index)

    def train_indices(self, phase: Phase) -> list[int]:
        if phase.recipe.uses_unlabeled:
            return list(range(len(self.dataset)))
        indices = labeled_indices(self.dataset)
        if not indices:
            raise ValueError(f"recipe '{phase.recipe.name}' trains on labelled samples only and "
                             "the training data has none")
        return indices

    def plan(self, phase_index: int, indices: list[int], epoch: int) -> list[list[int]]:
        global_batch = self.micro_batch * self.s.accumulation * self.world
        return epoch_global_batches(indices, global_batch, self.s.accumulation * self.world,
                                    self.s.seed, phase_index, epoch)

    # -- state --------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        tensors = {f"student.{k}": v for k, v in self.d.student.state_dict().items()}
        if self.best_weights is not None:
            tensors.update({f"best.{k}": v for k, v in self.best_weights.items()})
        for i, phase in enumerate(self.d.phases):
            if i in self.built:
                tensors.update({f"recipe.{i}.{k}": v for k, v in
                                phase.recipe.state_dict().items()})
        if self.d.teacher is not None:
            tensors.update({f"teacher.{k}": v for k, v in self.d.teacher.state_dict().items()})
        return tensors

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.d.student.load_state_dict(part("student."))
        best = part("best.")
        self.best_weights = best or None
        for i in self.built:
            self.d.phases[i].recipe.load_state_dict(part(f"recipe.{i}."))
        if self.d.teacher is not None:
            self.d.teacher.load_state_dict(part("teacher."))

    def scaler_state(self) -> dict[str, Any] | None:
        """The fp16 gradient scaler's state (JSON numbers), or None without one."""
        scaler = self.accelerator.scaler
        return dict(scaler.state_dict()) if scaler is not None else None

    def checkpoint(self, position: Mapping[str, int], optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        if self.d.run_dir is not None and self.main:
            save_checkpoint(self.d.run_dir, self.global_step, weights=self.weights(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            trainer={**position, "global_step": self.global_step,
                                     "history": self.history, "scaler": self.scaler_state(),
                                     "best": self.best},
                            keep=self.s.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    # -- the loop -----------------------------------------------------------------------------
    def execute(self, resume: bool) -> FitResult:
        start = {"phase": 0, "epoch": 0, "batch": 0}
        checkpoint = None
        if resume:
            if self.d.run_dir is None:
                raise ValueError("resume needs a run directory")
            path = latest_checkpoint(self.d.run_dir)
            if path is None:
                raise FileNotFoundError(f"nothing to resume: no checkpoint in "
                                        f"{self.d.run_dir / 'checkpoints'}")
            checkpoint = load_checkpoint(path)
            start = {k: int(checkpoint.trainer[k]) for k in start}
            self.global_step = int(checkpoint.trainer["global_step"])
            self.best = checkpoint.trainer.get("best")
            self.history = list(checkpoint.trainer["history"])
            self.log.replace(self.history)
        elif self.d.run_dir is not None and self.main:
            # A fresh run owns its folder: no metrics or checkpoints of an earlier run survive
            # (a later resume would otherwise continue the earlier run).
            self.log.replace([])
            clear_checkpoints(self.d.run_dir)
        self.accelerator.wait_for_everyone()
        for index, phase in enumerate(self.d.phases):
            if index < start["phase"]:
                continue
            resume_here = checkpoint if index == start["phase"] else None
            self.run_phase(index, phase, resume_here,
                           start if resume_here is not None else {"epoch": 0, "batch": 0})
        if self.d.run_dir is not None and self.main:
            atomic_save_tensors(self.d.student.state_dict(), self.d.run_dir /
                                "student.safetensors")
        return FitResult(self.d.student, self.history, self.d.run_dir, self.d.phases)

    def materialise_earlier(self, index: int) -> None:
        """Build the modules (adapters) of the phases before ``index``, each with its own
        phase's taps, so that a checkpoint taken later can be loaded into them."""
        for earlier in range(index):
            phase = self.d.phases[earlier]
            if earlier not in self.built:
                self.bind_teacher(phase)
                with TapReader(self.d.student, phase.recipe.student_taps()) as reader:
                    self.materialise(earlier, phase, reader)

    def run_phase(self, index: int, phase: Phase, checkpoint: Any,
                  start: Mapping[str, int]) -> None:
        if checkpoint is not None:
            self.materialise_earlier(index)
        self.bind_teacher(phase)
        reader = TapReader(self.d.student, phase.recipe.student_taps())
        try:
            self.materialise(index, phase, reader)
            if checkpoint is not None:
                self.load_weights(checkpoint.weights)
            if checkpoint is None:
                self.best, self.best_weights = None, None
            trainable = self.d.teacher if self.peers() is not None else None
            module = TrainingModule(self.d.student, phase.recipe, reader, trainable)
            module.train()
            indices = self.train_indices(phase)
            steps_per_epoch = len(self.plan(index, indices, 0))
            if steps_per_epoch == 0:
                raise ValueError(f"phase '{phase.name}': {len(indices)} training samples are too "
                                 f"few for one global batch of this size")
            total_steps = steps_per_epoch * phase.epochs
            optimizer = _build_optimizer(module.parameters(),
                                         phase.optimizer or self.s.optimizer)
            scheduler = _build_scheduler(optimizer, phase.scheduler or self.s.scheduler,
                                         total_steps)
            if checkpoint is not None:
                optimizer.load_state_dict(checkpoint.optimizer)
                scheduler.load_state_dict(checkpoint.scheduler)
                restore_rng(checkpoint.rng_tensors, checkpoint.rng_meta)
                scaler_state = checkpoint.trainer.get("scaler")
                if self.accelerator.scaler is not None and scaler_state:
                    self.accelerator.scaler.load_state_dict(scaler_state)
            wrapped = self.accelerator.prepare_model(module)
            self.progress.start_phase(phase.name or phase.recipe.name, total_steps,
                                      start["epoch"] * steps_per_epoch + start["batch"])
            for epoch in range(start["epoch"], phase.epochs):
                batches = self.plan(index, indices, epoch)
                first = start["batch"] if epoch == start["epoch"] else 0
                for b in range(first, len(batches)):
                    state = TrainState(index, epoch, epoch * steps_per_epoch + b,
                                       epoch + (b + 1) / steps_per_epoch, steps_per_epoch,
                                       total_steps)
                    record = self.step(wrapped, module, batches[b], state, optimizer, scheduler)
                    if self.s.checkpoint_every and self.global_step % self.s.checkpoint_every == 0:
                        self.checkpoint({"phase": index, "epoch": epoch, "batch": b + 1},
                                        optimizer, scheduler)
                    self.progress.advance(record)
                self.end_epoch(index, phase, epoch, optimizer, scheduler)
            self.restore_best(index, phase)
        finally:
            reader.close()
            self.accelerator.free_memory()

    def step(self, wrapped: nn.Module, module: TrainingModule, global_batch: list[int],
             state: TrainState, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
        chunks = process_micro_batches(global_batch, self.world, self.rank, self.s.accumulation)
        micro = [self.collate_fn([self.dataset[i] for i in chunk]) for chunk in chunks]
        local = [unit_counts(b) for b in micro]
        units = sorted(local[0])
        totals = torch.tensor([[sum(c[u] for c in local) for u in units]], dtype=torch.float64,
                              device=self.device)
        global_counts = dict(zip(units, self.accelerator.reduce(totals, "sum")[0].tolist(),
                                 strict=True))
        recipe = module.recipe
        reported: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro):
            batch = recipe.prepare(to_device(batch, self.device), module.reader, state)
            scales = {u: (local[j][u] / global_counts[u] * self.world) if global_counts[u] else 0.0
                      for u in units}
            teacher = self.d.teacher(batch) if recipe.uses_teacher and module.source is None \
                else None
            sync = contextlib.nullcontext() if j == len(micro) - 1 else \
                self.accelerator.no_sync(wrapped)
            with sync:
                loss, terms = wrapped(batch, teacher, state, scales)
                self.accelerator.backward(loss)
            for name, value in terms.items():
                reported[name] = reported.get(name, 0.0) + value / self.world
            reported[TOTAL] = reported.get(TOTAL, 0.0) + loss.detach() / self.world
        scaler = self.accelerator.scaler  # fp16 on a GPU: backward scaled the loss
        if scaler is not None:
            scaler.unscale_(optimizer)  # true gradients for clipping and the update
        if self.s.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.s.clip_grad_norm)
        lr = float(optimizer.param_groups[0]["lr"])  # the rate this step's update uses
        if scaler is not None:
            scaler.step(optimizer)  # skipped when a gradient overflowed
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if self.d.teacher is not None:
            self.d.teacher.after_step(self.d.student, state)
        self.global_step += 1
        return self.record_step(state, reported, lr)

    def record_step(self, state: TrainState, reported: Mapping[str, torch.Tensor],
                    lr: float) -> dict[str, Any]:
        """The step's record: every term (mean over the global batch), the weighted total
        ``loss`` and the learning rate the step used; logged every ``log_every`` steps."""
        names = sorted(reported)
        values = torch.stack([torch.as_tensor(reported[n], dtype=torch.float64,
                                              device=self.device) for n in names]) \
            if names else torch.zeros(0, dtype=torch.float64, device=self.device)
        values = self.accelerator.reduce(values, "sum").tolist() if names else []
        record: dict[str, Any] = {
            "kind": "train", "phase": state.phase, "epoch": state.epoch,
            "step": self.global_step, "lr": lr,
            **dict(zip(names, values, strict=True)),
        }
        if self.global_step % self.s.log_every == 0:
            self.log.write(record)
            self.history.append(record)
        return record

    def evaluate(self) -> dict[str, float]:
        if self.d.evaluator is not None:
            return self.d.evaluator(self.d.student, self.d.teacher)
        from kdistill.evaluate import eval_batches, evaluate_model, predict_source

        if self.eval_batches is None:
            self.eval_batches = eval_batches(self.eval_data, self.s.batch_size, self.collate_fn)
        teacher_logits = self.teacher_eval_logits
        if teacher_logits is None and self.d.teacher is not None:
            teacher_logits = predict_source(self.d.teacher, self.eval_batches,
                                            self.device).logits
            if self.d.teacher.static:  # a frozen teacher's answers are computed once per fit
                self.teacher_eval_logits = teacher_logits
        return evaluate_model(self.d.student, self.eval_batches, self.device, teacher_logits)

    def end_epoch(self, index: int, phase: Phase, epoch: int, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Every ``eval_every`` epochs and at the end of the phase: evaluate, log, checkpoint."""
        if (epoch + 1) % self.s.eval_every and epoch + 1 != phase.epochs:
            return
        self.sync_buffers()
        record: dict[str, Any] = {"kind": "eval", "phase": index, "phase_name": phase.name,
                                  "epoch": epoch + 1, "step": self.global_step}
        if self.eval_data is not None or self.d.evaluator is not None:
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
        self.history.append(record)
        self.log.write(record)
        self.progress.show_eval(record)
        if phase.keep_best:
            self.track_best(index, phase, record)
        self.checkpoint({"phase": index, "epoch": epoch + 1, "batch": 0}, optimizer, scheduler)
        for callback in self.callbacks:
            callback(record)

    def track_best(self, index: int, phase: Phase, record: Mapping[str, Any]) -> None:
        """Remember the student's weights when this evaluation is the phase's best so far."""
        key = f"eval_{phase.keep_best}"
        if key not in record:
            metrics = sorted(k[len("eval_"):] for k in record if k.startswith("eval_"))
            raise ValueError(f"phase '{phase.name}': keep_best '{phase.keep_best}' is not an "
                             f"evaluation metric; the evaluation gives {metrics}")
        score = float(record[key])
        if phase.improves(score, self.best["score"] if self.best else None):
            self.best = {"phase": index, "epoch": record["epoch"], "score": score}
            self.best_weights = {k: v.detach().clone()
                                 for k, v in self.d.student.state_dict().items()}

    def restore_best(self, index: int, phase: Phase) -> None:
        """End a ``keep_best`` phase with the weights of its best evaluation, and log it."""
        if not phase.keep_best or self.best is None or self.best_weights is None:
            return
        self.d.student.load_state_dict(self.best_weights)
        record = {"kind": "restore_best", "phase": index, "phase_name": phase.name,
                  "metric": phase.keep_best, **self.best, "step": self.global_step}
        self.history.append(record)
        self.log.write(record)
        self.best, self.best_weights = None, None

    def sync_buffers(self) -> None:
        """Copy the main process's student buffers to every process.

        DDP broadcasts buffers at the start of each forward, so after the last step each
        process's BatchNorm statistics hold its own micro-batch: without this, replicas would
        evaluate, checkpoint and end differently.
        """
        if self.world > 1:
            for model in [self.d.student, *filter(None, [self.peers()])]:
                for buffer in model.buffers():
                    torch.distributed.broadcast(buffer.data, src=0)

    def close(self) -> None:
        self.progress.stop()
        if self.d.teacher is not None:
            self.d.teacher.close()


def distill(student: nn.Module, teacher: nn.Module | TeacherSource | None,
            train: Dataset | DataLoader, eval: Dataset | DataLoader | None = None,
            recipe: Recipe | str = "hinton", **kwargs: Any) -> FitResult:
    """One call: ``Distiller(student, teacher, recipe, **kwargs).fit(train, eval)``."""
    return Distiller(student, teacher, recipe, **kwargs).fit(train, eval)
