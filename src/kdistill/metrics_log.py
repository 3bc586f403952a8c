"""The JSONL metrics log of a run: one JSON object per line, appended and flushed.

Every line is strict JSON (RFC 8259), which has no NaN or infinity: a non-finite number is
written as ``null`` and the record gains ``"nonfinite": {pointer: "nan" | "inf" | "-inf"}``
keyed by the value's JSON Pointer (RFC 6901, e.g. ``"/eval_pearson"``). :func:`read_metrics`
puts the numbers back; any other JSON reader sees ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill.checkpoint import atomic_write_text

NONFINITE = "nonfinite"  # the record key that lists the non-finite numbers written as null
_NAMES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _pointer_token(key: object) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _encode(value: Any, pointer: str, found: dict[str, str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found[pointer] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, Mapping):
        return {k: _encode(v, f"{pointer}/{_pointer_token(k)}", found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, f"{pointer}/{i}", found) for i, v in enumerate(value)]
    return value


def encode_record(record: Mapping[str, Any]) -> str:
    """``record`` as one line of strict JSON (non-finite numbers as ``null``, listed under
    ``"nonfinite"``)."""
    if NONFINITE in record:
        raise ValueError(f"a metrics record cannot hold the key '{NONFINITE}', the log uses it "
                         "for non-finite numbers")
    found: dict[str, str] = {}
    encoded = _encode(record, "", found)
    if found:
        encoded[NONFINITE] = found
    return json.dumps(encoded, allow_nan=False)


def decode_record(line: str) -> dict[str, Any]:
    """Inverse of :func:`encode_record`. NaN/Infinity tokens (logs written before the log was
    strict) are read as well."""
    record = json.loads(line)
    for pointer, name in record.pop(NONFINITE, {}).items():
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
        parent = record
        for token in tokens[:-1]:
            parent = parent[int(token) if isinstance(parent, list) else token]
        parent[int(tokens[-1]) if isinstance(parent, list) else tokens[-1]] = _NAMES[name]
    return record


class MetricsLog:
    """Appends records to ``path`` (no-op when ``path`` is None, e.g. on non-main processes)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as handle:
            handle.write(encode_record(record) + "\n")
            handle.flush()

    def replace(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite the log atomically to hold exactly ``records`` (a fresh run passes none; a
        resumed run passes the history saved in its checkpoint, which is what was logged up to
        that checkpoint, so no step appears twice)."""
        if self.path is None:
            return
        atomic_write_text(self.path, "".join(encode_record(r) + "\n" for r in records))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL metrics log, non-finite numbers restored."""
    return [decode_record(line) for line in path.read_text().splitlines() if line.strip()]
