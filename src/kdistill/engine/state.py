"""What a checkpoint holds, and how a fit saves and restores it.

A checkpoint stores the student, every built recipe's modules (adapters, heads), the teacher
source's state (an EMA, trained peers), a ``keep_best`` phase's best weights, the optimizer,
the LR schedule, the RNG states, the fp16 gradient scaler, the trainer position, the history
and a description of the fit (settings, phases, batch and data sizes). A resume loads the newest
intact checkpoint (naming each damaged newer one it skips) and refuses one made by a fit that
differs in anything but :data:`RESUMABLE_SETTINGS`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.checkpoint import (
    Checkpoint,
    RunFolderError,
    atomic_save_tensors,
    load_newest,
    restore_rng,
    save_checkpoint,
)
from kdistill.engine.best import BestWeights
from kdistill.engine.nonfinite import check_finite_weights
from kdistill.engine.phases import Phase
from kdistill.settings import TrainerSettings
from kdistill.teachers import TeacherSource

POSITION = ("phase", "epoch", "batch")  # where a checkpoint resumes: the next batch to train

# Trainer settings a resume may change: they decide what is logged, shown and kept on disk and
# how fast data is loaded, not what is trained. Any other change (a new field too) is refused.
RESUMABLE_SETTINGS = frozenset({"progress", "log_every", "checkpoint_every", "keep_checkpoints",
                                "workers", "prefetch"})

logger = logging.getLogger("kdistill")

_ABSENT = object()


def fit_description(settings: TrainerSettings, phases: Sequence[Phase], global_batch: int,
                    train_samples: int | None) -> dict[str, Any]:
    """What decides the weights a fit ends with, as JSON: the trainer settings (but
    :data:`RESUMABLE_SETTINGS`), each phase (recipe, parameters, epochs, optimizer, schedule,
    ``keep_best``), the global batch size and the number of training samples (``None`` for a
    stream without a length)."""
    def dumped(value: Any) -> Any:
        return value.model_dump(mode="json") if value is not None else None

    return {"trainer": settings.model_dump(mode="json", exclude=set(RESUMABLE_SETTINGS)),
            "phases": [{"name": p.name, "recipe": p.recipe.name,
                        "params": dumped(getattr(p.recipe, "params", None)),
                        "epochs": p.epochs, "optimizer": dumped(p.optimizer),
                        "scheduler": dumped(p.scheduler), "keep_best": p.keep_best}
                       for p in phases],
            "global_batch": global_batch, "train_samples": train_samples}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [2]}`` -> ``{"a.b": 1, "c.0": 2}`` (empty containers kept)."""
    if isinstance(value, Mapping) and value:
        items: Any = value.items()
    elif isinstance(value, list | tuple) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_fields(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The dotted paths whose values differ between two JSON-like values, with the old and new
    value (a marker shown as ``(none)`` where a side lacks the path), sorted by path."""
    before, after = _flatten(old), _flatten(new)
    return [(path, before.get(path, _ABSENT), after.get(path, _ABSENT))
            for path in sorted(set(before) | set(after))
            if before.get(path, _ABSENT) != after.get(path, _ABSENT)]


def format_changes(changes: Sequence[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``trainer.optimizer.lr: 0.01 → 0.5; ...`` on one line (at most ``limit`` entries)."""
    def shown(value: Any) -> str:
        if value is _ABSENT:
            return "(none)"
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{path}: {shown(old)} → {shown(new)}" for path, old, new in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return "; ".join(parts)


@dataclass(eq=False)
class RunState:
    """The trainable state of one fit and its checkpoints in ``run_dir``.

    ``built`` holds the indices of the phases whose recipe modules exist (a recipe builds its
    shape-dependent modules on its phase's first batch); only those are saved and loaded.
    """

    student: torch.nn.Module
    phases: Sequence[Phase]
    teacher: TeacherSource | None
    settings: TrainerSettings
    run_dir: Path | None
    accelerator: Any
    best: BestWeights = field(default_factory=BestWeights)
    built: set[int] = field(default_factory=set)
    history: list[dict[str, Any]] = field(default_factory=list)
    global_step: int = 0
    description: dict[str, Any] | None = None  # see fit_description; saved with each checkpoint

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor to save, under ``student.``, ``best.``, ``recipe.<i>.`` and
        ``teacher.``."""
        tensors = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        if self.best.weights is not None:
            tensors.update({f"best.{k}": v for k, v in self.best.weights.items()})
        for i in sorted(self.built):
            tensors.update({f"recipe.{i}.{k}": v for k, v in
                            self.phases[i].recipe.state_dict().items()})
        if self.teacher is not None:
            tensors.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        return tensors

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of :meth:`weights` (the built recipes only)."""
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.student.load_state_dict(part("student."))
        self.best.weights = part("best.") or None
        for i in self.built:
            self.phases[i].recipe.load_state_dict(part(f"recipe.{i}."))
        if self.teacher is not None:
            self.teacher.load_state_dict(part("teacher."))

    def save(self, position: Mapping[str, int], optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Write a checkpoint (main process only) that resumes at ``position``; non-finite
        weights are refused (:func:`check_finite_weights`) rather than saved."""
        if self.run_dir is not None:
            check_finite_weights(self.weights(), self.global_step, "a checkpoint")
        if self.run_dir is not None and self.accelerator.is_main_process:
            scaler = self.accelerator.scaler
            save_checkpoint(self.run_dir, self.global_step, weights=self.weights(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            trainer={**position, "global_step": self.global_step,
                                     "history": self.history, "best": self.best.record,
                                     "fit": self.description,
                                     "scaler": dict(scaler.state_dict()) if scaler else None},
                            keep=self.settings.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def save_student(self) -> None:
        """Write the final student to ``<run_dir>/student.safetensors`` (weights checked)."""
        if self.run_dir is None:
            return
        check_finite_weights(self.weights(), self.global_step, "the final student")
        if self.accelerator.is_main_process:
            atomic_save_tensors(self.student.state_dict(), self.run_dir / "student.safetensors")

    def load_newest(self) -> tuple[Checkpoint, dict[str, int]]:
        """The newest intact checkpoint of ``run_dir`` and its position; restores the step
        counter, the history and the best evaluation so far.

        Each damaged newer checkpoint is named in a warning; none intact, or one made by a fit
        that differs in more than :data:`RESUMABLE_SETTINGS`, is a :class:`RunFolderError`.
        Nothing is written.
        """
        if self.run_dir is None:
            raise ValueError("resume needs a run directory")
        checkpoint, damaged = load_newest(self.run_dir)
        where = self.run_dir / "checkpoints"
        if checkpoint is None:
            if damaged:
                reasons = "; ".join(f"{d.path.name}: {d.reason}" for d in damaged)
                raise RunFolderError(f"nothing to resume in {where}: every checkpoint is "
                                     f"damaged ({reasons})")
            raise RunFolderError(f"nothing to resume: no checkpoint in {where}")
        for error in damaged:
            logger.warning("checkpoint %s is damaged (%s); resuming from %s", error.path.name,
                           error.reason, checkpoint.path.name)
        saved = checkpoint.trainer.get("fit")
        if self.description is not None and saved is not None:
            changes = changed_fields(saved, self.description)
            if changes:
                raise RunFolderError(
                    f"cannot resume {self.run_dir}: {checkpoint.path.name} was made by a fit "
                    f"with other settings ({format_changes(changes)}); a resume continues the "
                    "same run: restore them, or start a new run to train with them")
        self.global_step = int(checkpoint.trainer["global_step"])
        self.best.record = checkpoint.trainer.get("best")
        self.history = list(checkpoint.trainer["history"])
        return checkpoint, {key: int(checkpoint.trainer[key]) for key in POSITION}

    def check_weights(self, checkpoint: Checkpoint) -> None:
        """Raise :class:`RunFolderError` when the checkpoint's tensors are not those of this
        fit's models (other names or shapes: a changed model, recipe or teacher)."""
        def shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
            return {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("best.")}

        saved, now = shapes(checkpoint.weights), shapes(self.weights())
        problems = [f"{k} is not in the checkpoint" for k in sorted(set(now) - set(saved))]
        problems += [f"{k} is not in this run" for k in sorted(set(saved) - set(now))]
        problems += [f"{k} has shape {list(saved[k])} there, {list(now[k])} here"
                     for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]
        if problems:
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise RunFolderError(f"cannot resume {self.run_dir}: {checkpoint.path.name} holds "
                                 f"other models than this run ({'; '.join(problems[:5])}{more})")

    def restore(self, checkpoint: Checkpoint, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Load a checkpoint into the built phases, the optimizer, the LR schedule, the RNGs
        and the gradient scaler (last, so nothing after it draws random numbers first)."""
        self.check_weights(checkpoint)
        self.load_weights(checkpoint.weights)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        restore_rng(checkpoint.rng_tensors, checkpoint.rng_meta)
        scaler_state = checkpoint.trainer.get("scaler")
        if self.accelerator.scaler is not None and scaler_state:
            self.accelerator.scaler.load_state_dict(scaler_state)
