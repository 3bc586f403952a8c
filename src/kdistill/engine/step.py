"""One optimizer step over a global batch, normalised exactly over the whole global batch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdistill.batch import to_device
from kdistill.batching import unit_counts, unit_scales
from kdistill.engine.training_module import TOTAL, TrainingModule
from kdistill.schedules import TrainState
from kdistill.settings import TrainerSettings
from kdistill.teachers import TeacherSource


@dataclass
class StepOutcome:
    """What one optimizer step did.

    ``terms`` holds each term's mean over the global batch (all processes) and the weighted
    total ``loss``; ``lr`` is the learning rate of the step. ``nonfinite_terms`` names the
    terms that were NaN or infinite; ``nonfinite_gradients`` says the total gradient norm was,
    and ``nonfinite_parameters`` names the parameters whose gradient holds a NaN or an infinity
    (none when finite but huge gradients overflowed the norm). A step with a non-finite term
    or gradient norm applied no update.
    """

    terms: dict[str, float]
    lr: float
    nonfinite_terms: list[str] = field(default_factory=list)
    nonfinite_gradients: bool = False
    nonfinite_parameters: list[str] = field(default_factory=list)

    @property
    def applied(self) -> bool:
        """Whether the optimizer updated the weights (every term and gradient was finite)."""
        return not (self.nonfinite_terms or self.nonfinite_gradients)


@dataclass(eq=False)
class OptimizerStep:
    """Runs one optimizer step of a global batch on this process.

    1. receives this process's micro-batches of the global batch
       (:func:`~kdistill.batching.process_micro_batches`), collated by the phase's loader
       (:mod:`kdistill.engine.feed`);
    2. counts each loss unit (examples, labelled examples, tokens, token pairs) over the whole
       global batch, across processes;
    3. the recipe's ``prepare`` of every micro-batch, before the units are counted: a prepared
       batch may hold other tokens than the data's (``gkd`` samples completions, ``seqkd``
       reads the teacher's), and the counts are those of the batches the models read;
    4. for every micro-batch: teacher taps, the training module's
       ``sum_k w_k * value_k * local_count_k / global_count_k`` backpropagated (gradients are
       synchronised across processes on the last micro-batch only);
    5. unscales (fp16) and checks in one test that every term and the total gradient norm are
       finite, agreed across processes (one all-reduce of the term values and the norm, which
       also gives the record its global means, and one transfer to the host);
    6. clips, steps the optimizer and the LR schedule.

    A non-finite term or gradient applies no update: the gradients are dropped (with
    ``on_nonfinite: skip`` the buffers, e.g. BatchNorm statistics, are put back as they were
    before the step's forward passes) and the LR schedule still advances (like the recipes'
    weight schedules it follows the position in the phase); what to do next is the loop's
    decision (``TrainerSettings.on_nonfinite``).
    Under fp16 loss scaling, gradients that overflow while every term is finite are left to
    the gradient scaler, which skips that update and lowers its scale.
    """

    accelerator: Any
    teacher: TeacherSource | None
    settings: TrainerSettings

    def __call__(self, wrapped: nn.Module, module: TrainingModule,
                 micro: Sequence[Mapping[str, Any]], state: TrainState,
                 optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR) -> StepOutcome:
        # A skipped step must leave no trace: keep the buffers (BatchNorm statistics) its
        # forward passes update.
        buffers = [b.detach().clone() for b in module.buffers()] \
            if self.settings.on_nonfinite == "skip" else None
        device = self.accelerator.device
        micro = [module.recipe.prepare(to_device(batch, device), module.reader, state)
                 for batch in micro]
        scales = self.unit_scales(micro)
        reported: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro):
            loss, terms = self.backward(wrapped, module, batch, state, scales[j],
                                        last=j == len(micro) - 1)
            for name, value in {**terms, TOTAL: loss.detach()}.items():
                reported[name] = reported.get(name, 0.0) + value / self.accelerator.num_processes
        scaler = self.accelerator.scaler  # fp16 on a GPU: backward scaled the loss
        if scaler is not None:
            scaler.unscale_(optimizer)  # true gradients for the check, clipping and the update
        outcome = self.outcome(module, reported, float(optimizer.param_groups[0]["lr"]))
        if outcome.applied:
            self.update(module, optimizer)
        else:
            self.discard(module, optimizer, buffers)
        scheduler.step()
        return outcome

    def outcome(self, module: TrainingModule, reported: Mapping[str, torch.Tensor],
                lr: float) -> StepOutcome:
        """The terms' global means and whether every term and the gradient norm are finite:
        one all-reduce of the term values and the norm, agreed by every process."""
        names = sorted(reported)
        device = self.accelerator.device
        norm = gradient_norm([p.grad for p in module.parameters() if p.grad is not None])
        values = torch.stack([*(torch.as_tensor(reported[n], dtype=torch.float64, device=device)
                                for n in names), norm.to(device, torch.float64)])
        # Summed over processes: any process's NaN or inf makes the sum non-finite everywhere.
        totals = self.accelerator.reduce(values, "sum").tolist()
        outcome = StepOutcome(dict(zip(names, totals[:-1], strict=True)), lr)
        outcome.nonfinite_terms = [n for n in names if not math.isfinite(outcome.terms[n])]
        scaler = self.accelerator.scaler
        if not math.isfinite(totals[-1]) and (scaler is None or outcome.nonfinite_terms):
            outcome.nonfinite_gradients = True
            outcome.nonfinite_parameters = nonfinite_gradients(module)
        return outcome

    def discard(self, module: TrainingModule, optimizer: torch.optim.Optimizer,
                buffers: Sequence[torch.Tensor] | None) -> None:
        """Drop a non-finite step: its gradients, and its buffer updates when kept."""
        optimizer.zero_grad(set_to_none=True)
        if buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(module.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()  # ends this step's unscale; the scale drops

    def unit_scales(self, micro: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
        """Per micro-batch and unit: local count / global count x processes (0 when the global
        batch holds no unit of that kind)."""
        totals = global_unit_counts(micro, self.accelerator)
        return [unit_scales(unit_counts(batch), totals, self.accelerator.num_processes)
                for batch in micro]

    def backward(self, wrapped: nn.Module, module: TrainingModule, batch: Mapping[str, Any],
                 state: TrainState, scales: Mapping[str, float], last: bool
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one prepared micro-batch; gradients sync on the ``last``
        one only. A recipe that reads no teacher taps (``seqkd``) costs no teacher forward."""
        recipe = module.recipe
        asks = recipe.uses_teacher and module.source is None and bool(recipe.teacher_taps())
        teacher = self.teacher(batch) if asks else None
        sync = contextlib.nullcontext() if last else self.accelerator.no_sync(wrapped)
        with sync:
            loss, terms = wrapped(batch, teacher, state, scales)
            self.accelerator.backward(loss)
        return loss, terms

    def update(self, module: TrainingModule, optimizer: torch.optim.Optimizer) -> None:
        """Clip the (unscaled) gradients, step the optimizer and drop the gradients."""
        if self.settings.clip_grad_norm:
            clip_gradients([p.grad for p in module.parameters() if p.grad is not None],
                           self.settings.clip_grad_norm)
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.step(optimizer)  # skipped when a gradient overflowed
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _entries(grad: torch.Tensor) -> torch.Tensor:
    """The values of a gradient: itself, or for a sparse gradient (embeddings built with
    ``sparse=True``) its coalesced values, so repeated rows are summed before any norm."""
    return grad.coalesce().values() if grad.is_sparse else grad


