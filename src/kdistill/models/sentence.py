"""Sentence encoders: one embedding per text, pooled from a transformer's last hidden states.

With last hidden states ``h [B, T, H]`` and the tokens' ``attention_mask`` ``m [B, T]``:

* ``mean`` pooling: ``e_b = sum_t m_bt h_bt / sum_t m_bt``, the mean over the text's real
  tokens (padding never counts), as Sentence-BERT does (Reimers & Gurevych 2019,
  "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks"); all-MiniLM-L6-v2 is
  trained with it;
* ``cls`` pooling: ``e_b = h_b0``, the first token's state (BERT's ``[CLS]``);
* ``normalize``: ``e_b / max(|e_b|, 1e-12)``, so that a dot product is a cosine similarity.

:class:`SentenceEncoder` wraps a bare transformers encoder (``AutoModel``) so that its output
is ``{"sentence_embedding": e, ...}`` (see :data:`kdistill.taps.SENTENCE_EMBEDDING`): put
behind an :class:`~kdistill.models.text.HFTextEncoder` in a
:class:`~kdistill.models.text.TextModel`, it reads raw text and answers embeddings, which the
evaluation recognises (task ``embedding``). ``hf_embedder`` builds one from a local folder.

A sentence encoder is saved in the sentence-transformers layout: the network and tokenizer
(``save_pretrained``), ``modules.json`` (Transformer, Pooling and, when normalised, Normalize)
and ``1_Pooling/config.json``, so sentence-transformers loads it too;
:func:`load_sentence_encoder` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch.nn.functional as F
from pydantic import StrictBool
from torch import Tensor, nn

from kdistill.batch import Task
from kdistill.checkpoint import atomic_write_text
from kdistill.errors import KdistillError
from kdistill.models.hf import load_hf_model, load_tokenizer
from kdistill.models.hf_text import HFTextEncoder, MaxLength, takes_token_type_ids
from kdistill.models.text import TextModel
from kdistill.taps import SENTENCE_EMBEDDING

Pooling = Literal["mean", "cls"]
POOLINGS: tuple[Pooling, ...] = ("mean", "cls")
MAX_POSITIONS = 1 << 16  # caps a tokenizer's "no limit" model_max_length (1e30)
MODULES_FILE = "modules.json"
POOLING_FOLDER = "1_Pooling"
ST_MODULE = "sentence_transformers.models."  # module type prefix in modules.json
MODES: dict[str, Pooling] = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def pool(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """The sentence vectors [B, H] of last hidden states ``hidden`` [B, T, H] whose real tokens
    ``mask`` [B, T] marks: their masked mean, or the first token's state (see the module
    doc). A text without any real token pools to zeros under ``mean``."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise KdistillError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class SentenceEncoder(nn.Module):
    """A transformers encoder whose output is its pooled (and optionally L2-normalised)
    last hidden state: ``{"sentence_embedding": [B, H]}``, plus ``hidden_states`` and
    ``attentions`` when asked for (token-level taps keep working)."""

    def __init__(self, network: nn.Module, pooling: Pooling = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in POOLINGS:
            raise KdistillError(f"pooling must be one of {', '.join(POOLINGS)}, got "
                                f"{pooling!r}")
        self.network = network
        self.pooling: Pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> dict[str, Any]:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        output = self.network(input_ids=input_ids, attention_mask=attention_mask,
                              output_hidden_states=output_hidden_states,
                              output_attentions=output_attentions, **extra)
        embedding = pool(output.last_hidden_state, attention_mask, self.pooling)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        result: dict[str, Any] = {SENTENCE_EMBEDDING: embedding}
        for field in ("hidden_states", "attentions"):
            value = getattr(output, field, None)
            if value is not None:
                result[field] = value
        return result

    def save_pretrained(self, folder: str | Path) -> None:
        """The network's ``save_pretrained`` plus the sentence-transformers files that say
        how it pools (see the module doc)."""
        folder = Path(folder)
        self.network.save_pretrained(folder)
        modules = [("Transformer", ""), ("Pooling", POOLING_FOLDER)]
        if self.normalize:
            modules.append(("Normalize", "2_Normalize"))
        atomic_write_text(folder / MODULES_FILE, json.dumps(
            [{"idx": i, "name": str(i), "path": path, "type": ST_MODULE + kind}
             for i, (kind, path) in enumerate(modules)], indent=2))
        (folder / POOLING_FOLDER).mkdir(exist_ok=True)
        atomic_write_text(folder / POOLING_FOLDER / "config.json", json.dumps(
            {"word_embedding_dimension": self.network.config.hidden_size,
             **{key: mode == self.pooling for key, mode in MODES.items()},
             "pooling_mode_max_tokens": False,
             "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))


def sentence_model(network: nn.Module, encoder: HFTextEncoder, pooling: Pooling,
                   normalize: bool) -> TextModel:
    """``network`` (a bare transformers encoder) as a sentence encoder behind ``encoder``."""
    return TextModel(encoder, SentenceEncoder(network, pooling, normalize))


def load_embedder(path: str | Path, pooling: Pooling = "mean", normalize: bool = True,
                  max_length: int = 128, trust_remote_code: bool = False) -> TextModel:
    """The bare encoder of the local folder ``path`` (``AutoModel``, see
    :func:`~kdistill.models.hf.load_hf_model`) as a sentence encoder behind the folder's
    tokenizer."""
    network = load_hf_model(path, task="encoder", trust_remote_code=trust_remote_code)
    encoder = HFTextEncoder.from_folder(path, max_length, trust_remote_code,
                                        takes_token_type_ids(network))
    return sentence_model(network, encoder, pooling, normalize)


def build_hf_embedder(input_shape: Sequence[int], num_classes: int, path: str,
                      pooling: Pooling = "mean", normalize: StrictBool = True,
                      max_length: MaxLength = 128, trust_remote_code: StrictBool = False, *,
                      task: Task = "embedding") -> nn.Module:
    """The ``hf_embedder`` model: the transformers encoder of the local folder ``path``
    (all-MiniLM-L6-v2, say) giving pooled, by default L2-normalised, sentence embeddings of
    raw text (:func:`load_embedder`). ``input_shape`` and ``num_classes`` are unused; word
    lists (``task`` ``token_classification``) are refused."""
    if task == "token_classification":
        raise KdistillError("hf_embedder gives one embedding per text and cannot tag words "
                            "(task token_classification)")
    return load_embedder(path, pooling, normalize, max_length, trust_remote_code)


def saved_pooling(folder: Path) -> tuple[Pooling, bool] | None:
    """How the sentence encoder saved in ``folder`` pools and whether it normalises, read from
    its sentence-transformers files; ``None`` when the folder has no ``modules.json``."""
    modules_path = folder / MODULES_FILE
    if not modules_path.is_file():
        return None
    try:
        kinds = [m["type"].removeprefix(ST_MODULE)
                 for m in json.loads(modules_path.read_text())]
        config = json.loads((folder / POOLING_FOLDER / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise KdistillError(f"{folder}: unreadable sentence-transformers files ({error})") \
            from None
    modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on]
    if kinds[:2] != ["Transformer", "Pooling"] or len(modes) != 1 or modes[0] not in MODES:
        raise KdistillError(f"{folder}: {MODULES_FILE} and {POOLING_FOLDER}/config.json describe "
                            f"modules {kinds} with pooling {modes or 'none'}; kdistill reads a "
                            "Transformer with mean or cls pooling, optionally normalised")
    return MODES[modes[0]], "Normalize" in kinds


def load_sentence_encoder(folder: str | Path) -> TextModel:
    """A sentence encoder written by :meth:`SentenceEncoder.save_pretrained` (or any
    sentence-transformers folder of a Transformer with mean or cls pooling), with its
    tokenizer."""
    folder = Path(folder)
    found = saved_pooling(folder)
    if found is None:
        raise KdistillError(f"{folder}: no {MODULES_FILE}; not a saved sentence encoder")
    network = load_hf_model(folder, task="encoder")
    tokenizer = load_tokenizer(folder)
    # HFTextEncoder.save wrote the encoder's max_length as the tokenizer's model_max_length.
    encoder = HFTextEncoder(tokenizer, min(tokenizer.model_max_length, MAX_POSITIONS),
                            takes_token_type_ids(network))
    return sentence_model(network, encoder, *found)
