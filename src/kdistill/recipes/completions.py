"""Completions of prompts by a causal language model, and the training rows they make.

Both on-policy distillation (``gkd``: the student samples) and sequence-level distillation
(``seqkd``: the teacher decodes) turn prompt/completion rows of task ``lm`` (see
:mod:`kdistill.batch`) into prompts, let a model complete them, and rebuild the rows with the
new completions: labels on the completion tokens alone, as :mod:`kdistill.data.lm` labels
prompt/completion pairs.

A row's prompt is its tokens up to the first position that predicts a labelled token: the
data's prompt for a pair (its whole row when nothing is labelled). Generation runs with the
transformers ``generate`` of the model, prompts padded on the left, the key-value cache on, and
no gradient; a completion is the new tokens up to and including the first end-of-sequence token
(``max_new_tokens`` of them when none comes). Sampling draws from ``softmax(z / temperature)``
over the whole vocabulary (no top-k or top-p cut).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdistill.batch import TOKEN_MASK, UNLABELED
from kdistill.contexts import eval_mode
from kdistill.data.lm import pad_rows


@dataclass(frozen=True)
class Decoding:
    """How a model completes a prompt: ``sample`` from ``softmax(z / temperature)``, or beam
    search with ``num_beams`` beams (1: greedy), for at most ``max_new_tokens`` tokens."""

    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    num_beams: int = 1

    def options(self) -> dict[str, Any]:
        """The keyword arguments of transformers' ``generate``."""
        if self.sample:
            return {"do_sample": True, "temperature": self.temperature, "top_k": 0,
                    "top_p": 1.0, "num_beams": 1}
        return {"do_sample": False, "num_beams": self.num_beams}


def special_ids(model: nn.Module) -> tuple[int | None, int]:
    """The end-of-sequence id of ``model`` (None without one) and the id it pads with."""
    config = getattr(model, "generation_config", None) or model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, list | tuple):
        eos = eos[0] if eos else None
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    return eos, pad if pad is not None else (eos if eos is not None else 0)


def check_decoder_only(batch: Mapping[str, Any], recipe: str) -> None:
    """Refuse a batch that is not language-modelling rows of a decoder-only model."""
    if TOKEN_MASK not in batch:
        raise ValueError(f"{recipe}: the batch has no '{TOKEN_MASK}'; it distils language "
                         "models on prompt/completion data (lm_text, lm_hf_dataset with "
                         "prompt_column and completion_column)")
    if "decoder_input_ids" in batch:
        raise ValueError(f"{recipe}: encoder-decoder rows (seq2seq: true) are not supported; "
                         "it completes the prompts of a decoder-only model")


def batch_prompts(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each row's prompt (see the module doc): its tokens up to the position that predicts its
    first labelled token."""
    prompts = []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist(), strict=True):
        length = sum(mask)
        first = next((t for t, label in enumerate(labels) if label != UNLABELED), length - 1)
        prompts.append(ids[:first + 1])
    return prompts


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, longest] with each prompt padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(tokens: Sequence[int], eos_id: int | None) -> list[int]:
    """``tokens`` up to and including the first ``eos_id`` (all of them without one)."""
    tokens = list(tokens)
    if eos_id is not None and eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1]
    return tokens


def complete(model: nn.Module, prompts: Sequence[Sequence[int]],
             decoding: Decoding) -> list[list[int]]:
    """The completion ``model`` generates for each prompt (see the module doc), in eval mode
    and without gradient."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt token per row")
    eos, pad = special_ids(model)
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad, device)
    with eval_mode(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask,
                             max_new_tokens=decoding.max_new_tokens, use_cache=True,
                             pad_token_id=pad, eos_token_id=eos, **decoding.options())
    return [cut_at_eos(row, eos) for row in out[:, ids.shape[1]:].tolist()]


def completion_rows(batch: Mapping[str, Any], prompts: Sequence[Sequence[int]],
                    completions: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """``batch`` with its rows rebuilt from ``prompts`` and ``completions``: ``input_ids``,
    ``attention_mask``, ``labels`` (the completion tokens alone) and ``token_mask``, on the
    batch's device; its other keys (``index``...) as they were."""
    sequences = [[*p, *c] for p, c in zip(prompts, completions, strict=True)]
    longest = max(len(s) for s in sequences)
    rows = pad_rows(sequences, [len(p) for p in prompts], longest, pad_id).columns()
    device = batch["input_ids"].device
    return {**batch, **{k: v.to(device) for k, v in rows.items()}}
