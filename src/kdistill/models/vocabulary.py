"""Word tokenisation, vocabularies and hashed n-gram features for the text students.

:func:`tokenize` lower-cases a text and splits it with :data:`WORD_PATTERN`: a run of word
characters (Unicode letters, digits and ``_``) is one token, every other non-space character
is a token of its own, and white space separates tokens. ``"Don't stop!"`` gives
``["don", "'", "t", "stop", "!"]``.

A :class:`Vocabulary` maps tokens to ids, with :data:`RESERVED` tokens first (padding,
unknown word, the separator between the two texts of a pair); an :class:`NGramHasher` maps a
token list to the ids of its n-grams: unigrams through the vocabulary, longer n-grams hashed
into buckets with CRC-32, which is the same in every process (Python's ``hash`` of a string is
salted per process).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kdistill.checkpoint import atomic_write_text
from kdistill.errors import KdistillError

WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
TOKENIZER = "lowercase-words-v1"  # names tokenize(): change it whenever tokenize changes
PAD, UNKNOWN, SEPARATOR = "<pad>", "<unk>", "<sep>"
RESERVED = (PAD, UNKNOWN, SEPARATOR)
PAD_ID, UNKNOWN_ID, SEPARATOR_ID = 0, 1, 2
VOCABULARY_FILE = "vocabulary.json"


class TextStudentFileError(KdistillError):
    """A saved text student's file (vocabulary, encoder, architecture, weights) that is
    missing or cannot be used."""


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and punctuation (see the module doc)."""
    return WORD_PATTERN.findall(text.lower())


def read_json(path: Path, what: str) -> Any:
    """The JSON content of ``path``; :class:`TextStudentFileError` naming the file when it is
    missing or is not JSON."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TextStudentFileError(f"{path} is missing: the folder holds no saved {what}") \
            from None
    except (OSError, ValueError) as error:
        raise TextStudentFileError(f"{path}: cannot read the {what}: {error}") from None


class Vocabulary:
    """Tokens and their ids: :data:`RESERVED` first (ids 0, 1, 2), then the words."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[:len(RESERVED)]) != RESERVED:
            raise ValueError(f"a vocabulary starts with the reserved tokens {list(RESERVED)}, "
                             f"got {words[:len(RESERVED)]}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary lists every token once")
        self.words = words
        self.index = {word: i for i, word in enumerate(words)}

    @classmethod
    def build(cls, texts: Iterable[str], max_size: int | None = None,
              min_count: int = 1) -> Vocabulary:
        """The tokens of ``texts`` seen at least ``min_count`` times, most frequent first (ties
        in alphabetical order), cut so that the vocabulary with its reserved tokens holds at
        most ``max_size`` entries."""
        if max_size is not None and max_size <= len(RESERVED):
            raise ValueError(f"max_size must exceed the {len(RESERVED)} reserved tokens, got "
                             f"{max_size}")
        counts = Counter(token for text in texts for token in tokenize(text))
        ranked = sorted((w for w, c in counts.items() if c >= min_count and w not in RESERVED),
                        key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[:max_size - len(RESERVED)]
        return cls([*RESERVED, *ranked])

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, tokens: Iterable[str]) -> list[int]:
        """The id of each token (:data:`UNKNOWN_ID` for a token not in the vocabulary)."""
        return [self.index.get(token, UNKNOWN_ID) for token in tokens]

    @property
    def digest(self) -> str:
        """A short SHA-256 digest of the tokeniser and the word list: same vocabulary, same
        digest."""
        content = json.dumps([TOKENIZER, self.words], ensure_ascii=False)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]

    @property
    def tokenisation(self) -> str:
        """The name of the token sequence this vocabulary gives (see ``TextEncoder``)."""
        return f"{TOKENIZER}:{self.digest}"

    def save(self, folder: Path) -> None:
        """Write ``vocabulary.json`` (the tokeniser's name and the words) into ``folder``."""
        atomic_write_text(Path(folder) / VOCABULARY_FILE,
                          json.dumps({"tokenizer": TOKENIZER, "words": self.words},
                                     ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        path = Path(folder) / VOCABULARY_FILE
        content = read_json(path, "vocabulary")
        if not isinstance(content, dict) or not isinstance(content.get("words"), list):
            raise TextStudentFileError(f"{path}: expected an object with a 'words' list")
        if content.get("tokenizer") != TOKENIZER:
            raise TextStudentFileError(f"{path}: written for tokenizer "
                                       f"{content.get('tokenizer')!r}, this is {TOKENIZER!r}")
        try:
            return cls(content["words"])
        except ValueError as error:
            raise TextStudentFileError(f"{path}: {error}") from None


def stable_bucket(gram: Sequence[str], buckets: int) -> int:
    """The bucket of an n-gram: CRC-32 of its tokens joined by single spaces (UTF-8), modulo
    ``buckets``. Tokens hold no spaces, so n-grams of different lengths stay distinct."""
    return zlib.crc32(" ".join(gram).encode("utf-8")) % buckets


class NGramHasher:
    """The ids of a token list's n-grams, for each ``n`` in ``n``.

    Unigrams take their vocabulary id (unknown words :data:`UNKNOWN_ID`); an n-gram with
    n > 1 (of the tokens themselves, so unknown words still tell n-grams apart) takes
    ``len(vocabulary) + stable_bucket(gram, buckets)``. The ids therefore lie in
    ``[0, rows)`` with ``rows = len(vocabulary) + buckets``; ``buckets`` may be 0 when ``n``
    holds unigrams only.
    """

    def __init__(self, vocabulary: Vocabulary, n: Sequence[int] = (1, 2, 3),
                 buckets: int = 1 << 16):
        if not n or any(k < 1 for k in n) or len(set(n)) != len(n):
            raise ValueError(f"n-gram lengths must be distinct positive integers, got {list(n)}")
        if buckets < 0 or (buckets == 0 and max(n) > 1):
            raise ValueError(f"buckets must be positive for n-grams longer than 1 (0 is for "
                             f"unigrams alone), got {buckets} for n-grams {sorted(n)}")
        self.vocabulary = vocabulary
        self.n = tuple(sorted(n))
        self.buckets = buckets

    @property
    def rows(self) -> int:
        """How many ids the hasher can give: the size of an embedding table over them."""
        return len(self.vocabulary) + self.buckets

    def __call__(self, tokens: Sequence[str]) -> list[int]:
        """Every n-gram id of ``tokens``: all unigrams in order, then all bigrams, ..."""
        ids: list[int] = []
        for k in self.n:
            if k == 1:
                ids += self.vocabulary.ids(tokens)
            else:
                ids += [len(self.vocabulary) + stable_bucket(tokens[i:i + k], self.buckets)
                        for i in range(len(tokens) - k + 1)]
        return ids

    def settings(self) -> dict[str, Any]:
        """The JSON-able settings that rebuild this hasher over the same vocabulary."""
        return {"n": list(self.n), "buckets": self.buckets}
