"""Context managers that set a piece of torch state for a block and restore it afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every submodule of ``models`` in eval mode, then restore each one's own mode.

    Each root is restored through ``train()`` so that a model overriding it still sees the call;
    the per-module pass then keeps mixed modes (e.g. a frozen norm layer left in eval mode).
    """
    modes = [[(module, module.training) for module in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, model_modes in zip(models, modes, strict=True):
            model.train(model_modes[0][1])
            for module, training in model_modes:
                module.training = training


@contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(threads)`` (``None``: leave the count as it is),
    restoring the previous count afterwards."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