def global_unit_counts(micro: Sequence[Mapping[str, Any]], accelerator: Any) -> dict[str, float]:
    """Each loss unit's count (:func:`~kdistill.batching.unit_counts`) over this process's
    ``micro``-batches of a global batch and those of every other process (one all-reduce)."""
    local = [unit_counts(batch) for batch in micro]
    units = sorted(local[0])
    totals = torch.tensor([[sum(c[u] for c in local) for u in units]], dtype=torch.float64,
                          device=accelerator.device)
    return dict(zip(units, accelerator.reduce(totals, "sum")[0].tolist(), strict=True))


def gradient_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The total L2 norm of ``grads`` (dense or sparse), leaving them as they are: one fused
    norm kernel over the list, then the norm of the per-tensor norms."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm([_entries(g) for g in grads])
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def clip_gradients(grads: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale ``grads`` in place by ``min(1, max_norm / (norm + 1e-6))`` so that their total
    L2 norm is at most ``max_norm`` (what ``torch.nn.utils.clip_grad_norm_`` does, which
    refuses sparse gradients); returns the norm before clipping."""
    norm = gradient_norm(grads)
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(factor.to(grad.device, grad.dtype))
    return norm


def nonfinite_gradients(module: nn.Module) -> list[str]:
    """The names of the parameters of ``module`` whose gradient holds a NaN or an infinity."""
    return [name for name, p in module.named_parameters()
            if p.grad is not None and not bool(torch.isfinite(_entries(p.grad)).all())]
