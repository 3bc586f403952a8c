"""Schedules: values (loss weights, temperatures, momenta) that change over training.

A schedule maps training progress to a number. Progress is read from :class:`TrainState` in
epochs (fractional: 2.5 is half-way through the third epoch) or in optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class TrainState:
    """Where training stands; passed to recipes, schedules and teacher sources."""

    phase: int = 0
    epoch: int = 0
    step: int = 0
    epoch_progress: float = 0.0
    steps_per_epoch: int = 1
    total_steps: int = 1

    @property
    def phase_epochs(self) -> int:
        """The number of epochs of the phase this state belongs to."""
        return max(1, self.total_steps // max(self.steps_per_epoch, 1))

    @property
    def phase_progress(self) -> float:
        """The share of the phase's optimizer steps done, in [0, 1]."""
        return min(self.epoch_progress * self.steps_per_epoch / max(self.total_steps, 1), 1.0)


class ScheduleConfig(BaseModel):
    """A value over training.

    ``constant``: ``start``. ``linear``: start + (end - start) * min(t / length, 1).
    ``cosine``: end - (end - start) * (1 + cos(pi * min(t / length, 1))) / 2, i.e. a half-cosine
    ramp from ``start`` to ``end``. ``gaussian``: start + (end - start) * exp(-5 (1 - min(t /
    length, 1))^2), the ramp-up of Laine & Aila (2017, "Temporal Ensembling for
    Semi-Supervised Learning"), used by the mean teacher's and OKDHP's official code; it starts
    at start + 0.0067 (end - start), not at ``start``. ``step``: ``values[k]`` where k is the
    number of ``boundaries`` already passed. ``t`` is counted in ``unit``: ``epochs`` (fractional),
    optimizer ``steps``, or ``phase``, the share of the phase's optimizer steps done, in
    [0, 1] (with ``length`` 1, a ramp spanning the whole phase whatever its budget).
    """

    model_config = ConfigDict(extra="forbid")

    name: Literal["constant", "linear", "cosine", "gaussian", "step"] = "constant"
    start: float = 1.0
    end: float = 1.0
    length: float = Field(default=1.0, gt=0)
    unit: Literal["epochs", "steps", "phase"] = "epochs"
    boundaries: list[float] = Field(default_factory=list)
    values: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _step_values(self) -> ScheduleConfig:
        if self.name == "step" and len(self.values) != len(self.boundaries) + 1:
            raise ValueError("a step schedule needs len(values) == len(boundaries) + 1")
        return self

    def at(self, state: TrainState) -> float:
        """The scheduled value at ``state``."""
        t = {"epochs": state.epoch_progress, "steps": float(state.step),
             "phase": state.phase_progress}[self.unit]
        if self.name == "constant":
            return self.start
        if self.name == "step":
            return self.values[sum(t >= b for b in self.boundaries)]
        fraction = min(max(t / self.length, 0.0), 1.0)
        if self.name == "linear":
            return self.start + (self.end - self.start) * fraction
        if self.name == "gaussian":
            return self.start + (self.end - self.start) * math.exp(-5.0 * (1.0 - fraction) ** 2)
        return self.end - (self.end - self.start) * (1 + math.cos(math.pi * fraction)) / 2


def constant(value: float) -> ScheduleConfig:
    """A schedule that always returns ``value``."""
    return ScheduleConfig(name="constant", start=value)


def lr_multiplier(name: str, step: int, total_steps: int, warmup_steps: int,
                  min_ratio: float = 0.0, step_size: int = 1, gamma: float = 0.1) -> float:
    """Learning-rate factor at optimizer ``step`` for the engine's LR schedules.

    ``constant``: 1 after a linear warm-up. ``linear``: warm-up, then linear decay to
    ``min_ratio``. ``cosine``: warm-up, then half-cosine decay to ``min_ratio``. ``step``:
    multiply by ``gamma`` every ``step_size`` steps after warm-up.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step":
        return gamma ** ((step - warmup_steps) // max(step_size, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if name == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if name == "cosine":
        return min_ratio + (1.0 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2
    raise ValueError(f"unknown learning-rate schedule '{name}'")
