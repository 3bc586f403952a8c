"""What a checkpoint holds, and how a fit saves and restores it.

A checkpoint stores the student, every built recipe's modules (adapters, heads), the teacher
source's state (an EMA, trained peers), a ``keep_best`` phase's best weights, the optimizer,
the LR schedule, the RNG states, the fp16 gradient scaler, the trainer position and the history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdistill.checkpoint import (
    Checkpoint,
    atomic_save_tensors,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from kdistill.engine.best import BestWeights
from kdistill.engine.nonfinite import check_finite_weights
from kdistill.engine.phases import Phase
from kdistill.settings import TrainerSettings
from kdistill.teachers import TeacherSource

POSITION = ("phase", "epoch", "batch")  # where a checkpoint resumes: the next batch to train


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

    def load_latest(self) -> tuple[Checkpoint, dict[str, int]]:
        """The newest checkpoint of ``run_dir`` and its position; restores the step counter,
        the history and the best evaluation so far."""
        if self.run_dir is None:
            raise ValueError("resume needs a run directory")
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint in "
                                    f"{self.run_dir / 'checkpoints'}")
        checkpoint = load_checkpoint(path)
        self.global_step = int(checkpoint.trainer["global_step"])
        self.best.record = checkpoint.trainer.get("best")
        self.history = list(checkpoint.trainer["history"])
        return checkpoint, {key: int(checkpoint.trainer[key]) for key in POSITION}

    def restore(self, checkpoint: Checkpoint, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        """Load a checkpoint into the built phases, the optimizer, the LR schedule, the RNGs
        and the gradient scaler (last, so nothing after it draws random numbers first)."""
        self.load_weights(checkpoint.weights)
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        restore_rng(checkpoint.rng_tensors, checkpoint.rng_meta)
        scaler_state = checkpoint.trainer.get("scaler")
        if self.accelerator.scaler is not None and scaler_state:
            self.accelerator.scaler.load_state_dict(scaler_state)
