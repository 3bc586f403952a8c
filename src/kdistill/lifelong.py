"""Lifelong learning of a language model over a sequence of tasks: L2KD and its forgetting
matrix.

**L2KD** (Chuang, Su & Chen 2020, "Lifelong Language Knowledge Distillation", EMNLP). Tasks
1..K (language-modelling data sets, task ``lm``) arrive one after another. For each new task k
a teacher is first trained on task k alone, by cross-entropy, starting from the same initial
model (a copy of the student as it was before stage 1, or a given model); then the lifelong
student, as stage k-1 left it, trains on task k with word-level KD from that teacher plus the
labels' cross-entropy::

    L_k = kd_weight * (1 / N) sum_{(b, t) labelled} KL(p_T(. | x_<t) || p_S(. | x_<t))
        + ce_weight * (1 / N) sum_{(b, t) labelled} -log q_S(y_t | x_<t),
    p = softmax(z / T),  q_S = softmax(z_S)

the terms of the ``token_kd`` recipe with ``divergence: forward_kl`` (its KL and the paper's
soft-target cross-entropy differ by the teacher's entropy, a constant for the student). The
teacher being an expert of task k alone, the student adapts to it with less drift than from
the hard labels, which is what the paper credits for the smaller forgetting. The paper runs
this inside LAMOL (whose replay of generated pseudo-samples of the earlier tasks is not part
of this module: give each stage's data set the replayed rows if you want them).

**Forgetting.** After each stage i the student is evaluated on the held-out split of every
task j <= i (perplexity and next-token accuracy, :func:`kdistill.evaluate.lm_metrics`): the
matrix ``a[i][j]`` (NaN for j > i, tasks not seen yet). The forgetting of task j < K after the
last stage is the drop from its best earlier score (Chaudhry et al. 2018, "Riemannian Walk for
Incremental Learning")::

    f_j = max_{j <= i < K} a[i][j] - a[K][j]     (accuracy: higher is better)
    f_j = a[K][j] - min_{j <= i < K} a[i][j]     (perplexity: lower is better)

(stages counted from 1 here; 0-based in the code) and the mean forgetting is their mean over
the K - 1 earlier tasks (NaN with a single task).

The loop sits above the engine (it runs one :class:`~kdistill.engine.Distiller` fit per teacher
and per stage) and below the configuration: a recipe cannot express it, since a recipe trains
one model against one teacher on one data set, and L2KD changes all three between stages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from kdistill.engine import Distiller
from kdistill.errors import KdistillError
from kdistill.evaluate import eval_batches, evaluate_model
from kdistill.recipes.base import Recipe, build_recipe
from kdistill.settings import Strict, TrainerSettings

METRICS = {"perplexity": False, "accuracy": True}
"""The metrics of the forgetting matrix, each with whether higher is better."""


class L2KDSettings(Strict):
    """How each stage trains: word-level KD at ``temperature`` weighted ``kd_weight`` plus the
    labels' cross-entropy weighted ``ce_weight``; ``trainer`` for the student's stages,
    ``teacher_trainer`` for the teachers (default: ``trainer``); ``eval_batch_size`` rows a batch
    for the forgetting matrix."""

    temperature: float = Field(default=2.0, gt=0)
    kd_weight: float = Field(default=1.0, ge=0)
    ce_weight: float = Field(default=1.0, ge=0)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    teacher_trainer: TrainerSettings | None = None
    eval_batch_size: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _some_signal(self) -> L2KDSettings:
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: the student would learn "
                             "nothing; give one of them a positive weight")
        return self

    def stage_recipe(self) -> Recipe:
        """The student's recipe at every stage: ``token_kd`` with the forward KL."""
        return build_recipe("token_kd", divergence="forward_kl", temperature=self.temperature,
                            kd_weight=self.kd_weight, ce_weight=self.ce_weight)


@dataclass
class LifelongTask:
    """One task of the sequence: its name, training rows and held-out rows (task ``lm``)."""

    name: str
    train: Dataset
    test: Dataset


@dataclass
class LifelongResult:
    """What :func:`l2kd` returns: the task names in order, ``scores[metric][i][j]`` (metric
    of the student after stage i on task j's held-out split, NaN for j > i), the forgetting of
    each earlier task and its mean per metric, and the final student."""

    tasks: list[str]
    scores: dict[str, list[list[float]]]
    forgetting: dict[str, list[float]]
    mean_forgetting: dict[str, float]
    student: nn.Module


StageHook = Callable[[int, LifelongTask, nn.Module, nn.Module], None]
"""Called after each stage as ``hook(stage, task, teacher, student)`` (e.g. to save them)."""


