"""Taps: the named pieces of knowledge a distillation method reads from one forward pass.

A tap name is one of

* ``logits`` - the model's prediction scores (a plain tensor output, the first element of a
  tuple, ``output["logits"]`` or ``output.logits``); for a sentence encoder, its sentence
  embedding;
* ``sentence_embedding`` - the sentence embedding [B, D] of a sentence encoder (a model whose
  output mapping holds ``sentence_embedding`` in place of ``logits``, see
  :mod:`kdistill.models.sentence`); other models have none;
* ``hidden.<i>`` - the i-th hidden state of a Hugging Face model (``hidden_states[i]``, where 0 is
  the embedding output; negative indices count from the end);
* ``attention.<i>`` - the i-th layer's attention map (``attentions[i]``, shape [B, H, L, L]);
* ``embeddings`` - ``hidden_states[0]``;
* ``query.<i>`` / ``key.<i>`` - the query (key) projection of the i-th self-attention layer of
  a BERT-style encoder (a module with ``query`` and ``key`` linear layers and an
  ``attention_head_size``: BERT, RoBERTa, ELECTRA, MiniLM...), split into heads:
  ``[B, L, H, d_head]``, read through a forward hook on that linear layer. The layer's
  pre-softmax attention scores are ``Q_h K_h^T / sqrt(d_head)`` (before the additive mask);
  unlike ``attention.<i>`` these taps work with every attention implementation, and a teacher
  cache stores them per token;
* ``token_mask`` - the ``[B, L]`` mask of the model's own tokens: the ``attention_mask`` a
  model that tokenises raw text reports, otherwise the batch's;
* ``pooled`` - ``pooler_output`` when the model has one, otherwise the mean of the last hidden
  state over valid tokens (``attention_mask``);
* ``heads`` - ``output["heads"]`` of a model with several prediction heads (a tensor
  [k, B, ...] of the stacked heads; its ``logits`` is the inference prediction);
* ``module:<path>`` / ``module:<path>:input`` - the output (or first positional input) of any
  submodule, read through a forward hook, e.g. ``module:layer3`` or
  ``module:encoder.layer.2.output``;
* ``slice:hidden.<i>:attention=<j>:tokens=<k>:width=<f>:sep=<id>`` - a
  :class:`~kdistill.losses.TokenSlice` of hidden state i (hidden-state knowledge compression,
  :mod:`kdistill.losses.slices`): the k valid tokens that [CLS] attends to most in
  self-attention layer j (averaged over heads; tokens with id ``<id>``, the [SEP] token,
  excluded; ``tokens=all`` with ``attention=none`` keeps every valid token, ``sep=none``
  excludes none), then the fraction f of their entries of largest magnitude. It reads the
  model's token ids (``input_ids`` of the batch, or of the output of a model that tokenises
  itself). :func:`slice_tap` writes the name; a teacher cache stores only the slice.

Models are never rewritten: output taps are read from whatever the model returns and module,
query and key taps through hooks that :class:`TapReader` registers once and removes in
:meth:`TapReader.close`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.errors import KdistillError
from kdistill.losses.slices import TokenSlice, slice_tokens
from kdistill.names import unknown_name

OUTPUT_TAP_PATTERN = re.compile(
    r"^(logits|heads|embeddings|pooled|token_mask|sentence_embedding|hidden\.-?\d+|"
    r"attention\.-?\d+)$")
PROJECTION_TAP_PATTERN = re.compile(r"^(query|key)\.(-?\d+)$")
SLICE_TAP_PATTERN = re.compile(
    r"^slice:(hidden\.-?\d+):attention=(-?\d+|none):tokens=(\d+|all):width=([0-9.e-]+)"
    r":sep=(\d+|none)$")
SENTENCE_EMBEDDING = "sentence_embedding"  # a sentence encoder's output key (and tap)
MODULE_PREFIX = "module:"
HF_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                 "decoder_input_ids", "decoder_attention_mask")


class TapError(KdistillError):
    """A tap name that is malformed or that the model cannot provide."""


class Taps(Mapping[str, torch.Tensor]):
    """Read-only mapping from tap name to tensor for one forward pass.

    ``Taps`` also carries the batch's ``attention_mask`` (when there is one; for a model that
    tokenises raw text for itself, its own tokens' mask) so that losses on token features can
    mask padding without seeing the batch. A source made of several models
    (peers, an ensemble, a group) also gives each model's own taps as ``members``.
    """

    def __init__(self, values: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None,
                 members: tuple[Taps, ...] = ()):
        self._values = dict(values)
        self.mask = mask
        self.members = tuple(members)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._values[name]
        except KeyError:
            available = ", ".join(sorted(self._values)) or "none"
            raise TapError(f"tap '{name}' was not recorded; recorded taps: {available}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def mask_for(self, value: torch.Tensor) -> torch.Tensor | None:
        """The mask of ``value``'s positions: :attr:`mask` [B, L] for a tensor with positions,
        i.e. more dimensions than the mask (token features [B, L, D], attention [B, H, L, L]:
        the loss reads the mask its way and refuses a shape that does not fit), None for a
        tensor without, such as a sentence's logits [B, C]."""
        if self.mask is None or value.dim() <= self.mask.dim():
            return None
        return self.mask

    def detached(self) -> Taps:
        """A copy whose tensors are ordinary (non-inference) tensors cut from any graph."""
        return Taps({k: v.detach().clone() for k, v in self._values.items()}, self.mask,
                    tuple(m.detached() for m in self.members))

    def replace(self, **values: torch.Tensor) -> Taps:
        """A copy with some taps replaced or added."""
        return Taps({**self._values, **values}, self.mask, self.members)

    def with_members(self, members: Iterable[Taps]) -> Taps:
        """A copy whose ``members`` are ``members``."""
        return Taps(self._values, self.mask, tuple(members))


