"""``kill -9`` at random points of training and checkpointing, then resume: a CI sample of the
campaign in ``benchmarks/fault_injection.py`` (which runs 20 kill points on demand)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import fault_injection  # noqa: E402


@pytest.mark.slow
def test_every_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path):
    # 4 kills in training runs (a checkpoint rename, the rename of a re-saved step while its
    # earlier version is aside, a checkpoint file, a step) and one in the first resume after
    # the second of them.
    results = fault_injection.campaign(tmp_path, kills=4, seed=1)
    problems = [f"kill at event {s['kill_at']} ({s['event']}): {problem}"
                for s in results["scenarios"] for problem in s["problems"]]
    assert problems == []
    summary = results["summary"]
    assert summary["identical_to_uninterrupted"] == summary["kills_in_training"] == 4
    assert summary["kills_in_resumes"] >= 1
    assert set(summary["kills_by_category"]) == {"checkpoint rename", "checkpoint re-save",
                                                  "checkpoint file", "step"}


def test_the_harness_sees_a_wrong_result_and_a_leftover(tmp_path):
    # The checks themselves: a differing student or log and a hidden file are reported.
    run_dir = tmp_path / "runs" / "x"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "student.safetensors").write_bytes(b"a")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "checkpoints" / ".step-00000004.tmp-1").mkdir()
    (tmp_path / "runs" / ".x.replaced-1").mkdir()
    found = fault_injection.summary(run_dir)
    expected = {**found, "student": b"b", "metrics": [{"step": 2}]}
    assert fault_injection.compare(found, expected) == [
        "the final student differs from the uninterrupted run's",
        "the metrics log differs from the uninterrupted run's"]
    assert fault_injection.leftovers(run_dir) == [".x.replaced-1",
                                                  "checkpoints/.step-00000004.tmp-1"]
