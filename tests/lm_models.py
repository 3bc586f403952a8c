"""Tiny language models for the tests: a word-level tokenizer and small Llamas, saved to folders
(never a real pretrained model)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "it", "big", "red", "and",
         "then", "slept", "under", "tree", "bird", "sang", "song", "Q:", "A:", "what", "is",
         "yes", "no", "blue", "sky", "green", "grass"]
VOCAB = SPECIAL + WORDS + [f"w{i}" for i in range(66)]  # 100 tokens
ID = {token: i for i, token in enumerate(VOCAB)}
PAD, EOS = ID["<pad>"], ID["</s>"]


def save_tokenizer(folder: Path) -> Path:
    """A whitespace word-level tokenizer of :data:`VOCAB` (no special tokens added around a
    text; ``</s>`` ends a sequence, ``<pad>`` pads) saved in ``folder``."""
    backend = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return folder


def llama_config(layers: int = 2, hidden: int = 32, heads: int = 4,
                 kv_heads: int = 2) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=48,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD,
        bos_token_id=ID["<s>"], eos_token_id=EOS)


def tiny_llama(layers: int = 2, hidden: int = 32, seed: int = 0,
               heads: int = 4, kv_heads: int = 2) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(layers, hidden, heads, kv_heads))


def save_llama(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny Llama causal LM and its tokenizer saved together in ``folder``."""
    tiny_llama(layers, hidden, seed).save_pretrained(folder)
    return save_tokenizer(folder)


@functools.cache
def tokenizer_folder() -> str:
    """A folder holding :func:`save_tokenizer`'s tokenizer, written once per test session
    (for recipes that take tokenizer folders as parameters, built without a ``tmp_path``)."""
    return str(save_tokenizer(Path(tempfile.mkdtemp(prefix="kdistill-tokenizer-"))))
