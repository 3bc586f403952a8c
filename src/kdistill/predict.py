"""Predictions of a text model on new texts (``kdistill predict RUN_DIR TEXT``).

Texts are read as a data set's are: whole strings for classification and regression, words
split at whitespace for token classification. A run's exported student and the meaning of its
outputs come from :func:`kdistill.models.export.load_run_student`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdistill.contexts import eval_mode
from kdistill.errors import KdistillError
from kdistill.models.export import OutputMeaning
from kdistill.models.text import TextModel


@dataclass
class Prediction:
    """One text's prediction: the label (or score) and, for classes, every probability; for
    token classification one label per word."""

    text: str
    label: str | float | list[str]
    probabilities: dict[str, float] | None = None


def _name(index: int, names: Sequence[str] | None) -> str:
    return names[index] if names is not None and index < len(names) else str(index)


def predict_texts(model: TextModel, texts: Sequence[str], meaning: OutputMeaning,
                  batch_size: int = 64) -> list[Prediction]:
    """``model``'s prediction for each of ``texts``, in order (eval mode, no gradients).
    A sentence encoder (task ``embedding``) predicts no label and is refused."""
    if meaning.task == "embedding":
        raise KdistillError("this run's student is a sentence encoder: it gives embeddings, not "
                            "labels; load it with kdistill.models.export.load_run_student and "
                            "call it on a list of texts (its 'sentence_embedding')")
    tagging = meaning.task == "token_classification"
    predictions = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            inputs: list[Any] = [t.split() for t in chunk] if tagging else chunk
            logits = model(inputs)["logits"].float()
            predictions += [_prediction(text, row, meaning, len(words))
                            for text, row, words in zip(chunk, logits, inputs, strict=True)]
    return predictions


def _prediction(text: str, logits: torch.Tensor, meaning: OutputMeaning,
                words: int) -> Prediction:
    names = meaning.label_names
    if meaning.task == "regression":
        mean, std = meaning.target_scale or (0.0, 1.0)
        return Prediction(text, float(logits.reshape(-1)[0]) * std + mean)
    if meaning.task == "token_classification":
        return Prediction(text, [_name(int(i), names) for i in logits[:words].argmax(-1)])
    probs = logits.softmax(-1)
    return Prediction(text, _name(int(probs.argmax()), names),
                      {_name(i, names): float(p) for i, p in enumerate(probs)})
