"""One optimizer step over a global batch, normalised exactly over the whole global batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdistill.batch import to_device
from kdistill.batching import process_micro_batches, unit_counts
from kdistill.engine.training_module import TOTAL, TrainingModule
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings
from kdistill.teachers import TeacherSource


@dataclass(eq=False)
class OptimizerStep:
    """Runs one optimizer step of a global batch on this process.

    1. takes this process's micro-batches of the global batch
       (:func:`~kdistill.batching.process_micro_batches`);
    2. counts each loss unit (examples, labelled examples, tokens, token pairs) over the whole
       global batch, across processes;
    3. for every micro-batch: the recipe's ``prepare``, teacher taps, the training module's
       ``sum_k w_k * value_k * local_count_k / global_count_k`` backpropagated (gradients are
       synchronised across processes on the last micro-batch only);
    4. unscales (fp16), clips, steps the optimizer and the LR schedule.

    Returns each term's mean over the global batch (this process's share) and the learning
    rate the update used.
    """

    accelerator: Any
    dataset: Dataset
    collate_fn: Callable
    teacher: TeacherSource | None
    settings: TrainerSettings

    def __call__(self, wrapped: nn.Module, module: TrainingModule, global_batch: list[int],
                 state: TrainState, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR
                 ) -> tuple[dict[str, torch.Tensor], float]:
        world = self.accelerator.num_processes
        chunks = process_micro_batches(global_batch, world, self.accelerator.process_index,
                                       self.settings.accumulation)
        micro = [self.collate_fn([self.dataset[i] for i in chunk]) for chunk in chunks]
        scales = self.unit_scales(micro)
        reported: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro):
            loss, terms = self.backward(wrapped, module, batch, state, scales[j],
                                        last=j == len(micro) - 1)
            for name, value in {**terms, TOTAL: loss.detach()}.items():
                reported[name] = reported.get(name, 0.0) + value / world
        return reported, self.update(module, optimizer, scheduler)

    def unit_scales(self, micro: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        """Per micro-batch and unit: local count / global count x processes (0 when the global
        batch holds no unit of that kind)."""
        local = [unit_counts(batch) for batch in micro]
        units = sorted(local[0])
        totals = torch.tensor([[sum(c[u] for c in local) for u in units]], dtype=torch.float64,
                              device=self.accelerator.device)
        counts = dict(zip(units, self.accelerator.reduce(totals, "sum")[0].tolist(),
                          strict=True))
        world = self.accelerator.num_processes
        return [{u: (c[u] / counts[u] * world) if counts[u] else 0.0 for u in units}
                for c in local]

    def backward(self, wrapped: nn.Module, module: TrainingModule, batch: Mapping[str, Any],
                 state: TrainState, scales: Mapping[str, float], last: bool
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; gradients sync on the ``last`` one only."""
        recipe = module.recipe
        batch = recipe.prepare(to_device(batch, self.accelerator.device), module.reader, state)
        teacher = self.teacher(batch) if recipe.uses_teacher and module.source is None else None
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(wrapped)
        with sync:
            loss, terms = wrapped(batch, teacher, state, scales)
            self.accelerator.backward(loss)
        return loss, terms

    def update(self, module: TrainingModule, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
        """Unscale (fp16), clip, step; returns the learning rate this update used."""
        scaler = self.accelerator.scaler  # fp16 on a GPU: backward scaled the loss
        if scaler is not None:
            scaler.unscale_(optimizer)  # true gradients for clipping and the update
        if self.settings.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(module.parameters(), self.settings.clip_grad_norm)
        lr = float(optimizer.param_groups[0]["lr"])
        if scaler is not None:
            scaler.step(optimizer)  # skipped when a gradient overflowed
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return lr
