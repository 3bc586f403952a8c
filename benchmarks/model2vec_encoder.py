"""A Model2Vec static model (Tulkens & van Dongen 2024) read without the model2vec package,
whose transformers pin kdistill's environment does not meet.

A folder written by model2vec's ``StaticModel.save_pretrained`` (``benchmarks/
model2vec_distill.py`` makes one) holds ``model.safetensors`` (the ``embeddings`` matrix
``E`` [V, D], one row per token id), ``tokenizer.json`` (a ``tokenizers`` tokenizer) and
``config.json`` (``normalize``, ``max_length``). :class:`Model2VecEncoder` encodes a text as
model2vec 0.10's ``StaticModel.encode`` does:

* the text is cut to its first ``max_length * m`` characters, ``m`` the median length of the
  vocabulary's token strings (``int`` of the median);
* it is tokenised without special tokens (``add_special_tokens=False``), without padding and
  truncated to ``max_length`` tokens (no cut at all when ``max_length`` is null);
* the unknown token's id is dropped (a text of unknown tokens alone has no token);
* ``e = (1/n) sum_i E[t_i]`` over its ``n`` remaining tokens (zeros when ``n = 0``), then
  ``e / |e|`` when ``normalize`` (zeros stay zeros).

Rows are gathered in the stored dtype (float16 for a default distillation) and averaged in
float32, where model2vec averages float16 rows into a float16 result; its ``encode`` with the
vectors widened to float32 is the exact counterpart, and ``encode_check.json`` (written by the
distillation script) holds both for :func:`check_encoding`. The output is a sentence encoder's
(``{"sentence_embedding": [B, D]}``), so :func:`kdistill.evaluate.predict` and
:func:`kdistill.evaluate.benchmark_models` treat it as they treat kdistill's own; the vectors
are a frozen parameter, so its size and parameter count are the table's.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.taps import SENTENCE_EMBEDDING

EMBEDDINGS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
# Written beside the model by benchmarks/model2vec_distill.py (run in model2vec's environment,
# where this module is not importable: the names are repeated there).
RECORD_FILE = "distillation.json"
CHECK_FILE = "encode_check.json"
EMBEDDINGS_KEY = "embeddings"
QUANTIZED_KEYS = ("weights", "mapping")  # written by model2vec's vocabulary quantization
DEFAULT_MAX_LENGTH = 512  # model2vec's when the config names none
TOLERANCE = 1e-5  # largest difference from model2vec's float32 encoding check_encoding accepts


def unknown_id(tokenizer: Tokenizer) -> int | None:
    """The id of ``tokenizer``'s unknown token: its model's ``unk_token`` (WordPiece, BPE,
    WordLevel), else the ``unk_id`` of its saved form (Unigram); ``None`` without one."""
    model = tokenizer.model
    if hasattr(model, "unk_token"):
        return None if model.unk_token is None else tokenizer.token_to_id(model.unk_token)
    return json.loads(tokenizer.to_str())["model"].get("unk_id")


class Model2VecEncoder(nn.Module):
    """A Model2Vec model: ``forward`` takes a list of raw texts and answers
    ``{"sentence_embedding": [B, D]}`` in float32 (see the module doc)."""

    def __init__(self, vectors: Tensor, tokenizer: Tokenizer, normalize: bool,
                 max_length: int | None = DEFAULT_MAX_LENGTH):
        super().__init__()
        vocabulary = tokenizer.get_vocab()
        if vectors.dim() != 2 or vectors.shape[0] != len(vocabulary):
            raise KdistillError(f"model2vec vectors of shape {tuple(vectors.shape)} do not fit "
                                f"a tokenizer of {len(vocabulary)} tokens: expected "
                                f"[{len(vocabulary)}, width]")
        self.vectors = nn.Parameter(vectors, requires_grad=False)
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())  # own copy: cut set below
        self.tokenizer.no_padding()
        if max_length is None:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(max_length)
        self.normalize = normalize
        self.max_length = max_length
        self.unknown = unknown_id(self.tokenizer)
        median = int(statistics.median(len(token) for token in vocabulary))
        self.max_chars = None if max_length is None else max_length * median

    @classmethod
    def load(cls, folder: str | Path) -> Model2VecEncoder:
        """The model saved in ``folder`` by model2vec's ``save_pretrained``."""
        folder = Path(folder)
        for name in (EMBEDDINGS_FILE, TOKENIZER_FILE, CONFIG_FILE):
            if not (folder / name).is_file():
                raise KdistillError(f"{folder}: no {name}; not a folder saved by model2vec's "
                                    "StaticModel.save_pretrained")
        try:
            tensors = load_file(str(folder / EMBEDDINGS_FILE))
        except (OSError, SafetensorError) as error:
            raise KdistillError(f"{folder / EMBEDDINGS_FILE}: unreadable ({error})") from None
        if EMBEDDINGS_KEY not in tensors:
            raise KdistillError(f"{folder / EMBEDDINGS_FILE}: no '{EMBEDDINGS_KEY}' tensor "
                                f"(it holds {sorted(tensors)})")
        quantized = [key for key in QUANTIZED_KEYS if key in tensors]
        if quantized:
            raise KdistillError(f"{folder / EMBEDDINGS_FILE}: holds {quantized}, written by "
                                "model2vec's vocabulary quantization, which this reader does "
                                "not apply")
        try:
            tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            config = json.loads((folder / CONFIG_FILE).read_text())
        except Exception as error:  # tokenizers raises a bare Exception for a bad file
            raise KdistillError(f"{folder}: unreadable {TOKENIZER_FILE} or {CONFIG_FILE} "
                                f"({error})") from None
        return cls(tensors[EMBEDDINGS_KEY], tokenizer, bool(config.get("normalize", False)),
                   config.get("max_length", DEFAULT_MAX_LENGTH))

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as model2vec's ``encode`` takes them (module doc)."""
        wrong = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if wrong:
            raise KdistillError(f"model2vec encodes single texts; input {wrong[0]} is a "
                                f"{type(texts[wrong[0]]).__name__}")
        cut = [text[:self.max_chars] for text in texts] if self.max_chars is not None else texts
        encodings = self.tokenizer.encode_batch_fast(list(cut), add_special_tokens=False)
        return [[i for i in encoding.ids if i != self.unknown] for encoding in encodings]

    def forward(self, input: Sequence[str]) -> dict[str, Tensor]:
        ids = self.token_ids(input)
        counts = torch.tensor([len(row) for row in ids])
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
        rows = self.vectors[flat].float()  # gather in the stored dtype, average in float32
        texts = torch.repeat_interleave(torch.arange(len(ids)), counts)
        sums = torch.zeros(len(ids), self.vectors.shape[1]).index_add_(0, texts, rows)
        embedding = sums / counts.clamp_min(1).unsqueeze(1)
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return {SENTENCE_EMBEDDING: embedding}