def forgetting(matrix: Sequence[Sequence[float]], higher_is_better: bool) -> list[float]:
    """The drop of each task j < K-1 from its best score before the last stage to its score
    after the last stage (module docstring); ``matrix[i][j]`` is the score after stage i."""
    last = len(matrix) - 1
    drops = []
    for j in range(last):
        earlier = [matrix[i][j] for i in range(j, last)]
        best = max(earlier) if higher_is_better else min(earlier)
        drops.append(best - matrix[last][j] if higher_is_better else matrix[last][j] - best)
    return drops


def check_tasks(tasks: Sequence[LifelongTask]) -> None:
    """Refuse an empty sequence, repeated names and empty splits, naming the task at fault."""
    if not tasks:
        raise KdistillError("tasks: give at least one task")
    seen: set[str] = set()
    for i, task in enumerate(tasks):
        if task.name in seen:
            raise KdistillError(f"tasks.{i}.name: task '{task.name}' is already the name of an "
                                "earlier task; give each task its own name")
        seen.add(task.name)
        for split in ("train", "test"):
            if len(getattr(task, split)) == 0:
                raise KdistillError(f"tasks.{i}.{split}: task '{task.name}' has no {split} rows")


def train_teacher(initial: nn.Module, task: LifelongTask, trainer: TrainerSettings) -> nn.Module:
    """A copy of ``initial`` trained by cross-entropy on ``task`` alone."""
    teacher = copy.deepcopy(initial)
    Distiller(teacher, None, "ce", trainer=trainer).fit(task.train)
    return teacher


def task_scores(model: nn.Module, tasks: Sequence[LifelongTask], seen: int,
                batch_size: int) -> dict[str, list[float]]:
    """Each metric of :data:`METRICS` on the held-out split of each task, NaN past ``seen``."""
    row: dict[str, list[float]] = {metric: [] for metric in METRICS}
    for j, task in enumerate(tasks):
        metrics = (evaluate_model(model, eval_batches(task.test, batch_size), None)
                   if j < seen else {})
        for metric in METRICS:
            row[metric].append(metrics.get(metric, math.nan))
    return row


def l2kd(student: nn.Module, tasks: Sequence[LifelongTask],
         settings: L2KDSettings | None = None, *, teacher_init: nn.Module | None = None,
         on_stage: StageHook | None = None) -> LifelongResult:
    """Train ``student`` (in place) through ``tasks`` by L2KD and measure its forgetting.

    Each task's teacher starts from a copy of ``teacher_init`` (default: the student as given,
    before stage 1: the paper's same initial model) and is trained on that task alone with
    ``settings.teacher_trainer``; the student then trains on the task with
    :meth:`L2KDSettings.stage_recipe` from that teacher (module docstring). ``on_stage`` is
    called after each stage's evaluation.
    """
    settings = settings or L2KDSettings()
    check_tasks(tasks)
    initial = copy.deepcopy(teacher_init if teacher_init is not None else student)
    teacher_trainer = settings.teacher_trainer or settings.trainer
    scores: dict[str, list[list[float]]] = {metric: [] for metric in METRICS}
    for stage, task in enumerate(tasks):
        teacher = train_teacher(initial, task, teacher_trainer)
        Distiller(student, teacher, settings.stage_recipe(),
                  trainer=settings.trainer).fit(task.train)
        row = task_scores(student, tasks, stage + 1, settings.eval_batch_size)
        for metric, values in row.items():
            scores[metric].append(values)
        if on_stage is not None:
            on_stage(stage, task, teacher, student)
    drops = {metric: forgetting(scores[metric], better) for metric, better in METRICS.items()}
    return LifelongResult(tasks=[t.name for t in tasks], scores=scores, forgetting=drops,
                          mean_forgetting={m: sum(d) / len(d) if d else math.nan
                                           for m, d in drops.items()},
                          student=student)


def describe(result: LifelongResult) -> str:
    """The forgetting matrices as text: one table per metric, a row per stage."""
    width = max(12, *(len(name) + 2 for name in result.tasks))
    lines: list[str] = []
    for metric, matrix in result.scores.items():
        lines.append(f"{metric} (rows: after stage, columns: task)")
        lines.append(" " * width + "".join(f"{name:>{width}}" for name in result.tasks))
        for name, row in zip(result.tasks, matrix, strict=True):
            lines.append(f"{name:<{width}}" + "".join(
                f"{'':>{width}}" if math.isnan(v) else f"{v:>{width}.4f}" for v in row))
        lines.append(f"mean forgetting: {result.mean_forgetting[metric]:.4f}")
    return "\n".join(lines)

