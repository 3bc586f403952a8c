"""Hugging Face tokenizers and transformers as kdistill text models, and their export.

:class:`HFTextEncoder` is a :class:`~kdistill.models.text.TextEncoder` around a fast tokenizer:
each batch is padded to its longest text (never to ``max_length``) and truncated at
``max_length``; ``(text, pair)`` tuples get the tokenizer's pair encoding (``token_type_ids``
1 on the second segment); word lists are encoded with ``is_split_into_words`` and each word's
first sub-token is its :data:`~kdistill.models.text.WORD_STARTS` position, where its label is
read (as BERT's taggers do).

:func:`build_hf_text` is the ``hf_text`` model builder: a local folder's network (sequence
classification, regression or token classification, from the data's task) behind its own
tokenizer. :func:`export_pretrained` writes a text model back as a plain transformers folder.

transformers is imported inside the functions that use it: the registry imports this module
when kdistill starts, and transformers takes seconds to import (the CLI must start fast).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import Field, StrictBool
from torch import Tensor, nn

from kdistill.batch import Task
from kdistill.errors import KdistillError
from kdistill.models.hf import folder_problems, load_hf_model, load_tokenizer, tokenizer_problems
from kdistill.models.text import WORD_STARTS, RawText, TextModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MaxLength = Annotated[int, Field(ge=2)]  # room for the special tokens around a text
# Backend settings that change with each call (the truncation and padding last asked for),
# not the tokens a text becomes: left out of the tokenisation digest.
CALL_STATE = ("truncation", "padding")


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """``<class>:<sha256 prefix>`` of everything that decides a fast tokenizer's tokens:
    vocabulary and model (merges...), added tokens, normalizer (lowercasing, accents),
    pre-tokenizer and post-processor (special tokens). Equal for the same tokenizer saved in
    two folders; different as soon as one token id would differ."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    for key in CALL_STATE:
        state.pop(key, None)
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    return f"{type(tokenizer).__name__}:{digest}"


def _kind(texts: Sequence[RawText]) -> str:
    """``text``, ``pair`` or ``words``: the one kind of raw text in a batch."""
    kinds = {"pair" if isinstance(t, tuple) else "text" if isinstance(t, str) else "words"
             for t in texts}
    if len(kinds) != 1:
        raise KdistillError(f"a text batch mixes {' and '.join(sorted(kinds))} inputs; give "
                            "one kind per data set (strings, (text, pair) tuples or word lists)")
    return kinds.pop()


class HFTextEncoder:
    """A fast Hugging Face tokenizer as a :class:`~kdistill.models.text.TextEncoder`.

    ``token_type_ids`` says whether to return them (``None``: the tokenizer's default); a
    network whose forward does not take them gets ``False``. ``tokenisation`` is
    :func:`tokenizer_digest` plus ``max_length``: two encoders with the same name produce the
    same tokens, so token-level taps between their models line up.

    Words of a word list that get no token (cut off by ``max_length``, or empty after the
    tokenizer's normalisation) point at position 0 (the ``[CLS]`` token): their per-word
    logits are that token's, so their labels train it instead of the word. They are counted
    in ``words_without_token`` and the first batch with any warns; raise ``max_length`` (or
    split long sentences) to keep every word.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 128,
                 token_type_ids: bool | None = None):
        if not tokenizer.is_fast:
            raise KdistillError(f"{type(tokenizer).__name__} is not a fast tokenizer; "
                                "HFTextEncoder needs one to align words and tokens")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.token_type_ids = token_type_ids
        self.tokenisation = f"{tokenizer_digest(tokenizer)}:max_length={max_length}"
        self.words_without_token = 0

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int = 128,
                    trust_remote_code: bool = False,
                    token_type_ids: bool | None = None) -> HFTextEncoder:
        """The encoder of the tokenizer saved in the local folder ``path``
        (:func:`~kdistill.models.hf.load_tokenizer`: no hub, no custom code unless asked)."""
        return cls(load_tokenizer(path, trust_remote_code), max_length, token_type_ids)

    def __call__(self, texts: Sequence[RawText]) -> dict[str, Tensor]:
        texts = list(texts)
        kind = _kind(texts)
        options: dict[str, Any] = {"padding": "longest", "truncation": True,
                                   "max_length": self.max_length, "return_tensors": "pt",
                                   "return_token_type_ids": self.token_type_ids}
        if kind == "pair":
            encoded = self.tokenizer([t[0] for t in texts], [t[1] for t in texts], **options)
        elif kind == "words":
            encoded = self.tokenizer([list(t) for t in texts], is_split_into_words=True,
                                     **options)
        else:
            encoded = self.tokenizer(texts, **options)
        result = dict(encoded.items())
        if kind == "words":
            result[WORD_STARTS] = self._word_starts(encoded, [len(t) for t in texts])
        return result

    def _word_starts(self, encoded: Any, lengths: Sequence[int]) -> Tensor:
        """[B, W]: the position of each word's first sub-token (0 for padding words and for
        words without a token)."""
        starts = torch.zeros(len(lengths), max(lengths, default=0), dtype=torch.long)
        missing = 0
        for row, length in enumerate(lengths):
            seen: set[int] = set()
            for position, word in enumerate(encoded.word_ids(row)):
                if word is not None and word not in seen:
                    starts[row, word] = position
                    seen.add(word)
            missing += length - len(seen)
        if missing and not self.words_without_token:
            warnings.warn(
                f"{missing} word(s) of this batch have no token within max_length="
                f"{self.max_length} (cut off, or empty after normalisation): their logits are "
                "read at position 0, so their labels train that token instead of the word; "
                "raise max_length or split long sentences", stacklevel=3)
        self.words_without_token += missing
        return starts

    def save(self, folder: Path) -> None:
        """``save_pretrained`` of the tokenizer, with ``model_max_length`` set to this
        encoder's ``max_length`` so that plain transformers truncates the same way."""
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(folder)