def check_encoding(model: Model2VecEncoder, folder: Path) -> dict[str, Any]:
    """The largest differences between ``model``'s embeddings of the texts of ``folder``'s
    ``encode_check.json`` and model2vec's own (``encode_float32``: the vectors widened to
    float32; ``encode``: as stored); a :class:`KdistillError` when the first exceeds
    :data:`TOLERANCE`."""
    path = folder / CHECK_FILE
    try:
        check = json.loads(path.read_text())
        texts, expected = check["texts"], {key: torch.tensor(check[key])
                                           for key in ("encode_float32", "encode")}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KdistillError(f"{path}: unreadable ({error!r})") from None
    with torch.inference_mode():
        found = model(texts)[SENTENCE_EMBEDDING]
    shapes = {key: tuple(values.shape) for key, values in expected.items()}
    if any(shape != tuple(found.shape) for shape in shapes.values()):
        raise KdistillError(f"{path}: model2vec's embeddings have shapes {shapes}, this "
                            f"reader's {tuple(found.shape)}: the check is of another model")
    differences = {key: float((found - values).abs().max()) for key, values in expected.items()}
    if not differences["encode_float32"] <= TOLERANCE:
        raise KdistillError(f"{path}: embeddings differ from model2vec's by up to "
                            f"{differences['encode_float32']:.2e} (more than {TOLERANCE:g}); "
                            "this reader no longer encodes as that model2vec does")
    return {"texts": len(texts), "max_abs_difference": differences["encode_float32"],
            "max_abs_difference_float16": differences["encode"]}
