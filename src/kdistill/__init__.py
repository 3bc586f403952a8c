"""kdistill: distil a large teacher model into a small, fast student.

Heavy imports (torch, transformers) happen on first use of an attribute, so the command line
starts fast: ``from kdistill import losses, Distiller, distill``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Distiller": ("kdistill.engine", "Distiller"),
    "Phase": ("kdistill.engine", "Phase"),
    "FitResult": ("kdistill.engine", "FitResult"),
    "distill": ("kdistill.engine", "distill"),
    "Taps": ("kdistill.taps", "Taps"),
    "TapReader": ("kdistill.taps", "TapReader"),
    "FrozenTeacher": ("kdistill.teachers", "FrozenTeacher"),
    "EnsembleTeacher": ("kdistill.teachers", "EnsembleTeacher"),
    "EMATeacher": ("kdistill.teachers", "EMATeacher"),
    "TrainerSettings": ("kdistill.settings", "TrainerSettings"),
    "TeacherCache": ("kdistill.cache", "TeacherCache"),
    "CachedTeacher": ("kdistill.cache", "CachedTeacher"),
}
_SUBMODULES = {"losses", "recipes", "models", "data", "evaluate", "report", "schedules",
               "teachers", "taps", "engine", "config", "cache"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"kdistill.{name}")
    raise AttributeError(f"module 'kdistill' has no attribute '{name}'")
