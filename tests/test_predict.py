"""Predictions of a text model on new texts: labels, probabilities, regression scores on the
raw scale, one tag per word."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from kdistill.models.export import OutputMeaning
from kdistill.models.text import WORD_STARTS, TextModel
from kdistill.predict import predict_texts


class LengthEncoder:
    """Each text's word count as its one feature; word lists get one position per word."""

    tokenisation = "lengths"

    def __call__(self, texts: Sequence) -> dict[str, Tensor]:
        if texts and isinstance(texts[0], list):
            width = max(len(words) for words in texts)
            positions = torch.arange(width, dtype=torch.float32)
            return {"x": positions.expand(len(texts), width).unsqueeze(-1).clone(),
                    WORD_STARTS: torch.arange(width).expand(len(texts), width).clone()}
        return {"x": torch.tensor([[float(len(t.split()))] for t in texts])}

    def save(self, folder: Path) -> None:
        raise NotImplementedError


class Affine(nn.Module):
    def __init__(self, weight: list[float], bias: list[float]):
        super().__init__()
        self.layer = nn.Linear(1, len(weight))
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor(weight).unsqueeze(1))
            self.layer.bias.copy_(torch.tensor(bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def test_classes_are_named_with_every_probability() -> None:
    model = TextModel(LengthEncoder(), Affine([-1.0, 1.0], [2.0, -2.0]))  # long text: class 1
    short, long = predict_texts(model, ["one", "one two three four"],
                                OutputMeaning("classification", ["short", "long"]))
    assert short.label == "short" and long.label == "long"
    logits = torch.tensor([-4.0 + 2.0, 4.0 - 2.0])
    assert long.probabilities == pytest.approx(dict(zip(["short", "long"],
                                                        logits.softmax(0).tolist(), strict=True)))


def test_classes_without_names_are_their_ids() -> None:
    model = TextModel(LengthEncoder(), Affine([-1.0, 1.0], [2.0, -2.0]))
    [only] = predict_texts(model, ["a b c d e"], OutputMeaning("classification"))
    assert only.label == "1" and set(only.probabilities) == {"0", "1"}


def test_regression_scores_are_put_back_on_the_raw_scale() -> None:
    model = TextModel(LengthEncoder(), Affine([0.5], [0.0]))  # standardised score: 0.5 * words
    [score] = predict_texts(model, ["a b c d"], OutputMeaning("regression", None, (10.0, 4.0)))
    assert score.label == pytest.approx(2.0 * 4.0 + 10.0) and score.probabilities is None


def test_tagging_gives_one_tag_per_word_of_each_text() -> None:
    model = TextModel(LengthEncoder(), Affine([1.0, -1.0], [-1.5, 1.5]))  # position > 1.5: O
    texts = ["New York is big", "Paris"]
    first, second = predict_texts(model, texts,
                                  OutputMeaning("token_classification", ["O", "LOC"]),
                                  batch_size=1)
    assert first.label == ["LOC", "LOC", "O", "O"] and second.label == ["LOC"]
