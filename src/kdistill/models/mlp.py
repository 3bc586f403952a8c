"""A multilayer perceptron classifier for flat or image inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """``features`` (flatten, then Linear + ReLU blocks) followed by a linear ``head``.

    The penultimate features are the tap ``module:features``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int],
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