@dataclass(frozen=True)
class ModuleTap:
    """A parsed ``module:<path>[:input]`` tap."""

    name: str
    path: str
    read_input: bool


@dataclass(frozen=True)
class ProjectionTap:
    """A parsed ``query.<i>`` / ``key.<i>`` tap: ``projection`` of self-attention ``layer``."""

    name: str
    projection: str
    layer: int


@dataclass(frozen=True)
class SliceTap:
    """A parsed ``slice:...`` tap: the slice of output tap ``hidden`` keeping ``tokens`` tokens
    (``None``: all) chosen by the [CLS] attention of self-attention layer ``attention``,
    excluding token id ``sep``, then the ``width`` fraction of their entries."""

    name: str
    hidden: str
    attention: int | None
    tokens: int | None
    width: float
    sep: int | None

    def projections(self) -> list[ProjectionTap]:
        """The query and key taps whose scores choose the tokens (none for every token)."""
        if self.attention is None:
            return []
        return [ProjectionTap(f"{kind}.{self.attention}", kind, self.attention)
                for kind in ("query", "key")]


def slice_tap(hidden: str, *, attention: int | None, tokens: int | None, width: float,
              sep: int | None) -> str:
    """The name of a slice tap (see the module notes); one slice, one name."""
    def text(value: int | None, default: str) -> str:
        return default if value is None else str(value)

    name = (f"slice:{hidden}:attention={text(attention, 'none')}:tokens={text(tokens, 'all')}"
            f":width={float(width)!r}:sep={text(sep, 'none')}")
    parse_tap(name)
    return name


