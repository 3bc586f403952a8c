"""Augmented copies of raw training text, to enlarge the unlabelled transfer set of text KD.

TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding",
Algorithm 1, data augmentation) distils on many more sentences than the training set holds:
every word ``w_i`` of a sentence gets K candidate replacements ``C_i`` once (from a masked
language model when ``w_i`` is a single word piece, from the GloVe neighbours of ``w_i``
otherwise), then each of N copies replaces every word independently::

    w'_i = u_i ~ Uniform(C_i)  with probability p_t,   w'_i = w_i  otherwise

(their values: p_t = 0.4, K = 15, N = 20). Here GloVe is replaced by the teacher's own input
embedding matrix (:class:`EmbeddingNeighbours`), so no extra download is needed, and the copies
may also go through the EDA operations of Wei & Zou 2019 ("EDA: Easy Data Augmentation
Techniques for Boosting Performance on Text Classification Tasks"): random swap
(:func:`word_swap`) and random deletion (:func:`word_dropout`).

Words. A sentence is split by :data:`WORD_PATTERN` into words and punctuation marks (each mark
its own "word"): ``"Don't panic, Bob!"`` -> ``["Don't", "panic", ",", "Bob", "!"]``. Only
alphabetic words are ever replaced; punctuation, numbers and words with an apostrophe stay.
:func:`join_words` joins the words back with single spaces, closing punctuation attached to the
word before it and opening brackets to the word after; splitting the joined text gives the same
words again.

Token classification (word lists with one tag per word): replacement puts one word in place of
one word, so the tags stay valid and :func:`augment_tagged` keeps them. Swapping and dropping
words would break labelled spans (a ``B-PER I-PER`` pair swapped becomes ``I-PER B-PER``), so
:func:`augment_tagged` refuses settings with ``p_dropout`` or ``n_swaps``.

Loading a teacher's folder follows :mod:`kdistill.models.hf`: local folders only, weights from
safetensors only (the embedding matrix is read with ``safetensors``, nothing is unpickled), no
code from the folder is run.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdistill.errors import KdistillError
from kdistill.models.hf import UnsafeModelFolder, folder_problems, load_tokenizer, model_folder
from kdistill.models.hf_weights import read_word_embeddings
from kdistill.progress import TrainingProgress
from kdistill.settings import Seed, Strict

#: A word is a run of letters/digits/underscores, possibly joined by apostrophes (``don't``,
#: ``l’eau``); every other non-space character is a word of its own (punctuation).
WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
CLOSING = frozenset(".,;:!?)]}")  # attached to the word before
OPENING = frozenset("([{")  # attached to the word after
#: The name, in a safetensors file, of a transformer's input embedding matrix ends with this.

Tag = TypeVar("Tag")
Method = Literal["embedding", "mlm", "none"]


def split_words(text: str) -> list[str]:
    """The words and punctuation marks of ``text`` (see :data:`WORD_PATTERN`)."""
    return WORD_PATTERN.findall(text)


def join_words(words: Sequence[str]) -> str:
    """``words`` joined by single spaces, with no space before a closing mark (``.,;:!?)]}``)
    or after an opening bracket; ``split_words(join_words(w)) == w`` for words of
    :func:`split_words`."""
    out: list[str] = []
    for i, word in enumerate(words):
        if i and word not in CLOSING and words[i - 1] not in OPENING:
            out.append(" ")
        out.append(word)
    return "".join(out)


def replaceable(word: str) -> bool:
    """Whether a word may be replaced: alphabetic words only (no punctuation or numbers)."""
    return word.isalpha()


# ------------------------------------------------------------------------------ EDA operations


def _check_words(fn: str, words: Sequence[str]) -> None:
    if not words:
        raise ValueError(f"{fn}: needs at least one word, got an empty sentence")


def word_dropout(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Each word removed with probability ``p`` (EDA's random deletion); when every word is
    drawn, one of them, chosen uniformly, is kept, so the result is never empty."""
    _check_words("word_dropout", words)
    if not 0 <= p <= 1:
        raise ValueError(f"word_dropout: p must be in [0, 1], got {p}")
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(list(words))]


