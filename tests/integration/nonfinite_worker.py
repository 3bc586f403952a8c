"""Worker of ``test_nonfinite_distributed.py``: one process of a CPU data-parallel run whose
process 1 alone meets a NaN (its inputs at its third training forward).

It fits a tiny MLP with ``ce`` on 128 digits (4 steps of 2 x 16 per epoch, 2 epochs) with
``on_nonfinite`` from the command line, and writes ``<rank>.json`` (the error message or the
skipped-step count, and the history) and ``weights-<rank>.safetensors`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from kdistill import Distiller
from kdistill.data import load_dataset
from kdistill.data.base import ArrayDataset
from kdistill.errors import NonFiniteError
from kdistill.models import build_model

NAN_PROCESS, NAN_CALL = 1, 3


class NanOnOneProcess(nn.Module):
    """The model, except that process ``NAN_PROCESS``'s ``NAN_CALL``-th training forward sees
    NaN inputs."""

    def __init__(self, model: nn.Module, rank: int):
        super().__init__()
        self.model, self.rank, self.calls = model, rank, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.rank == NAN_PROCESS and self.calls == NAN_CALL:
                x = x * math.nan
        return self.model(x)


def main() -> None:
    """Train and write this process's outcome, history and weights."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--on-nonfinite", required=True, choices=["stop", "skip"])
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    digits = load_dataset("digits")
    train = ArrayDataset(digits.train.inputs[:128].clone(), digits.train.labels[:128].clone())
    torch.manual_seed(0)
    student = NanOnOneProcess(build_model("mlp", digits.input_shape, digits.num_classes,
                                          size="tiny"), rank)
    distiller = Distiller(student, None, "ce", epochs=2, batch_size=16, cpu=True,
                          progress=False, seed=0, on_nonfinite=args.on_nonfinite,
                          optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0})
    outcome: dict = {"world": int(os.environ.get("WORLD_SIZE", "1"))}
    try:
        result = distiller.fit(train)
        outcome.update(skipped=result.skipped_steps(), history=result.history)
    except NonFiniteError as error:
        outcome["error"] = str(error)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{rank}.json").write_text(json.dumps(outcome))
    save_file({k: v.contiguous() for k, v in student.state_dict().items()},
              str(args.out / f"weights-{rank}.safetensors"))


if __name__ == "__main__":
    main()
