"""Two CPU processes (torchrun + gloo) train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")
# Output of a torchrun that could not set up its processes (no sockets, no free port...).
LAUNCH_FAILURES = ("Address already in use", "Connection refused", "RendezvousError",
                   "Failed to initialize", "Cannot assign requested address",
                   "gloo::EnforceNotMet", "No such device")


def torchrun_path() -> str | None:
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun")


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def train_records(path: Path) -> tuple[int, list[dict]]:
    content = json.loads(path.read_text())
    return content["world"], [r for r in content["history"] if r["kind"] == "train"]


def launcher(name: str) -> list[str] | None:
    """The command that starts two CPU processes: ``torchrun`` or ``accelerate launch`` (which
    needs ``--multi_gpu`` to start several processes on a machine without a GPU)."""
    if name == "torchrun":
        path = torchrun_path()
        return [path, "--standalone", "--nproc_per_node=2"] if path else None
    beside = Path(sys.executable).with_name("accelerate")
    path = str(beside) if beside.is_file() else shutil.which("accelerate")
    return [path, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no"] if path else None


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["torchrun", "accelerate"])
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, launch):
    command = launcher(launch)
    if command is None:
        pytest.skip(f"{launch} is not installed")
    single = subprocess.Popen([sys.executable, str(WORKER), "--out", str(tmp_path / "one"),
                               "--batch-size", "64"], env=worker_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pair = subprocess.run([*command, str(WORKER),
                           "--out", str(tmp_path / "two"), "--batch-size", "32"],
                          env=worker_env(), capture_output=True, text=True, timeout=300)
    single_output, _ = single.communicate(timeout=300)
    assert single.returncode == 0, single_output[-3000:]
    if pair.returncode != 0:
        output = pair.stdout + pair.stderr
        if any(text in output for text in LAUNCH_FAILURES):
            pytest.skip(f"{launch} could not start two processes: {output[-1000:]}")
        pytest.fail(f"{launch} failed ({pair.returncode}):\n{output[-4000:]}")

    # (a) Both processes hold the same parameters (DDP all-reduces identical gradients).
    rank0 = load_file(str(tmp_path / "two" / "weights-0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "weights-1.safetensors"))
    assert set(rank0) == set(rank1)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    # BatchNorm statistics (buffers) are identical too, not only the parameters.
    bn0 = load_file(str(tmp_path / "two" / "batchnorm-0.safetensors"))
    bn1 = load_file(str(tmp_path / "two" / "batchnorm-1.safetensors"))
    assert any("running_mean" in k for k in bn0)
    assert all(torch.equal(bn0[k], bn1[k]) for k in bn0)

    # (b) The per-step losses: 2 x 32 per process reproduces 1 x 64, term by term.
    world_two, two = train_records(tmp_path / "two" / "history-0.json")
    world_one, one = train_records(tmp_path / "one" / "history-0.json")
    assert (world_two, world_one) == (2, 1)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 13))
    for a, b in zip(two, one, strict=True):
        for name in ("ce", "kd", "loss", "lr"):
            assert a[name] == pytest.approx(b[name], abs=1e-5, rel=1e-5), (a["step"], name)
    assert one[-1]["loss"] < one[0]["loss"]  # it learnt something: the curves are not flat

    # (c) The final weights agree with the one-process run.
    alone = load_file(str(tmp_path / "one" / "weights-0.safetensors"))
    assert set(alone) == set(rank0)
    for name, value in alone.items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-5)
