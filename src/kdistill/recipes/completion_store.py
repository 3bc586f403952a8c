"""A folder of a teacher's completions of prompts, made once and reused (``seqkd``).

The folder is ``<root>/<key>``, the key the SHA-256 of the teacher's fingerprint (its weights:
:func:`kdistill.cache.format.teacher_fingerprint`) and of the generation settings: another
teacher or other settings use another folder, so nothing made by one is read for the other.
Inside, ``manifest.json`` records the fingerprint and the settings, and each generation writes
one shard, ``<sha256 of its prompts>.json`` holding its prompts and completions as token ids
(of the teacher's tokenizer). The data is fingerprinted per prompt: a completion is looked up
by its prompt's token ids, so a rerun on the same data generates nothing, and a changed data
set generates the completions of its new prompts alone. Every file is written to a temporary
name and renamed (:func:`kdistill.checkpoint.atomic_write_text`): an interrupted generation
leaves whole shards only, which a rerun reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill.checkpoint import atomic_write_text
from kdistill.errors import KdistillError

MANIFEST = "manifest.json"
Prompt = tuple[int, ...]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


class CompletionStore:
    """The completions kept in ``folder`` (see the module doc), by prompt."""

    def __init__(self, folder: Path, completions: dict[Prompt, list[int]]):
        self.folder = folder
        self.completions = completions

    @classmethod
    def open(cls, root: str | Path, teacher: str, settings: Mapping[str, Any]
             ) -> CompletionStore:
        """The store of the teacher with fingerprint ``teacher`` and generation ``settings``
        under ``root``: its shards read, or a new folder."""
        identity = {"teacher": teacher, "settings": dict(settings)}
        folder = Path(root) / _digest(identity)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest, json.dumps(identity, indent=1) + "\n")
            return cls(folder, {})
        found = read_json(manifest)
        if found != identity:
            raise KdistillError(f"{manifest}: holds the completions of another teacher or other "
                                f"settings ({found.get('settings')}); delete the folder")
        completions: dict[Prompt, list[int]] = {}
        for shard in sorted(folder.glob("*.json")):
            if shard.name == MANIFEST:
                continue
            entry = read_json(shard)
            for prompt, completion in zip(entry["prompts"], entry["completions"], strict=True):
                completions[tuple(prompt)] = list(completion)
        return cls(folder, completions)

    def missing(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The distinct ``prompts`` without a completion, in order of first appearance."""
        wanted = dict.fromkeys(tuple(p) for p in prompts if tuple(p) not in self.completions)
        return [list(p) for p in wanted]

    def add(self, prompts: Sequence[Sequence[int]],
            completions: Sequence[Sequence[int]]) -> None:
        """Keep ``completions`` of ``prompts``, written as one shard."""
        entry = {"prompts": [list(p) for p in prompts],
                 "completions": [list(c) for c in completions]}
        atomic_write_text(self.folder / f"{_digest(entry['prompts'])}.json", json.dumps(entry))
        for prompt, completion in zip(prompts, completions, strict=True):
            self.completions[tuple(prompt)] = list(completion)

    def __getitem__(self, prompt: Sequence[int]) -> list[int]:
        return self.completions[tuple(prompt)]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of the store, or a :class:`KdistillError` naming it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KdistillError(f"{path}: unreadable ({error}); delete it to generate its "
                            "completions again") from None
    if not isinstance(value, dict):
        raise KdistillError(f"{path}: not a completion store file; delete it")
    return value
