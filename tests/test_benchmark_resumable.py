"""Benchmark results taken up again by a rerun (``benchmarks/resumable.py``): only under the
same protocol, only the keys the benchmark names, never when asked for a fresh start."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from resumable import saved_results, write_json  # noqa: E402

PROTOCOL = "runs of three seeds"


def test_saved_runs_are_kept_only_under_the_same_protocol(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    saved = {"protocol": PROTOCOL, "runs": [{"variant": "ce", "seed": 0}],
             "teachers": [{"seed": 0}], "teacher": {"accuracy": 0.8}, "timing": {"1": 2.0}}
    write_json(path, saved)
    assert json.loads(path.read_text()) == saved
    start = {"runs": [], "teachers": []}
    assert saved_results(path, False, PROTOCOL, start, keep=("teacher",)) == {
        "protocol": PROTOCOL, "runs": [{"variant": "ce", "seed": 0}], "teachers": [{"seed": 0}],
        "teacher": {"accuracy": 0.8}}  # timing is not kept: a rerun measures it again
    assert saved_results(path, True, PROTOCOL, start) == {"protocol": PROTOCOL, **start}
    assert saved_results(path, False, "another protocol", start) == {
        "protocol": "another protocol", "runs": [], "teachers": []}
    assert saved_results(tmp_path / "none.json", False, PROTOCOL, {"runs": []},
                         keep=("teacher",)) == {"protocol": PROTOCOL, "runs": []}


def test_the_start_values_are_copies(tmp_path: Path) -> None:
    start: dict = {"runs": []}
    results = saved_results(tmp_path / "none.json", False, PROTOCOL, start)
    results["runs"].append(1)
    assert start == {"runs": []}
