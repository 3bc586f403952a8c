"""Models that read raw text: a tokeniser of their own in front of a network.

A text batch carries raw text as ``input`` (see :mod:`kdistill.batch`): strings, ``(text,
text_pair)`` tuples, or word lists for token classification. :class:`TextModel` turns that
text into its network's inputs with its own :class:`TextEncoder`, so a teacher and a student
that tokenise differently both read the same batch, and logit-level distillation works across
tokenisers. For token classification the encoder marks where each word starts and the model
answers one row of logits per word (the word's first sub-token, as BERT's taggers do), so
per-word logits line up between any two tokenisers too.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from kdistill.taps import SENTENCE_EMBEDDING, is_sentence_embedding, output_logits

RawText = str | tuple[str, str] | Sequence[str]
WORD_STARTS = "word_starts"  # encoder output: [B, W] position of each word's first token
OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")
TOKEN_LEVEL = ("hidden", "attention", "embeddings", "query", "key")  # compared token by token


@runtime_checkable
class TextEncoder(Protocol):
    """Turns a batch of raw text into a network's keyword inputs (tensors on the CPU).

    ``tokenisation`` names the token sequence the encoder produces (for example the
    tokenizer's vocabulary digest): two models whose encoders give the same name see the same
    tokens, so token-level losses between them are meaningful. For word lists the result also
    holds :data:`WORD_STARTS`, [B, W] positions of each word's first token (0 for padding).
    """

    tokenisation: str

    def __call__(self, texts: Sequence[RawText]) -> dict[str, Tensor]: ...

    def save(self, folder: Path) -> None: ...


def per_word(values: Tensor, word_starts: Tensor) -> Tensor:
    """Rows of ``values`` [B, T, ...] at ``word_starts`` [B, W]: [B, W, ...]."""
    index = word_starts.to(values.device).long()
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(
        *index.shape, *values.shape[2:])
    return values.gather(1, index)


class TextModel(nn.Module):
    """A network with the encoder that feeds it: ``forward`` takes a list of raw texts.

    The output is a dict with ``logits`` ([B, C], or [B, W, C] per word for word lists; a
    sentence encoder's ``sentence_embedding`` [B, D] in its place, see
    :mod:`kdistill.models.sentence`), the network's ``hidden_states`` and ``attentions`` when
    asked for and it has them, the ``attention_mask`` and ``input_ids`` of its own tokens
    (used to pool its hidden states, and to find [SEP] tokens for a slice tap) and, for word
    lists, :data:`WORD_STARTS` (where each word's first token is: a wrapper that reads the
    hidden states per word gathers them there, :func:`per_word`).
    """

    accepts_output_flags = True  # run_model passes output_hidden_states/output_attentions

    def __init__(self, encoder: TextEncoder, model: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.model = model
        accepted = inspect.signature(model.forward).parameters
        # transformers 5 networks take the output flags through **kwargs.
        any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        self._flags = [f for f in OUTPUT_FLAGS if f in accepted or any_keyword]

    @property
    def tokenisation(self) -> str:
        return self.encoder.tokenisation

    def encode(self, texts: Sequence[RawText]) -> dict[str, Tensor]:
        """The encoder's tensors for ``texts``, on this model's device."""
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in self.encoder(texts).items()}

    def forward(self, input: Sequence[RawText], output_hidden_states: bool = False,
                output_attentions: bool = False) -> dict[str, Any]:
        encoded = self.encode(input)
        word_starts = encoded.pop(WORD_STARTS, None)
        asked = {"output_hidden_states": output_hidden_states,
                 "output_attentions": output_attentions}
        output = self.model(**encoded, **{f: asked[f] for f in self._flags})
        logits = output_logits(output)
        if word_starts is not None:
            logits = per_word(logits, word_starts)
        key = SENTENCE_EMBEDDING if is_sentence_embedding(output) else "logits"
        result: dict[str, Any] = {key: logits}
        for field in ("hidden_states", "attentions"):
            value = output.get(field) if isinstance(output, dict) else getattr(output, field,
                                                                                None)
            if value is not None:
                result[field] = value
        for field in ("attention_mask", "input_ids"):
            if field in encoded:
                result[field] = encoded[field]
        if word_starts is not None:
            result[WORD_STARTS] = word_starts
        return result


def token_level_taps(taps: Sequence[str]) -> list[str]:
    """The taps of ``taps`` read position by position over a model's tokens (hidden states,
    attentions, embeddings, query and key projections)."""
    return [t for t in taps if t.split(".")[0] in TOKEN_LEVEL]


def check_same_tokens(student: nn.Module, teacher: nn.Module, taps: Sequence[str]) -> None:
    """Refuse token-level taps (:func:`token_level_taps`) between text models that tokenise
    differently: their positions are different tokens."""
    token_level = token_level_taps(taps)
    if not token_level or not all(isinstance(m, TextModel) for m in (student, teacher)):
        return
    if student.tokenisation != teacher.tokenisation:  # type: ignore[union-attr]
        raise ValueError(
            f"taps {token_level} compare the student's and the teacher's tokens position by "
            f"position, but they tokenise differently ({student.tokenisation} vs "
            f"{teacher.tokenisation}); use logit-level terms (logits, pooled) across "
            "tokenisers, or give the student the teacher's tokenizer")
