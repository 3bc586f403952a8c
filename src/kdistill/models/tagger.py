"""A small token classifier: word embeddings, a BiLSTM or 1-D convolution encoder and a
per-token linear head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class BiLSTM(nn.Module):
    """A bidirectional LSTM run on the valid prefix of each sequence only (packed), so padding
    never reaches the backward direction; output width ``2 * hidden``."""

    def __init__(self, width: int, hidden: int, layers: int):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=layers, batch_first=True,
                            bidirectional=True)
        self.width = 2 * hidden

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(dim=1).clamp_min(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out


class _Conv(nn.Module):
    """``layers`` same-length 1-D convolutions with ReLU; padded positions are zeroed before
    every convolution so that they add nothing to their neighbours."""

    def __init__(self, width: int, hidden: int, layers: int, kernel_size: int):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(width if i == 0 else hidden, hidden, kernel_size, padding=kernel_size // 2)
            for i in range(layers))
        self.width = hidden

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        keep = mask.unsqueeze(1).to(x.dtype)  # [B, 1, L]
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = torch.relu(conv(h * keep))
        return h.transpose(1, 2)


class Tagger(nn.Module):
    """Token classifier for ``input`` token ids [B, L] (id ``pad_id`` = padding, at the end).

    ``embedding`` -> ``encoder`` (BiLSTM, width 2 x ``hidden``, or a stack of 1-D convolutions
    with odd ``kernel_size``, width ``hidden``) -> ``features`` (dropout) -> ``head``, giving
    logits [B, L, C]. ``module:features`` is the per-token penultimate feature [B, L, H]. The
    model also takes the batch's ``attention_mask`` (``batch_inputs``); without one the mask is
    ``input != pad_id``. Logits at padded positions are computed but carry no meaning.
    """

    batch_inputs = ("attention_mask",)

    def __init__(self, input_shape: Sequence[int], num_classes: int, vocab_size: int = 100,
                 embed_dim: int = 32, hidden: int = 32,
                 encoder: Literal["lstm", "conv"] = "lstm", layers: int = 1,
                 kernel_size: int = 3, dropout: float = 0.0, pad_id: int = 0):
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"tagger needs token-id inputs shaped [L], got {tuple(input_shape)}")
        if encoder == "conv" and kernel_size % 2 == 0:
            raise ValueError(f"tagger: kernel_size must be odd to keep the length, got "
                             f"{kernel_size}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"tagger: pad_id {pad_id} is outside the vocabulary 0.."
                             f"{vocab_size - 1}")
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        if encoder == "lstm":
            self.encoder: nn.Module = BiLSTM(embed_dim, hidden, layers)
        elif encoder == "conv":
            self.encoder = _Conv(embed_dim, hidden, layers, kernel_size)
        else:
            raise ValueError(f"tagger: encoder must be 'lstm' or 'conv', got '{encoder}'")
        self.features = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(self.encoder.width, num_classes)

    def forward(self, input: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input.dim() != 2 or input.is_floating_point():
            raise ValueError(f"tagger: input must be integer token ids [B, L], got "
                             f"{input.dtype} of shape {tuple(input.shape)}")
        if input.numel() and (int(input.min()) < 0 or int(input.max()) >= self.vocab_size):
            raise ValueError(f"tagger: token ids must lie in 0..{self.vocab_size - 1} "
                             f"(vocab_size), got {int(input.min())}..{int(input.max())}")
        mask = input != self.pad_id if attention_mask is None else attention_mask.bool()
        if mask.shape != input.shape:
            raise ValueError(f"tagger: attention_mask {tuple(mask.shape)} does not match input "
                             f"{tuple(input.shape)}")
        encoded = self.encoder(self.embedding(input), mask)
        return self.head(self.features(encoded))
