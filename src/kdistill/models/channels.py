"""Token classifiers on intermediate layers ("channels") beside a transformer tagger's own.

:class:`ChannelModel` wraps a token-classification :class:`~kdistill.models.text.TextModel` of a
transformers network: one new linear classifier per chosen hidden state (after dropout), read
per word at each word's first token, as the tagger's own classifier is. Its output is the
tagger's (``logits`` from the final classifier) plus ``heads`` [1 + K, B, W, C]: head 0 the
final classifier, heads 1..K the channels in the order of ``layers``. The channels serve
training only (MSD, :mod:`kdistill.recipes.msd`); :meth:`ChannelModel.export` returns the
tagger itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdistill.models.text import WORD_STARTS, RawText, per_word


def transformer_sizes(model: nn.Module, where: str) -> tuple[int, int, int]:
    """``(hidden_size, num_hidden_layers, num_labels)`` of a text model's transformers network
    (read from its config); ``ValueError`` naming ``where`` for any other model."""
    config = getattr(getattr(model, "model", None), "config", None)
    sizes = [getattr(config, key, None) for key in
             ("hidden_size", "num_hidden_layers", "num_labels")]
    if not getattr(model, "accepts_output_flags", False) or \
            not all(isinstance(s, int) for s in sizes):
        raise ValueError(f"{where}: {type(model).__name__} is not a text model of a "
                         "transformers network (hf_text, hf_student); channels read its "
                         "hidden states and its config's hidden_size, num_hidden_layers and "
                         "num_labels")
    return sizes[0], sizes[1], sizes[2]


def default_channel_layers(layers: int) -> list[int]:
    """The hidden states that get a channel by default: layers round(L/3) .. L-1 (at least
    layer 1; the final layer L keeps the model's own classifier). For L = 12 these are layers
    4-11, MSD's eight channels on mBERT."""
    return list(range(max(1, round(layers / 3)), layers))


class ChannelModel(nn.Module):
    """``model`` (a token-classification text model) with a classifier on each hidden state of
    ``layers`` (indices 1..L-1 of ``hidden_states``; 0 would be the embeddings).

    Channel k gives z_k = W_k dropout(h_{layers[k]}) + b_k at each word's first token. The
    classifiers are new ``nn.Linear(hidden_size, num_labels)`` layers drawn from torch's
    global RNG. ``dropout`` applies to the hidden states before the channel classifiers.
    """

    accepts_output_flags = True

    def __init__(self, model: nn.Module, layers: Sequence[int], dropout: float = 0.1,
                 where: str = "channels"):
        super().__init__()
        hidden, depth, classes = transformer_sizes(model, where)
        layers = list(layers)
        outside = [layer for layer in layers if not 1 <= layer < depth]
        if not layers or outside or len(set(layers)) != len(layers):
            raise ValueError(f"{where}: channel_layers {layers} must be distinct hidden states "
                             f"1-{depth - 1} of the {depth}-layer model (layer {depth} keeps "
                             "the model's own classifier)")
        self.model = model
        self.layers = layers
        self.dropout = nn.Dropout(dropout)
        self.channels = nn.ModuleList(nn.Linear(hidden, classes) for _ in layers)
        if hasattr(model, "batch_inputs"):
            self.batch_inputs = tuple(model.batch_inputs)

    @property
    def tokenisation(self) -> str:
        return self.model.tokenisation

    def forward(self, input: Sequence[RawText], output_hidden_states: bool = False,
                output_attentions: bool = False) -> dict[str, Any]:
        output = self.model(input, output_hidden_states=True,
                            output_attentions=output_attentions)
        starts = output.get(WORD_STARTS)
        if starts is None:
            raise ValueError("channels: the model gave no word positions; channels classify "
                             "tokens (data of task token_classification: word lists)")
        hidden = output["hidden_states"]
        heads = [output["logits"]] + [per_word(head(self.dropout(hidden[layer])), starts)
                                      for layer, head in zip(self.layers, self.channels,
                                                             strict=True)]
        return {**output, "heads": torch.stack(heads)}

    def export(self) -> nn.Module:
        """The deployable model: the tagger alone (its final classifier); the channels are
        dropped."""
        return self.model