def word_swap(words: Sequence[str], n_swaps: int, rng: random.Random) -> list[str]:
    """``n_swaps`` times, two distinct positions drawn uniformly trade their words (EDA's
    random swap). Length and multiset of words are unchanged; a one-word sentence is
    returned as it is."""
    _check_words("word_swap", words)
    if n_swaps < 0:
        raise ValueError(f"word_swap: n_swaps must be >= 0, got {n_swaps}")
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n_swaps):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def replace_words(words: Sequence[str], candidates: Sequence[Sequence[str]], p: float,
                  rng: random.Random) -> list[str]:
    """Each word that has candidates replaced, with probability ``p``, by one of them drawn
    uniformly (TinyBERT's Alg. 1); words without candidates stay."""
    if len(candidates) != len(words):
        raise ValueError(f"replace_words: {len(candidates)} candidate lists for {len(words)} "
                         "words")
    if not 0 <= p <= 1:
        raise ValueError(f"replace_words: p must be in [0, 1], got {p}")
    return [rng.choice(c) if c and rng.random() < p else w
            for w, c in zip(words, candidates, strict=True)]


class WordReplacer(Protocol):
    """Proposes replacements for the words of a sentence."""

    def candidates(self, words: Sequence[str], k: int) -> list[list[str]]:
        """Up to ``k`` replacements for each word of ``words`` (empty: leave the word)."""
        ...

    def prepare(self, sentences: Sequence[Sequence[str]], k: int) -> None:
        """Work out at once what does not depend on a word's context, for every word of
        ``sentences`` (called before a corpus is augmented)."""
        ...


class _Replacer(ABC):
    """``replace`` for a class with ``candidates``."""

    @abstractmethod
    def candidates(self, words: Sequence[str], k: int) -> list[list[str]]:
        """Up to ``k`` replacements for each word of ``words`` (empty: leave the word)."""

    @abstractmethod
    def prepare(self, sentences: Sequence[Sequence[str]], k: int) -> None:
        """Work out at once what does not depend on a word's context (see WordReplacer)."""

    def replace(self, words: Sequence[str], p: float, k: int,
                rng: random.Random) -> list[str]:
        """Each word with candidates replaced with probability ``p`` by one of its top ``k``
        (uniformly)."""
        return replace_words(words, self.candidates(words, k), p, rng)


# ---------------------------------------------------------------------- embedding neighbours