def _parse_slice(name: str) -> SliceTap:
    match = SLICE_TAP_PATTERN.match(name)
    if not match:
        raise TapError(f"malformed slice tap '{name}': use 'slice:hidden.<i>:attention=<j>:"
                       "tokens=<k>:width=<f>:sep=<id>' (attention=none with tokens=all; "
                       "sep=none to keep [SEP] tokens)")
    hidden, attention, tokens, width, sep = match.groups()
    try:
        fraction = float(width)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise TapError(f"slice tap '{name}': width must be a fraction in (0, 1], got {width}")
    if (attention == "none") != (tokens == "all"):
        raise TapError(f"slice tap '{name}': a number of tokens needs the attention layer that "
                       "chooses them, and tokens=all needs none (attention=none)")
    if tokens != "all" and int(tokens) < 1:
        raise TapError(f"slice tap '{name}': tokens must be at least 1")
    return SliceTap(name, hidden, None if attention == "none" else int(attention),
                    None if tokens == "all" else int(tokens), fraction,
                    None if sep == "none" else int(sep))


def parse_tap(name: str) -> str | ModuleTap | ProjectionTap | SliceTap:
    """Check a tap name's form; return it (output taps), a :class:`ModuleTap`, a
    :class:`ProjectionTap` or a :class:`SliceTap`."""
    if name.startswith(MODULE_PREFIX):
        rest = name[len(MODULE_PREFIX) :]
        read_input = rest.endswith(":input")
        path = rest[: -len(":input")] if read_input else rest
        if not path or ":" in path:
            raise TapError(f"malformed module tap '{name}': use 'module:<path>' or "
                           "'module:<path>:input'")
        return ModuleTap(name, path, read_input)
    if name.startswith("slice:"):
        return _parse_slice(name)
    projection = PROJECTION_TAP_PATTERN.match(name)
    if projection:
        return ProjectionTap(name, projection.group(1), int(projection.group(2)))
    if not OUTPUT_TAP_PATTERN.match(name):
        raise TapError(
            f"unknown tap '{name}': expected logits, embeddings, pooled, token_mask, "
            "sentence_embedding, hidden.<i>, attention.<i>, query.<i>, key.<i>, heads, "
            "slice:<...> or module:<path>"
        )
    return name


def run_model(model: nn.Module, batch: Mapping[str, Any], *, hidden: bool = False,
              attentions: bool = False) -> Any:
    """Call ``model`` with a batch dict.

    Hugging Face style batches (with ``input_ids``) are passed as keyword arguments, asking for
    hidden states and attentions only when a tap needs them; any other model receives
    ``batch["input"]`` positionally (plus the two output flags when it declares
    ``accepts_output_flags``, as text models do). A model that declares ``batch_inputs`` (a
    tuple of batch keys, e.g. ``("labels",)`` for a teacher given privileged information) also
    receives each of
    those keys as a keyword argument; no other model ever sees them.
    """
    extra = batch_inputs(model, batch)
    if "input_ids" in batch:
        kwargs = {k: batch[k] for k in HF_INPUT_KEYS if k in batch}
        if hidden:
            kwargs["output_hidden_states"] = True
        if attentions:
            kwargs["output_attentions"] = True
        return model(**kwargs, **extra)
    if "input" not in batch:
        raise TapError(f"batch has neither 'input' nor 'input_ids'; keys: {sorted(batch)}")
    if getattr(model, "accepts_output_flags", False):  # e.g. a model that reads raw text
        extra = {**extra, "output_hidden_states": hidden, "output_attentions": attentions}
    return model(batch["input"], **extra)