def takes_token_type_ids(network: nn.Module) -> bool | None:
    """``False`` when ``network``'s forward has no ``token_type_ids`` argument, else ``None``
    (the tokenizer decides)."""
    return None if "token_type_ids" in inspect.signature(network.forward).parameters else False


def load_text_model(path: str | Path, task: Task = "classification", num_labels: int = 2,
                    max_length: int = 128, trust_remote_code: bool = False) -> TextModel:
    """The network of the local folder ``path`` for ``task`` (a new head when ``num_labels``
    differs from the checkpoint's; one output for regression) behind the folder's tokenizer."""
    network = load_hf_model(path, task=task, num_labels=num_labels,
                            trust_remote_code=trust_remote_code)
    encoder = HFTextEncoder.from_folder(path, max_length, trust_remote_code,
                                        takes_token_type_ids(network))
    return TextModel(encoder, network)


def build_hf_text(input_shape: Sequence[int], num_classes: int, path: str,
                  max_length: MaxLength = 128, trust_remote_code: StrictBool = False, *,
                  task: Task = "classification") -> nn.Module:
    """The ``hf_text`` model: a transformers network and its tokenizer from the local folder
    ``path``, reading raw text (``input_shape`` is unused). ``task`` comes from the data:
    ``AutoModelForSequenceClassification`` for classification and regression (one output),
    ``AutoModelForTokenClassification`` for token classification (per-word logits).
    ``trust_remote_code`` as for ``hf`` (see :mod:`kdistill.models.hf`)."""
    return load_text_model(path, task, num_classes, max_length, trust_remote_code)


def hf_text_files(options: Mapping[str, Any], where: str) -> list[str]:
    """What keeps ``hf_text``'s folder from loading safely (config validation, nothing loaded):
    the model folder's problems, then its tokenizer's."""
    trust = options.get("trust_remote_code", False)
    return (folder_problems(options["path"], trust, where)
            or tokenizer_problems(options["path"], trust, where))


def export_pretrained(model: TextModel, folder: str | Path,
                      label_names: Sequence[str] | None = None) -> Path:
    """Write ``model`` (a :class:`TextModel` of a transformers network and an
    :class:`HFTextEncoder`) as a plain transformers folder: the network's ``save_pretrained``
    (safetensors) and the tokenizer's, so ``AutoModelFor...from_pretrained(folder)`` and
    ``AutoTokenizer.from_pretrained(folder)`` give the same logits without kdistill.
    ``label_names`` (one per output) become the config's ``id2label``/``label2id`` (set on the
    model's config too). Returns the folder."""
    network, encoder = model.model, model.encoder
    if not hasattr(network, "save_pretrained") or not isinstance(encoder, HFTextEncoder):
        raise KdistillError(f"export_pretrained needs a TextModel of a transformers network and "
                            f"an HFTextEncoder, got {type(network).__name__} with "
                            f"{type(encoder).__name__}")
    if label_names is not None:
        names = [str(name) for name in label_names]
        expected = network.config.num_labels
        if len(names) != expected or len(set(names)) != len(names):
            raise KdistillError(f"label_names: expected {expected} distinct names (one per "
                                f"output of the model), got {names}")
        network.config.id2label = dict(enumerate(names))
        network.config.label2id = {name: i for i, name in enumerate(names)}
    folder = Path(folder)
    network.save_pretrained(folder)
    encoder.save(folder)
    return folder
