"""Two CPU processes (torchrun + gloo) agree on a non-finite step that only one of them meets:
both stop with the same error, or both skip the same step and end with the same weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import LAUNCH_FAILURES, launcher, worker_env

WORKER = Path(__file__).with_name("nonfinite_worker.py")


def two_processes(out: Path, on_nonfinite: str) -> list[dict]:
    command = launcher("torchrun")
    if command is None:
        pytest.skip("torchrun is not installed")
    run = subprocess.run([*command, str(WORKER), "--out", str(out), "--on-nonfinite",
                          on_nonfinite], env=worker_env(), capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0:
        output = run.stdout + run.stderr
        if any(text in output for text in LAUNCH_FAILURES):
            pytest.skip(f"torchrun could not start two processes: {output[-1000:]}")
        pytest.fail(f"torchrun failed ({run.returncode}):\n{output[-4000:]}")
    return [json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_a_nan_on_one_process_stops_both(tmp_path: Path) -> None:
    outcomes = two_processes(tmp_path, "stop")
    assert [o["world"] for o in outcomes] == [2, 2]
    # Process 1's third step is NaN; process 0's share is finite, yet both stop there.
    assert outcomes[0]["error"] == outcomes[1]["error"]
    assert outcomes[0]["error"].startswith(
        "training step 3 (phase 0 '0-ce', epoch 1 of 2, batch 3 of 4): non-finite loss terms "
        "ce=nan, loss=nan and non-finite gradients of student.model.features.1.weight")
    rank0 = load_file(str(tmp_path / "weights-0.safetensors"))
    rank1 = load_file(str(tmp_path / "weights-1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) and torch.isfinite(rank0[k]).all()
               for k in rank0)


@pytest.mark.slow
def test_a_nan_on_one_process_is_skipped_by_both(tmp_path: Path) -> None:
    outcomes = two_processes(tmp_path, "skip")
    assert [o["skipped"] for o in outcomes] == [1, 1]
    assert outcomes[0]["history"] == outcomes[1]["history"]
    skipped = [r for r in outcomes[0]["history"] if r["kind"] == "skipped_step"]
    assert [(r["step"], r["terms"]) for r in skipped] == [(3, ["ce", "loss"])]
    rank0 = load_file(str(tmp_path / "weights-0.safetensors"))
    rank1 = load_file(str(tmp_path / "weights-1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) and torch.isfinite(rank0[k]).all()
               for k in rank0)