def top_k_cosine(queries: Tensor, keys: Tensor, k: int,
                 chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The ``k`` rows of ``keys`` [N, D] most cosine-similar to each row of ``queries`` [Q, D]:
    similarities and indices [Q, k], best first. Only ``chunk`` query rows are compared at a
    time, so memory stays ``chunk x N`` (never ``Q x N``)."""
    if k > keys.shape[0]:
        raise ValueError(f"top_k_cosine: k={k} but only {keys.shape[0]} keys")
    keys = F.normalize(keys.float(), dim=1)
    values, indices = [], []
    for start in range(0, queries.shape[0], chunk):
        part = F.normalize(queries[start:start + chunk].float(), dim=1)
        best = (part @ keys.T).topk(k, dim=1)
        values.append(best.values)
        indices.append(best.indices)
    if not values:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(values), torch.cat(indices)


def whole_word_ids(tokenizer: Any) -> list[int]:
    """Ids of the vocabulary entries that are whole words (sorted): alphabetic, which rules
    out ``##`` continuation pieces, punctuation and bracketed tokens such as ``[MASK]``, and
    not a special token (some tokenizers have alphabetic ones)."""
    special = set(tokenizer.all_special_ids)
    return sorted(i for token, i in tokenizer.get_vocab().items()
                  if token.isalpha() and i not in special)


class EmbeddingNeighbours(_Replacer):
    """Nearest whole-word neighbours of words in a teacher's input embedding space.

    A word's vector is its word piece's row of the embedding matrix ``E`` (the mean of its
    pieces' rows when the tokenizer splits it, so that every known word has neighbours); its
    candidates are the ``k`` whole-word vocabulary entries (:func:`whole_word_ids`) of highest
    cosine similarity, the word's own entry excluded. Words that are not alphabetic, or whose
    pieces include the unknown token, have none. Neighbours are computed for many words at
    once, in chunks (:func:`top_k_cosine`), and cached.
    """

    def __init__(self, tokenizer: Any, embeddings: Tensor, chunk: int = 1024):
        self.tokenizer = tokenizer
        self.embeddings = embeddings.detach().float().cpu()
        self.chunk = chunk
        self.candidate_ids = whole_word_ids(tokenizer)
        if not self.candidate_ids:
            raise KdistillError("EmbeddingNeighbours: the tokenizer has no whole-word entries "
                                "(alphabetic, not '##' pieces, not special tokens); it needs a "
                                "WordPiece vocabulary such as BERT's")
        if self.candidate_ids[-1] >= self.embeddings.shape[0]:
            raise KdistillError(f"EmbeddingNeighbours: the vocabulary has id "
                                f"{self.candidate_ids[-1]} but the embedding matrix only "
                                f"{self.embeddings.shape[0]} rows")
        self.candidate_tokens = self.tokenizer.convert_ids_to_tokens(self.candidate_ids)
        self._cache: dict[tuple[str, int], list[str]] = {}

    @classmethod
    def from_folder(cls, path: str | Path, where: str = "teacher",
                    chunk: int = 1024) -> EmbeddingNeighbours:
        """From a local Hugging Face model folder: its tokenizer and the embedding matrix of
        its ``model.safetensors`` (:func:`read_word_embeddings`)."""
        folder = check_folder(path, where)
        return cls(load_tokenizer(folder), read_word_embeddings(folder), chunk=chunk)

    def word_pieces(self, word: str) -> list[int] | None:
        """The piece ids of ``word``, or None when it has no neighbours."""
        if not replaceable(word):
            return None
        pieces = self.tokenizer.tokenize(word)
        if not pieces or self.tokenizer.unk_token in pieces:
            return None
        return self.tokenizer.convert_tokens_to_ids(pieces)

    def neighbours(self, words: Iterable[str], k: int) -> dict[str, list[str]]:
        """The ``k`` nearest whole words of each word (empty lists for words without any)."""
        if k < 1:
            raise ValueError(f"EmbeddingNeighbours: k must be >= 1, got {k}")
        words = set(words)
        todo = sorted(w for w in words if (w, k) not in self._cache)
        pieces = {w: self.word_pieces(w) for w in todo}
        known = [w for w in todo if pieces[w] is not None]
        for w in todo:
            self._cache[w, k] = []
        if known:
            queries = torch.stack([self.embeddings[pieces[w]].mean(dim=0) for w in known])
            keys = self.embeddings[self.candidate_ids]
            depth = min(k + 1, len(self.candidate_ids))  # one more: the word itself drops out
            _, best = top_k_cosine(queries, keys, depth, self.chunk)
            for w, row in zip(known, best.tolist(), strict=True):
                own = pieces[w][0] if len(pieces[w]) == 1 else None
                found = [self.candidate_tokens[j] for j in row if self.candidate_ids[j] != own]
                self._cache[w, k] = found[:k]
        return {w: self._cache[w, k] for w in words}

    def candidates(self, words: Sequence[str], k: int) -> list[list[str]]:
        found = self.neighbours(words, k)
        return [list(found[w]) for w in words]

    def prepare(self, sentences: Sequence[Sequence[str]], k: int) -> None:
        """The neighbours of every word of ``sentences`` in one chunked pass (a corpus's
        thousands of distinct words cost one matrix product, not one per sentence)."""
        self.neighbours({w for words in sentences for w in words}, k)


# --------------------------------------------------------------------------- masked language model


class MaskedLMReplacement(_Replacer):
    """Replacements from a masked language model, in context (TinyBERT's main variant).

    For each alphabetic word that is a single word piece, a copy of the sentence with that
    piece replaced by the mask token goes through the model; its candidates are the ``k``
    whole-word entries (:func:`whole_word_ids`) with the highest scores at the masked
    position, the word's own piece excluded. All masked copies of a sentence run as one
    batch (at most ``batch_size`` rows per forward pass), in eval mode without gradients.
    Words that split into several pieces (or fall beyond the model's maximum length) get
    their embedding neighbours instead (``neighbours``; by default built from the model's
    own input embeddings).
    """

    def __init__(self, model: nn.Module, tokenizer: Any,
                 neighbours: EmbeddingNeighbours | None = None, batch_size: int = 64):
        if tokenizer.mask_token_id is None:
            raise KdistillError("MaskedLMReplacement: the tokenizer has no mask token")
        if batch_size < 1:
            raise ValueError(f"MaskedLMReplacement: batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if neighbours is None:
            neighbours = EmbeddingNeighbours(tokenizer, model.get_input_embeddings().weight)
        self.neighbours = neighbours
        self.batch_size = batch_size
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = min(tokenizer.model_max_length, positions or tokenizer.model_max_length)
        self._candidate_ids = torch.tensor(self.neighbours.candidate_ids)

    @classmethod
    def from_folder(cls, path: str | Path, where: str = "teacher",
                    batch_size: int = 64) -> MaskedLMReplacement:
        """From a local Hugging Face folder holding a model with its masked-LM head
        (``AutoModelForMaskedLM``) and its tokenizer."""
        folder = check_folder(path, where)
        from transformers import AutoModelForMaskedLM  # deferred: a slow import

        model = AutoModelForMaskedLM.from_pretrained(folder, local_files_only=True,
                                                     use_safetensors=True,
                                                     trust_remote_code=False)
        return cls(model, load_tokenizer(folder), batch_size=batch_size)

    def _single_pieces(self, words: Sequence[str]) -> tuple[dict[str, Tensor], dict[int, int]]:
        """The encoded sentence and {word index: token position} of its replaceable words
        that are one piece (other than the unknown token)."""
        encoded = self.tokenizer(list(words), is_split_into_words=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        spans: dict[int, list[int]] = {}
        for position, word in enumerate(encoded.word_ids(0)):
            if word is not None:
                spans.setdefault(word, []).append(position)
        ids = encoded["input_ids"][0]
        single = {w: span[0] for w, span in spans.items() if len(span) == 1
                  and replaceable(words[w]) and int(ids[span[0]]) != self.tokenizer.unk_token_id}
        return dict(encoded), single

    @torch.no_grad()
    def _predict(self, encoded: dict[str, Tensor], positions: list[int], k: int) -> list[list[str]]:
        """The top ``k`` whole words predicted at each of ``positions``, one masked at a time."""
        device = next(self.model.parameters()).device
        originals = encoded["input_ids"][0, positions]
        found: list[list[str]] = []
        for start in range(0, len(positions), self.batch_size):
            part = slice(start, start + self.batch_size)
            n = len(positions[part])
            batch = {key: value.expand(n, -1).clone() for key, value in encoded.items()}
            at = torch.tensor(positions[part])
            batch["input_ids"][torch.arange(n), at] = self.tokenizer.mask_token_id
            logits = self.model(**{key: v.to(device) for key, v in batch.items()}).logits
            masked = logits[torch.arange(n, device=device), at.to(device)].float().cpu()
            scores = masked[:, self._candidate_ids]
            scores[self._candidate_ids[None, :] == originals[part, None]] = float("-inf")
            depth = min(k, len(self.neighbours.candidate_ids) - 1)
            for row in scores.topk(depth, dim=1).indices.tolist():
                found.append([self.neighbours.candidate_tokens[j] for j in row])
        return found

    def prepare(self, sentences: Sequence[Sequence[str]], k: int) -> None:
        """The embedding neighbours the words of several pieces fall back on, all at once."""
        self.neighbours.prepare(sentences, k)

    def candidates(self, words: Sequence[str], k: int) -> list[list[str]]:
        if k < 1:
            raise ValueError(f"MaskedLMReplacement: k must be >= 1, got {k}")
        if not words:
            return []
        encoded, single = self._single_pieces(words)
        predictions = self._predict(encoded, list(single.values()), k)
        predicted = dict(zip(single, predictions, strict=True))
        rest = self.neighbours.neighbours([w for i, w in enumerate(words) if i not in single], k)
        return [predicted[i] if i in single else list(rest[w]) for i, w in enumerate(words)]


# ------------------------------------------------------------------------------ model folders


def check_folder(path: str | Path, where: str) -> Path:
    """``path`` as a folder kdistill loads safely (see :func:`kdistill.models.hf.folder_problems`,
    custom code always refused), else :class:`UnsafeModelFolder` naming ``<where>.path``."""
    problems = folder_problems(path, trust_remote_code=False, where=where)
    if problems:
        raise UnsafeModelFolder("; ".join(problems))
    return model_folder(path)


def load_replacer(method: Method, path: str | Path,
                  where: str = "teacher") -> WordReplacer | None:
    """The replacer for ``method`` built from the model folder ``path`` (None for ``none``)."""
    if method == "embedding":
        return EmbeddingNeighbours.from_folder(path, where)
    if method == "mlm":
        return MaskedLMReplacement.from_folder(path, where)
    return None


# ---------------------------------------------------------------------------------- corpora


class TextAugmentSettings(Strict):
    """How the transfer set is enlarged (a ``data.augment:`` section).

    ``copies`` augmented copies per sentence (TinyBERT's N), each word replaced with
    probability ``p_replace`` (p_t) by one of its ``k`` candidates (K) from ``method``
    (``embedding``: :class:`EmbeddingNeighbours`, ``mlm``: :class:`MaskedLMReplacement`,
    ``none``: no replacement), then ``n_swaps`` random swaps and a word dropout of rate
    ``p_dropout`` (EDA). ``seed`` makes the copies reproducible. ``model`` is the local
    model folder (usually the teacher's) whose word embeddings or masked-LM head give the
    candidates; only ``method: none`` does without it.
    """

    copies: int = Field(default=20, ge=1, le=1000)
    p_replace: float = Field(default=0.4, ge=0, le=1)
    k: int = Field(default=15, ge=1)
    p_dropout: float = Field(default=0.0, ge=0, lt=1)
    n_swaps: int = Field(default=0, ge=0)
    method: Method = "embedding"
    seed: Seed = 0
    model: str | None = None

    @property
    def replaces(self) -> bool:
        return self.method != "none" and self.p_replace > 0

    @model_validator(mode="after")
    def _changes_something(self) -> TextAugmentSettings:
        if not (self.replaces or self.p_dropout > 0 or self.n_swaps > 0):
            raise ValueError("these settings change no word (method none or p_replace 0, "
                             "p_dropout 0, n_swaps 0): set at least one of them")
        if self.replaces and self.model is None:
            raise ValueError(f"method '{self.method}' takes its candidates from a model: set "
                             "'model' to a local model folder (e.g. the teacher's)")
        return self

    def replacer(self) -> WordReplacer | None:
        """The word replacer these settings ask for (None when no word is replaced)."""
        if not self.replaces:
            return None
        assert self.model is not None
        return load_replacer(self.method, self.model, "data.augment.model")


def _augmented(sentences: Sequence[Sequence[str]], settings: TextAugmentSettings,
               replacer: WordReplacer | None, progress: bool) -> Iterator[tuple[int, list[str]]]:
    """(sentence index, new words) for every copy that differs from every sentence and from
    every earlier copy; sentences without words are skipped."""
    if not settings.replaces:
        replacer = None
    elif replacer is None:
        raise KdistillError(f"data.augment.method: '{settings.method}' needs a word replacer "
                            "(see load_replacer); none was given")
    if replacer is not None:
        replacer.prepare(sentences, settings.k)
    rng = random.Random(settings.seed)
    seen = {tuple(words) for words in sentences}
    bar = TrainingProgress(enabled=progress)
    bar.start_phase("text augmentation", total=len(sentences))
    try:
        for index, words in enumerate(sentences):
            if words:
                candidates = (replacer.candidates(words, settings.k)
                              if replacer is not None else None)
                for _ in range(settings.copies):
                    new = (replace_words(words, candidates, settings.p_replace, rng)
                           if candidates is not None else list(words))
                    if settings.n_swaps:
                        new = word_swap(new, settings.n_swaps, rng)
                    if settings.p_dropout:
                        new = word_dropout(new, settings.p_dropout, rng)
                    if tuple(new) not in seen:
                        seen.add(tuple(new))
                        yield index, new
            bar.advance({})
    finally:
        bar.stop()


def augment_corpus(texts: Sequence[str], settings: TextAugmentSettings,
                   replacer: WordReplacer | None = None, progress: bool = True) -> list[str]:
    """Up to ``settings.copies`` augmented copies of each text, in the order of ``texts``.

    Copies identical (as word sequences) to any original text or to an earlier copy are
    dropped, so the result holds at most ``copies * len(texts)`` new texts. The same texts,
    settings and replacer give the same list. ``replacer`` is required unless the settings
    do not replace words.
    """
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if bad:
        raise KdistillError(f"augment_corpus: texts must be strings; text {bad[0]} is a "
                            f"{type(texts[bad[0]]).__name__}")
    sentences = [split_words(text) for text in texts]
    return [join_words(words) for _, words in _augmented(sentences, settings, replacer,
                                                         progress)]


def augment_tagged(samples: Sequence[tuple[Sequence[str], Sequence[Tag]]],
                   settings: TextAugmentSettings, replacer: WordReplacer | None = None,
                   progress: bool = True) -> list[tuple[list[str], list[Tag]]]:
    """:func:`augment_corpus` for token classification: ``(words, tags)`` pairs in, new
    ``(words, tags)`` pairs out, each copy keeping its sentence's tags (word replacement only;
    word dropout and swaps are refused because they break labelled spans)."""
    moving = [f"data.augment.{name}" for name in ("p_dropout", "n_swaps")
              if getattr(settings, name)]
    if moving:
        raise KdistillError(f"{' and '.join(moving)}: token classification data keeps one tag "
                            "per word, so only word replacement is allowed (dropping or "
                            "swapping words breaks labelled spans); set them to 0")
    for i, (words, tags) in enumerate(samples):
        if len(words) != len(tags):
            raise KdistillError(f"augment_tagged: sentence {i} has {len(words)} words but "
                                f"{len(tags)} tags")
    sentences = [list(words) for words, _ in samples]
    return [(words, list(samples[i][1]))
            for i, words in _augmented(sentences, settings, replacer, progress)]
