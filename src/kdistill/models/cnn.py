"""A small convolutional classifier for images shaped [C, H, W]."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class CNN(nn.Module):
    """Conv-BN-ReLU blocks (``blocks``; each after the first halves the resolution), global
    average pooling (``features`` ends there) and a linear ``head``.

    Taps: ``module:blocks.<i>`` for each block's feature map, ``module:features`` for the pooled
    penultimate features.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int],
                 dropout: float = 0.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image inputs shaped [C, H, W], got {tuple(input_shape)}")
        blocks = []
        width = input_shape[0]
        for i, size in enumerate(channels):
            blocks.append(nn.Sequential(
                nn.Conv2d(width, size, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(size),
                nn.ReLU(),
            ))
            width = size
        self.blocks = nn.Sequential(*blocks)
        self.features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Dropout(dropout) if dropout else nn.Identity())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.blocks(x)))
