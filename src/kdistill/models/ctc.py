"""CTC recognisers for line images read left to right, and the oracle teacher that also reads
the target sequence.

:class:`CRNN` is a convolutional recurrent network in the manner of Shi, Bai & Yao (2016), "An
End-to-End Trainable Neural Network for Image-based Sequence Recognition": convolutions over the
image, one feature vector per column (a frame), a bidirectional LSTM over the frames and one
distribution per frame over the tokens and the CTC blank (the last class).

:class:`OracleCTC` is the Oracle Teacher of Yoon, Kim, Lee, Ahn & Kim (2023), "Oracle Teacher:
Leveraging Target Information for Better Knowledge Distillation of CTC Models": the same network
given the target sequence as a second input. Each frame attends over an embedding of the
target's tokens (frames are the queries, tokens the keys and values) and the attended vector is
added to the frame before the LSTM, so the output keeps one distribution per frame of the
input; the CTC loss then asks the teacher for an alignment of the target to the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdistill.batch import UNLABELED


class BiLSTM(nn.Module):
    """A bidirectional LSTM over frames [B, T, D] giving its outputs [B, T, 2 * hidden]."""

    def __init__(self, dim: int, hidden: int, layers: int = 1):
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=layers, batch_first=True, bidirectional=True)

    def forward(self, frames: Tensor) -> Tensor:
        return self.lstm(frames)[0]


class CRNN(nn.Module):
    """Per-frame logits [B, T, C] of an image [B, C_in, H, W]; the last class is the blank.

    ``blocks``: 3x3 Conv-BN-ReLU blocks, the first at full resolution, each next one halving
    height and width; ``frames``: each column of the last feature map (channels x height)
    projected to ``dim`` (a frame); ``sequence``: a BiLSTM of ``hidden`` units per direction
    over the frames; ``head``: a linear map of each frame to the ``num_classes`` logits.
    T = ceil(W / 2^(len(channels) - 1)).

    Taps: ``module:blocks.<i>``, ``module:frames`` (frames [B, T, dim]), ``module:sequence``.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int],
                 dim: int, hidden: int, layers: int = 1):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"crnn needs line images shaped [C, H, W], got "
                             f"{tuple(input_shape)}")
        if num_classes < 2:
            raise ValueError(f"crnn needs at least one token class and the blank, got "
                             f"num_classes {num_classes}")
        blocks, width = [], input_shape[0]
        for i, size in enumerate(channels):
            blocks.append(nn.Sequential(
                nn.Conv2d(width, size, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(size), nn.ReLU()))
            width = size
        self.blocks = nn.Sequential(*blocks)
        height = input_shape[1]
        for _ in channels[1:]:
            height = (height + 1) // 2
        self.num_classes = num_classes
        self.frames = nn.Linear(width * height, dim)
        self.sequence = BiLSTM(dim, hidden, layers)
        self.head = nn.Linear(2 * hidden, num_classes)

    @property
    def blank(self) -> int:
        """The class of the CTC blank: the last one."""
        return self.num_classes - 1

    def encode(self, images: Tensor) -> Tensor:
        """The frames [B, T, dim] of ``images``: one per column of the last feature map."""
        maps = self.blocks(images)  # [B, channels, height, T]
        return self.frames(maps.permute(0, 3, 1, 2).flatten(2))

    def decode(self, frames: Tensor) -> Tensor:
        """Per-frame logits [B, T, num_classes] of ``frames``."""
        return self.head(self.sequence(frames))

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


class OracleCTC(CRNN):
    """A :class:`CRNN` that also reads the target sequence: the Oracle Teacher for CTC.

    Forward ``(images, labels)``: frames ``f`` [B, T, D] as in the CRNN; the target's tokens
    (``labels`` [B, S], ids 0 .. C - 2, padded with ``UNLABELED``) are embedded by
    ``targets`` [C, D], and ``f + MHA(q=f, k=e, v=e)`` goes on to the BiLSTM and the head.
    The keys are the target's tokens plus one learned *null* key (the blank's row of
    ``targets``), always present, which a frame showing no token can attend to and which is
    all a row without a known target (or a call without ``labels``) has.

    The tokens carry no position: attention is the same whatever their order, so the teacher
    learns from the target which tokens the line holds and how many times, and must take
    their order, and so the alignment, from the image. It cannot copy the target sequence
    onto the first frames (a valid CTC path of the target whatever the image), which it could
    with positions; that is the trivial solution the paper guards against.

    ``batch_inputs = ("labels",)`` makes :func:`kdistill.taps.run_model` pass the batch's
    labels; a student without the attribute never sees them. Taps as for :class:`CRNN`, plus
    ``module:attend``.
    """

    batch_inputs = ("labels",)

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int],
                 dim: int, hidden: int, layers: int = 1, heads: int = 1):
        super().__init__(input_shape, num_classes, channels, dim, hidden, layers)
        if dim % heads:
            raise ValueError(f"oracle_ctc: dim {dim} must be a multiple of heads {heads}")
        self.targets = nn.Embedding(num_classes, dim)
        self.attend = nn.MultiheadAttention(dim, heads, batch_first=True)

    def keys(self, labels: Tensor | None, rows: int) -> tuple[Tensor, Tensor]:
        """The key ids [B, 1 + S] (the null key first, padding mapped to it) and the mask of
        the keys to ignore [B, 1 + S] (padding) for ``labels`` [B, S] (None: null key only)."""
        device = self.targets.weight.device
        null = torch.full((rows, 1), self.blank, dtype=torch.long, device=device)
        if labels is None:
            return null, torch.zeros_like(null, dtype=torch.bool)
        if labels.dim() != 2 or labels.shape[0] != rows or labels.is_floating_point():
            raise ValueError(f"oracle_ctc: labels must be integer target sequences [{rows}, "
                             f"tokens] (padded with {UNLABELED}), got {labels.dtype} of shape "
                             f"{tuple(labels.shape)}")
        labels = labels.to(device).long()
        padding = labels == UNLABELED
        bad = ~padding & ((labels < 0) | (labels >= self.blank))
        if bad.any():
            raise ValueError(f"oracle_ctc: target tokens must be in 0 .. {self.blank - 1} or "
                             f"{UNLABELED} (padding), got {int(labels[bad][0])}")
        ids = torch.cat([null, labels.masked_fill(padding, self.blank)], dim=1)
        return ids, torch.cat([torch.zeros_like(null, dtype=torch.bool), padding], dim=1)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        frames = self.encode(images)
        ids, ignored = self.keys(labels, frames.shape[0])
        tokens = self.targets(ids)
        attended, _ = self.attend(frames, tokens, tokens, key_padding_mask=ignored,
                                  need_weights=False)
        return self.decode(frames + attended)