def batch_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The extra batch entries ``model`` declares in its ``batch_inputs`` attribute."""
    keys = tuple(getattr(model, "batch_inputs", ()))
    missing = [k for k in keys if k not in batch]
    if missing:
        raise TapError(f"{type(model).__name__} takes batch_inputs {list(keys)} but the batch "
                       f"lacks {missing}; keys: {sorted(batch)}")
    return {k: batch[k] for k in keys}


def _field(output: Any, key: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


def is_sentence_embedding(output: Any) -> bool:
    """Whether a model output is a sentence encoder's: a mapping holding
    ``sentence_embedding`` and no ``logits``."""
    return (isinstance(output, Mapping) and SENTENCE_EMBEDDING in output
            and "logits" not in output)


def output_logits(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, a tuple's first item, its ``logits`` field, or
    a sentence encoder's ``sentence_embedding`` (the output of such a model)."""
    if isinstance(output, torch.Tensor):
        return output
    value = _field(output, SENTENCE_EMBEDDING if is_sentence_embedding(output) else "logits")
    if value is None and isinstance(output, tuple | list) and output:
        value = output[0]
    if not isinstance(value, torch.Tensor):
        raise TapError(f"cannot find logits in a model output of type {type(output).__name__}")
    return value


def _indexed(output: Any, field: str, index: int, tap: str) -> torch.Tensor:
    values = _field(output, field)
    if not values:
        hint = (" (Hugging Face models need attn_implementation='eager' for attentions)"
                if field == "attentions" else "")
        raise TapError(f"tap '{tap}': the model output has no {field}{hint}")
    if not -len(values) <= index < len(values):
        raise TapError(f"tap '{tap}': index {index} out of range, the model has "
                       f"{len(values)} {field}")
    return values[index]


def _pooled(output: Any, mask: torch.Tensor | None) -> torch.Tensor:
    pooled = _field(output, "pooler_output")
    if isinstance(pooled, torch.Tensor):
        return pooled
    last = _field(output, "last_hidden_state")
    if last is None:
        hidden_states = _field(output, "hidden_states")
        last = hidden_states[-1] if hidden_states else None
    if not isinstance(last, torch.Tensor):
        raise TapError("tap 'pooled': the model output has no pooler_output or hidden states")
    return masked_mean(last, mask)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``tokens`` [B, T, ...] over the positions ``mask`` [B, T] marks (every
    position without a mask): [B, ...]. A row without any marked position gives zeros."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).view(*mask.shape, *([1] * (tokens.dim() - 2)))
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def output_hidden_states(output: Any) -> tuple[torch.Tensor, ...]:
    """Every hidden state of a model output (``hidden_states``: the embeddings' output first,
    then each layer's), as ``hidden.<i>`` reads them."""
    values = _field(output, "hidden_states")
    if not values:
        raise TapError(f"the model output ({type(output).__name__}) has no hidden_states")
    return tuple(values)


