"""Structured masks inside the layers of a BERT-style transformer encoder.

Three kinds of unit are masked in each encoder layer (GRAIN's, Liang et al. 2023):

* ``ffn`` - an FFN neuron j: row j of the intermediate layer (and its bias) and column j of
  the FFN output layer;
* ``qk`` - a query/key dimension r: row r of the query and of the key projection (and their
  biases); the heads' query/key sizes may differ;
* ``vo`` - a value/output dimension r: row r of the value projection (and its bias) and
  column r of the attention output layer.

:class:`MaskedEncoder` wraps a model and applies its masks through forward hooks: the query,
key and value projections' outputs and the FFN output layer's input are multiplied by the
masks, which computes exactly what the model with those rows and columns removed computes (the
attention scale 1/sqrt(d_head) keeps the full head size, as GRAIN's code by default). Weights
are never modified during training; :meth:`MaskedEncoder.export` bakes the masks into a copy
(the pruned rows and columns set to zero), a plain model with the same predictions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.taps import self_attention_layers

UNIT_KINDS = ("ffn", "qk", "vo")


@dataclass(frozen=True)
class EncoderLayer:
    """The linear layers of one BERT-style encoder layer that pruning touches."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    heads: int


def encoder_layers(model: nn.Module, where: str = "pruning") -> list[EncoderLayer]:
    """The BERT-style encoder layers of ``model`` in order: modules with ``attention.self``
    (query, key, value), ``attention.output.dense``, ``intermediate.dense`` and
    ``output.dense`` linear layers (BERT, RoBERTa, ELECTRA...); ``ValueError`` naming
    ``where`` for a model without any."""
    found = []
    attentions = {id(module) for module in self_attention_layers(model)}
    for module in model.modules():
        attention = getattr(module, "attention", None)
        self_attention = getattr(attention, "self", None)
        if id(self_attention) not in attentions:
            continue
        try:
            layers = [self_attention.query, self_attention.key, self_attention.value,
                      attention.output.dense, module.intermediate.dense, module.output.dense]
        except AttributeError:
            continue
        if all(isinstance(layer, nn.Linear) for layer in layers):
            heads = self_attention.query.out_features // self_attention.attention_head_size
            found.append(EncoderLayer(*layers, heads=heads))
    if not found:
        raise ValueError(f"{where}: {type(model).__name__} has no BERT-style encoder layers "
                         "(attention.self.query/key/value, attention.output.dense, "
                         "intermediate.dense, output.dense); pruning inside heads and FFNs "
                         "needs a transformers encoder such as BERT")
    return found


def unit_sizes(hidden: int) -> dict[str, int]:
    """Parameters one unit holds in a layer of width ``hidden``: an FFN neuron 2H + 1 (a row
    and a bias of the intermediate layer, a column of the output layer), a query/key
    dimension 2H + 2, a value/output dimension 2H + 1."""
    return {"ffn": 2 * hidden + 1, "qk": 2 * hidden + 2, "vo": 2 * hidden + 1}


class MaskedEncoder(nn.Module):
    """``model`` with a 0/1 mask per unit (buffers ``ffn_mask`` [L, F], ``qk_mask`` [L, A],
    ``vo_mask`` [L, A]; A = heads x head size), applied by forward hooks (see the module
    docstring). Masks start at 1; :meth:`set_masks` replaces them."""

    def __init__(self, model: nn.Module, where: str = "pruning"):
        super().__init__()
        self.model = model
        layers = encoder_layers(model, where)
        self.heads = layers[0].heads
        self.hidden = layers[0].query.in_features
        for kind, width in (("ffn", layers[0].ffn_in.out_features),
                            ("qk", layers[0].query.out_features),
                            ("vo", layers[0].value.out_features)):
            self.register_buffer(f"{kind}_mask", torch.ones(len(layers), width))
        for flag in ("accepts_output_flags", "batch_inputs"):
            if hasattr(model, flag):
                setattr(self, flag, getattr(model, flag))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hook()

    def _hook(self) -> None:
        for index, layer in enumerate(encoder_layers(self.model)):
            self._handles += [
                layer.query.register_forward_hook(self._output_hook("qk_mask", index)),
                layer.key.register_forward_hook(self._output_hook("qk_mask", index)),
                layer.value.register_forward_hook(self._output_hook("vo_mask", index)),
                layer.ffn_out.register_forward_pre_hook(self._input_hook("ffn_mask", index))]

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _output_hook(self, name: str, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
            return output * getattr(self, name)[index].to(output.dtype)
        return hook

    def _input_hook(self, name: str, index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] * getattr(self, name)[index].to(args[0].dtype), *args[1:])
        return hook

    def masks(self) -> dict[str, Tensor]:
        """The current masks by unit kind (``ffn``, ``qk``, ``vo``)."""
        return {kind: getattr(self, f"{kind}_mask") for kind in UNIT_KINDS}

    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Replace the masks (new tensors: a forward already run keeps the masks it used)."""
        for kind in UNIT_KINDS:
            setattr(self, f"{kind}_mask", masks[kind].to(getattr(self, f"{kind}_mask")).clone())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def density(self) -> float:
        """The share of the prunable parameters (every unit's, :func:`unit_sizes`) kept."""
        sizes = unit_sizes(self.hidden)
        kept = sum(float(mask.sum()) * sizes[kind] for kind, mask in self.masks().items())
        total = sum(mask.numel() * sizes[kind] for kind, mask in self.masks().items())
        return kept / total

    def remaining_parameters(self) -> int:
        """The model's parameter count once the masked units are removed."""
        sizes = unit_sizes(self.hidden)
        removed = sum(int((mask == 0).sum()) * sizes[kind] for kind, mask in self.masks().items())
        return sum(p.numel() for p in self.model.parameters()) - removed

    def export(self) -> nn.Module:
        """The deployable model: a copy of the wrapped model with the masks baked in (the
        masked rows, columns and biases set to zero), without hooks."""
        self._unhook()
        try:
            copied = copy.deepcopy(self.model)
        finally:
            self._hook()
        with torch.no_grad():
            for layer, ffn, qk, vo in zip(encoder_layers(copied), self.ffn_mask, self.qk_mask,
                                          self.vo_mask, strict=True):
                for linear, rows in ((layer.query, qk), (layer.key, qk), (layer.value, vo),
                                     (layer.ffn_in, ffn)):
                    linear.weight.mul_(rows.unsqueeze(1))
                    if linear.bias is not None:
                        linear.bias.mul_(rows)
                layer.attention_out.weight.mul_(vo.unsqueeze(0))
                layer.ffn_out.weight.mul_(ffn.unsqueeze(0))
        return copied
