"""Optimizers and learning-rate schedules from their settings.

Embeddings with sparse gradients (``nn.Embedding`` / ``nn.EmbeddingBag`` built with
``sparse=True``, such as the n-gram students' tables) need an optimizer that takes sparse
gradients: :func:`build_optimizer` gives their weights to ``torch.optim.SparseAdam`` and the
other parameters to the configured optimizer, joined in one :class:`CombinedOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from kdistill.schedules import lr_multiplier
from kdistill.settings import OptimizerSettings, SchedulerSettings


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, used as one.

    ``param_groups`` lists every inner optimizer's groups in order (the same dicts, so an LR
    schedule that sets ``group["lr"]`` reaches the inner optimizers) and ``state`` is one dict
    the inner optimizers share; ``step`` steps each of them. ``zero_grad``, ``state_dict``
    and ``load_state_dict`` are the base class's, over all the groups, so a checkpoint holds
    one ordinary optimizer state. Being a ``torch.optim.Optimizer``, it is accepted by
    ``LambdaLR``, gradient scalers and Accelerate's ``prepare``.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        if len(optimizers) < 2:
            raise ValueError("CombinedOptimizer joins at least two optimizers")
        self.optimizers = list(optimizers)
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._share()

    def _share(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after
        ``load_state_dict``, which replaces both)."""
        start = 0
        for optimizer in self.optimizers:
            count = len(optimizer.param_groups)
            optimizer.param_groups = self.param_groups[start:start + count]
            optimizer.state = self.state
            start += count

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")
        for optimizer in self.optimizers:
            optimizer.step()

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        self._share()


def sparse_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the embeddings of ``module`` that produce sparse gradients."""
    found: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag) and sub.sparse:
            found[id(sub.weight)] = sub.weight
    return list(found.values())


def build_optimizer(module: nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
    """AdamW or SGD over the parameters of ``module`` that require gradients.

    The weights of sparse embeddings (:func:`sparse_parameters`) go to
    ``torch.optim.SparseAdam`` instead, with the configured learning rate and ``betas``
    (Adam's defaults under SGD settings): a lazy Adam that moves only the rows a batch used.
    Weight decay does not apply to them (SparseAdam has none: decaying every row would make
    each update dense). With both kinds the result is a :class:`CombinedOptimizer`.
    """
    sparse = [p for p in sparse_parameters(module) if p.requires_grad]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in module.parameters() if p.requires_grad and id(p) not in sparse_ids]
    parts: list[torch.optim.Optimizer] = []
    if dense or not sparse:
        parts.append(_dense_optimizer(dense, settings))
    if sparse:
        parts.append(torch.optim.SparseAdam(sparse, lr=settings.lr, betas=settings.betas))
    return parts[0] if len(parts) == 1 else CombinedOptimizer(parts)


def _dense_optimizer(params: list[nn.Parameter],
                     settings: OptimizerSettings) -> torch.optim.Optimizer:
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, nesterov=settings.nesterov)
    return torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas,
                             weight_decay=settings.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, settings: SchedulerSettings,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate multiplier of :func:`kdistill.schedules.lr_multiplier`, stepped once
    per optimizer step."""
    def factor(step: int) -> float:
        return lr_multiplier(settings.name, step, total_steps, settings.warmup_steps,
                             settings.min_ratio, settings.step_size, settings.gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
