"""Benchmark results saved after every run, and taken up again by a rerun of the same
protocol (a benchmark's protocol is its module docstring: change the protocol, and the saved
runs no longer count)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdistill.checkpoint import atomic_write_text


def saved_results(path: Path, fresh: bool, protocol: str, start: Mapping[str, Any],
                  keep: Sequence[str] = ()) -> dict[str, Any]:
    """The results a run starts from: ``protocol``, each key of ``start`` (its value there
    when nothing is saved) and, from an earlier run of the same ``protocol`` saved at
    ``path``, the saved values of ``start``'s keys and of ``keep``'s. Nothing saved counts
    when ``fresh``."""
    results = {"protocol": protocol, **copy.deepcopy(dict(start))}
    if not fresh and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("protocol") == protocol:
            results.update({key: saved[key] for key in (*start, *keep) if key in saved})
    return results


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """Save ``results`` at ``path`` atomically (a kill leaves the previous file whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1, default=str) + "\n")
