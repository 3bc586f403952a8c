"""Optimizers and learning-rate schedules from their settings."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdistill.schedules import lr_multiplier
from kdistill.settings import OptimizerSettings, SchedulerSettings


def build_optimizer(params: Iterable[nn.Parameter],
                    settings: OptimizerSettings) -> torch.optim.Optimizer:
    """AdamW or SGD over the parameters that require gradients."""
    params = [p for p in params if p.requires_grad]
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