def output_mask(output: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The mask of the tokens behind a model output's positions: the model's own
    ``attention_mask`` when it tokenises for itself (a text model returns it), else the
    batch's (None without one)."""
    own = _field(output, "attention_mask") if isinstance(output, Mapping) else None
    return batch.get("attention_mask") if own is None else own


def output_token_ids(output: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """The token ids behind a model output's positions: the model's own ``input_ids`` when it
    tokenises for itself (a text model returns them), else the batch's (None without)."""
    own = _field(output, "input_ids") if isinstance(output, Mapping) else None
    return batch.get("input_ids") if own is None else own


def output_tap(output: Any, name: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Read one output tap (not a ``module:``, ``query.<i>`` or ``key.<i>`` tap) from a model
    output; ``mask`` is the mask of the model's tokens (``pooled``, ``token_mask``)."""
    if name == "logits":
        return output_logits(output)
    if name == "embeddings":
        return _indexed(output, "hidden_states", 0, name)
    if name == "pooled":
        return _pooled(output, mask)
    if name == "token_mask":
        if mask is None:
            raise TapError("tap 'token_mask': neither the model output nor the batch has an "
                           "attention_mask")
        return mask
    if name == SENTENCE_EMBEDDING:
        if not is_sentence_embedding(output):
            raise TapError("tap 'sentence_embedding': the model is not a sentence encoder (its "
                           "output has no sentence_embedding); use hf_embedder, hf_student "
                           "with pooling, or static")
        return output[SENTENCE_EMBEDDING]
    if name == "heads":
        heads = _field(output, "heads")
        if not isinstance(heads, torch.Tensor):
            raise TapError("tap 'heads': the model output has no 'heads' tensor (a multi-head "
                           "model returns {'logits': ..., 'heads': [k, B, ...]})")
        return heads
    field, index = name.split(".")
    return _indexed(output, "hidden_states" if field == "hidden" else "attentions",
                    int(index), name)


def _first_tensor(value: Any, what: str = "module output") -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    hidden = _field(value, "last_hidden_state")
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TapError(f"{what} of type {type(value).__name__} holds no tensor")


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any], tap: str) -> torch.Tensor:
    """The first positional tensor input, else ``hidden_states=`` or the first tensor keyword
    (Hugging Face layers are often called with keyword arguments only)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TapError(f"tap '{tap}': the module was called without a tensor input")


def resolve_module_taps(model: nn.Module,
                        names: Iterable[str]) -> list[tuple[ModuleTap, nn.Module]]:
    """The submodule behind each ``module:`` tap among ``names``; a path the model lacks raises
    :class:`TapError` suggesting the closest paths it has."""
    modules = dict(model.named_modules())
    targets = []
    for name in names:
        tap = parse_tap(name)
        if not isinstance(tap, ModuleTap):
            continue
        if tap.path not in modules:
            raise TapError(f"tap '{tap.name}': " + unknown_name(
                f"{type(model).__name__} module", tap.path, [p for p in modules if p]))
        targets.append((tap, modules[tap.path]))
    return targets


def self_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The BERT-style self-attention modules of ``model`` in the order they were registered
    (layer order): modules with ``query`` and ``key`` linear layers and an integer
    ``attention_head_size``."""
    return [module for module in model.modules()
            if isinstance(getattr(module, "query", None), nn.Linear)
            and isinstance(getattr(module, "key", None), nn.Linear)
            and isinstance(getattr(module, "attention_head_size", None), int)]


def resolve_projection_taps(model: nn.Module,
                            names: Iterable[str]) -> list[tuple[ProjectionTap, nn.Module, int]]:
    """The linear layer behind each ``query.<i>`` / ``key.<i>`` tap among ``names`` (and those
    a slice tap reads) and its head size; :class:`TapError` for a model without BERT-style
    self-attention or a layer it lacks."""
    taps: dict[str, ProjectionTap] = {}
    for tap in map(parse_tap, names):
        for projection in (tap.projections() if isinstance(tap, SliceTap) else [tap]):
            if isinstance(projection, ProjectionTap):
                taps.setdefault(projection.name, projection)
    layers = self_attention_layers(model) if taps else []
    targets = []
    for tap in taps.values():
        if not layers:
            raise TapError(f"tap '{tap.name}': {type(model).__name__} has no BERT-style "
                           "self-attention module (one with 'query' and 'key' linear layers "
                           "and an 'attention_head_size')")
        if not -len(layers) <= tap.layer < len(layers):
            raise TapError(f"tap '{tap.name}': layer {tap.layer} out of range, "
                           f"{type(model).__name__} has {len(layers)} self-attention layers")
        attention = layers[tap.layer]
        targets.append((tap, getattr(attention, tap.projection), attention.attention_head_size))
    return targets


HookReader = Callable[[tuple[Any, ...], Mapping[str, Any], Any], torch.Tensor]
"""What a forward hook keeps of a module call: ``read(args, kwargs, output)``."""


def _module_reader(tap: ModuleTap) -> HookReader:
    if tap.read_input:
        return lambda args, kwargs, _output: _first_input(args, kwargs, tap.name)
    return lambda _args, _kwargs, output: _first_tensor(output, f"tap '{tap.name}': output")


def _heads_reader(head_size: int) -> HookReader:
    """A projection's output [..., H * d] split into heads [..., H, d]."""
    return lambda _args, _kwargs, output: output.unflatten(-1, (-1, head_size))


def eager_attention(model: nn.Module) -> None:
    """Switch the Hugging Face models in ``model`` (itself, or the outermost ones it wraps,
    such as a text model's network) to eager attention: only it returns the attention
    probabilities."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
        return
    for child in model.children():
        eager_attention(child)


class TapReader:
    """Runs a model on batches and returns the requested :class:`Taps`.

    Module, query and key taps are read by forward hooks registered once here; :meth:`close`
    (or leaving the ``with`` block) removes them. A module path the model lacks raises
    :class:`TapError` listing the closest paths the model has.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = tuple(dict.fromkeys(names))
        parsed = [parse_tap(n) for n in self.names]
        self.output_names = [p for p in parsed if isinstance(p, str)]
        self.hooked_taps = [p for p in parsed if isinstance(p, ModuleTap | ProjectionTap)]
        self.slice_taps = [p for p in parsed if isinstance(p, SliceTap)]
        self.wants_hidden = bool(self.slice_taps) or any(
            n.startswith("hidden.") or n in ("embeddings", "pooled") for n in self.output_names)
        self.wants_attentions = any(n.startswith("attention.") for n in self.output_names)
        self._recorded: dict[str, torch.Tensor] = {}
        # Resolve every path before touching the model, so a bad name leaves no hook behind.
        targets = resolve_module_taps(model, self.names)
        projections = resolve_projection_taps(model, self.names)
        if self.wants_attentions:
            eager_attention(model)
        self._handles = ([self._hook(tap, module, _module_reader(tap)) for tap, module in targets]
                         + [self._hook(tap, linear, _heads_reader(size))
                            for tap, linear, size in projections])

    def _hook(self, tap: ModuleTap | ProjectionTap, module: nn.Module,
              read: HookReader) -> torch.utils.hooks.RemovableHandle:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
            self._recorded[tap.name] = read(args, kwargs, output)

        return module.register_forward_hook(record, with_kwargs=True)

    def __call__(self, batch: Mapping[str, Any]) -> Taps:
        self._recorded = {}
        output = run_model(self.model, batch, hidden=self.wants_hidden,
                           attentions=self.wants_attentions)
        tokens = output_mask(output, batch)  # a model's own tokens, for pooling
        # The batch's mask (a word list's words) or else the model's own tokens' (raw text)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = tokens
        values = {name: output_tap(output, name, tokens) for name in self.output_names}
        for tap in self.hooked_taps:
            if tap.name not in self._recorded:
                module = tap.path if isinstance(tap, ModuleTap) else tap.projection
                raise TapError(f"tap '{tap.name}': module '{module}' did not run in the "
                               "forward pass")
            values[tap.name] = self._recorded[tap.name]
        for cut in self.slice_taps:
            values[cut.name] = self._slice(cut, output, batch, tokens)  # type: ignore[assignment]
        self._recorded = {}
        return Taps(values, mask)

    def _slice(self, tap: SliceTap, output: Any, batch: Mapping[str, Any],
               mask: torch.Tensor | None) -> TokenSlice:
        hidden = output_tap(output, tap.hidden)
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        query = key = None
        if tap.attention is not None:
            missing = [p.name for p in tap.projections() if p.name not in self._recorded]
            if missing:
                raise TapError(f"tap '{tap.name}': {missing} did not run in the forward pass")
            query, key = (self._recorded[p.name] for p in tap.projections())
        token_ids = None
        if tap.tokens is not None and tap.sep is not None:
            token_ids = output_token_ids(output, batch)
            if token_ids is None:
                raise TapError(f"tap '{tap.name}' excludes token id {tap.sep} and neither the "
                               "batch nor the model output has input_ids; give sep=none")
        return slice_tokens(hidden, mask, query=query, key=key, token_ids=token_ids,
                            tokens=tap.tokens, width=tap.width, sep_id=tap.sep)

    def close(self) -> None:
        """Remove every hook this reader registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> TapReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
