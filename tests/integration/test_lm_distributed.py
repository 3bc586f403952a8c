"""token_kd on two CPU processes (torchrun + gloo) trains like one process with the same global
batch: the KD and CE terms are normalised by the labelled tokens of the whole global batch, not
per process, and the teacher is never wrapped for training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import LAUNCH_FAILURES, launcher, worker_env

from kdistill.batch import TOKEN_MASK
from kdistill.batching import epoch_global_batches, process_micro_batches

WORKER = Path(__file__).with_name("lm_distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from lm_distributed_worker import rows  # noqa: E402


def run(tmp_path: Path, name: str, command: list[str], batch_size: int) -> dict:
    done = subprocess.run([*command, str(WORKER), "--out", str(tmp_path / name),
                           "--batch-size", str(batch_size)],
                          env=worker_env(), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if len(command) > 1 and any(text in output for text in LAUNCH_FAILURES):
            pytest.skip(f"torchrun could not start two processes: {output[-1000:]}")
        pytest.fail(f"{name} failed ({done.returncode}):\n{output[-4000:]}")
    return json.loads((tmp_path / name / "history-0.json").read_text())


@pytest.mark.slow
def test_two_processes_of_token_kd_match_one_process_token_for_token(tmp_path):
    command = launcher("torchrun")
    if command is None:
        pytest.skip("torchrun is not installed")
    one = run(tmp_path, "one", [sys.executable], batch_size=4)
    two = run(tmp_path, "two", command, batch_size=2)

    # The two processes' halves of the first global batch hold different numbers of labelled
    # tokens: a mean per process, then averaged, would weight tokens unequally.
    data = rows()
    first = epoch_global_batches(list(range(len(data))), 4, 4, 0, 0, 0)[0]
    counts = [int(data.rows(part)[TOKEN_MASK].sum())
              for rank in range(2) for part in process_micro_batches(first, 2, rank, 1)]
    assert counts[0] != counts[1], counts

    assert (one["world"], two["world"]) == (1, 2)
    steps = [[r for r in run_["history"] if r["kind"] == "train"] for run_ in (one, two)]
    assert [r["step"] for r in steps[0]] == [r["step"] for r in steps[1]] == [1, 2, 3, 4]
    for a, b in zip(*steps, strict=True):
        for key in ("kd", "ce", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    alone = load_file(str(tmp_path / "one" / "weights-0.safetensors"))
    for rank in (0, 1):
        weights = load_file(str(tmp_path / "two" / f"weights-{rank}.safetensors"))
        for key, value in alone.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
    # Each process ran its own full, frozen copy of the teacher under inference mode, never
    # through the data-parallel wrapper (which would need gradients), and left it unchanged.
    for result in (one, two):
        teacher = result["teacher"]
        assert (teacher["class"], teacher["unchanged"], teacher["frozen"],
                teacher["inference_mode"]) == ("LlamaForCausalLM", True, True, True)
        assert teacher["calls"] >= 4  # once a step at least
