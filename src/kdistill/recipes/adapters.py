"""Adapters: trainable maps from a student feature to the teacher feature's shape.

Created on the first batch, when both shapes are known; they belong to the recipe, so they are
optimised and checkpointed with the student.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from kdistill.names import unknown_name

AdapterKind = Literal["linear", "conv1x1", "none"]


class LastDimLinear(nn.Linear):
    """``nn.Linear`` on the last dimension of features shaped [..., d_s] (tokens included)."""


def make_adapter(kind: AdapterKind, student: torch.Tensor, teacher: torch.Tensor,
                 where: str = "adapter") -> nn.Module:
    """An adapter taking ``student``-shaped features to ``teacher``'s shape.

    ``linear``: d_s -> d_t on the last dimension. ``conv1x1``: a 1x1 convolution C_s -> C_t on
    [B, C, H, W] maps (spatial sizes must match). ``none``: identity, shapes must already agree.
    """
    s_shape, t_shape = tuple(student.shape), tuple(teacher.shape)
    if kind == "none":
        if s_shape != t_shape:
            raise ValueError(f"{where}: adapter 'none' needs equal shapes, student {s_shape} vs "
                             f"teacher {t_shape}; use adapter 'linear' or 'conv1x1'")
        return nn.Identity()
    if kind == "linear":
        if s_shape[:-1] != t_shape[:-1]:
            raise ValueError(f"{where}: adapter 'linear' maps the last dimension only; student "
                             f"{s_shape} and teacher {t_shape} differ elsewhere")
        layer: nn.Module = LastDimLinear(s_shape[-1], t_shape[-1])
    elif kind == "conv1x1":
        if student.dim() != 4 or teacher.dim() != 4 or s_shape[2:] != t_shape[2:]:
            raise ValueError(f"{where}: adapter 'conv1x1' needs [B, C, H, W] maps of equal H, W; "
                             f"student {s_shape}, teacher {t_shape}")
        layer = nn.Conv2d(s_shape[1], t_shape[1], kernel_size=1)
    else:
        raise ValueError(f"{where}: " + unknown_name("adapter", kind, get_args(AdapterKind)))
    return layer.to(device=student.device, dtype=student.dtype)
