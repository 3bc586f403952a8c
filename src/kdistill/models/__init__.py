"""Reference models and the model registry."""

from torch import nn

from kdistill.models.registry import MODEL_SIZES, MODELS, build_model


def deployable(model: nn.Module) -> nn.Module:
    """The model to ship: ``model.export()`` for a training wrapper that defines it (e.g. a
    student with an extra distillation head), otherwise ``model`` itself."""
    export = getattr(model, "export", None)
    return export() if callable(export) else model


__all__ = ["MODELS", "MODEL_SIZES", "build_model", "deployable"]
