"""Fresh weights for an existing architecture: peers, branches and students that must not start
as copies of each other."""

from __future__ import annotations

import copy

from torch import nn


def reinitialise_(model: nn.Module) -> nn.Module:
    """Draw fresh weights for ``model`` in place and return it: every submodule that has
    ``reset_parameters`` (linear, convolution, normalisation, embedding layers) draws new ones
    from torch's global RNG; BatchNorm statistics are reset too. Parameters held by a module
    without ``reset_parameters`` keep their values."""
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    return model


def reinitialised(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with fresh weights (see :func:`reinitialise_`)."""
    return reinitialise_(copy.deepcopy(model))
