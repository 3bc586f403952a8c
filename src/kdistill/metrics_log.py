"""The JSONL metrics log of a run: one JSON object per line, appended and flushed."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill.checkpoint import atomic_write_text


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
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def replace(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Rewrite the log atomically to hold exactly ``records`` (a fresh run passes none; a
        resumed run passes the history saved in its checkpoint, which is what was logged up to
        that checkpoint, so no step appears twice)."""
        if self.path is None:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a JSONL metrics log."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
