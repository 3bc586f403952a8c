"""Reference models and the model registry."""

from kdistill.models.registry import MODEL_SIZES, MODELS, build_model

__all__ = ["MODELS", "MODEL_SIZES", "build_model"]
