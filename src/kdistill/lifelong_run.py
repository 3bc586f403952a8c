"""L2KD from a YAML config: a ``student`` model, a ``tasks`` list (each a name and a language-
modelling ``data`` section, the sections of a run config) and the ``l2kd`` settings
(:class:`kdistill.lifelong.L2KDSettings`). A separate config rather than a ``tasks:`` key of
the run config: a run trains one student against one teacher on one data set (its ``phases``
change only the recipe), while L2KD trains a teacher per task and moves the student from data
set to data set; :func:`kdistill.lifelong.l2kd` does that, and this module only builds its
arguments from the config's sections with the run's own builders.

Example: examples/lm/l2kd.yaml; more in docs/lm.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from kdistill.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    invalid,
    safe_load_yaml,
    validated_sections,
)
from kdistill.data import LM_DATASETS
from kdistill.lifelong import L2KDSettings, LifelongResult, LifelongTask, check_tasks, l2kd
from kdistill.names import unknown_name
from kdistill.run import build_data, build_from
from kdistill.settings import Strict


class TaskConfig(Strict):
    """One task of the sequence: its name and its language-modelling data."""

    name: str
    data: DataConfig


class L2KDConfig(Strict):
    """An L2KD run: the student, the tasks in order, the settings; ``teacher_init`` the model
    every task's teacher starts from (default: the student as built)."""

    student: ModelConfig
    teacher_init: ModelConfig | None = None
    tasks: list[TaskConfig] = Field(min_length=1)
    l2kd: L2KDSettings = Field(default_factory=L2KDSettings)


def parse_l2kd_config(raw: Any, source: str = "config") -> L2KDConfig:
    """Validate a raw mapping; a :class:`ConfigError` lists every problem by its field."""
    config = validated_sections(raw, L2KDConfig, source)
    problems = [f"tasks.{i}.data.name: "
                f"{unknown_name('language-modelling data set', task.data.name, LM_DATASETS)}"
                for i, task in enumerate(config.tasks) if task.data.name not in LM_DATASETS]
    names = [task.name for task in config.tasks]
    problems += [f"tasks.{i}.name: task '{name}' is already the name of an earlier task; give "
                 "each task its own name" for i, name in enumerate(names) if name in names[:i]]
    if problems:
        raise invalid(source, problems)
    return config


def load_l2kd_config(path: str | Path) -> L2KDConfig:
    """Read and validate an L2KD config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return parse_l2kd_config(safe_load_yaml(path.read_text(encoding="utf-8"), str(path)),
                             str(path))


def run_l2kd_config(config: L2KDConfig) -> LifelongResult:
    """Build each task's data, the student (from the first task's data) and the teachers'
    starting model, then run :func:`kdistill.lifelong.l2kd`."""
    tasks = []
    for i, task in enumerate(config.tasks):
        try:
            splits = build_data(task.data)
        except ConfigError as error:
            raise ConfigError(f"tasks.{i}.data: {error}") from None
        tasks.append((splits, LifelongTask(task.name, splits.train, splits.test)))
    check_tasks([task for _, task in tasks])
    first = tasks[0][0]
    seed = config.l2kd.trainer.seed
    student = build_from(config.student, first, seed, "student")
    start = (None if config.teacher_init is None else
             build_from(config.teacher_init, first, seed, "teacher_init"))
    return l2kd(student, [task for _, task in tasks], config.l2kd, teacher_init=start)
