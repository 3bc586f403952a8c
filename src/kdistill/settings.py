"""Typed training settings shared by the engine (Python API) and the YAML configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

CACHE_ENV = "KDISTILL_CACHE"


def cache_dir() -> Path:
    """Where kdistill keeps what it makes once and reuses (trained teachers, converted models):
    ``$KDISTILL_CACHE`` or ``./.kdistill-cache``."""
    return Path(os.environ.get(CACHE_ENV, ".kdistill-cache"))


Beta = Annotated[float, Field(ge=0, lt=1)]  # an AdamW moment decay

# Seeds reach numpy's legacy seeding and scikit-learn's ``random_state`` (both 0 .. 2**32 - 1);
# a larger or negative seed would pass validation and fail inside them.
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]

# Thread counts reach torch and the BLAS libraries, which try to start that many threads (and
# fail far from the config with 100,000). More threads than cores only slow these models down.
MAX_THREADS = 1024
Threads = Annotated[int, Field(ge=1, le=MAX_THREADS)]

# Data-loading worker processes: each is a fork of the trainer holding a copy of its state.
MAX_WORKERS = 256

# A run's name is the name of its folder under the output folder: no path separators.
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

# Distribution shifts of test images (kdistill.data.shifts) and their severity scale.
Shift = Literal["noise", "blur", "contrast", "rotation"]
SHIFTS: tuple[Shift, ...] = get_args(Shift)
MAX_SEVERITY = 5.0


class Strict(BaseModel):
    """Base for settings: unknown keys are errors, values are checked on assignment, types are
    strict (``epochs: true`` or ``epochs: 2.0`` is not an integer, ``progress: 1`` not a
    boolean; an integer is a valid float) and floats must be finite (no ``.nan``/``.inf``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)


class OptimizerSettings(Strict):
    """``adamw`` (torch.optim.AdamW) or ``sgd`` (torch.optim.SGD with momentum)."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    # A YAML list is a fine pair: only the container is lax, the two numbers stay strict.
    betas: tuple[Beta, Beta] = Field(default=(0.9, 0.999), strict=False)
    nesterov: bool = False


class SchedulerSettings(Strict):
    """Learning-rate schedule per optimizer step; see :func:`kdistill.schedules.lr_multiplier`."""

    name: Literal["constant", "linear", "cosine", "step"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_ratio: float = Field(default=0.0, ge=0, le=1)
    step_size: int = Field(default=1, ge=1)
    gamma: float = Field(default=0.1, gt=0)


class TrainerSettings(Strict):
    """How the engine trains: budget, batching, optimisation, checkpoints and logging.

    ``batch_size`` is the micro-batch one process sees; the global batch of one optimizer step
    is ``batch_size * accumulation * processes``.

    Data loading (:mod:`kdistill.engine.feed`): ``workers`` processes read and collate
    micro-batches ahead of training, each ``prefetch`` micro-batches ahead (0 workers: the
    training process loads each micro-batch when its step starts). Which samples form which
    batch is drawn in the training process, so these settings change speed, never the batches.

    A training stream (an ``IterableDataset``) is read from its start each epoch, through a
    seeded buffer of ``shuffle_buffer`` samples (0: the stream's own order); an epoch is
    ``steps_per_epoch`` optimizer steps, which a stream without a length, or a labelled-only
    recipe on a stream, needs (with a length, an epoch is one pass over it, as for a data set).
    """

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    accumulation: int = Field(default=1, ge=1)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    clip_grad_norm: float | None = Field(default=None, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: Seed = 0
    checkpoint_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=1, ge=1)  # epochs between evaluations and checkpoints
    log_every: int = Field(default=1, ge=1)
    # A step whose loss or gradients are NaN/inf applies no update and either stops the run
    # (NonFiniteError) or is skipped and logged (10 in a row stop the run); see engine/loop.py.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress: bool = True
    cpu: bool = False
    workers: int = Field(default=0, ge=0, le=MAX_WORKERS)
    prefetch: int = Field(default=2, ge=1)
    shuffle_buffer: int = Field(default=0, ge=0)
    steps_per_epoch: int | None = Field(default=None, ge=1)
