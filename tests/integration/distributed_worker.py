"""Worker of ``test_distributed.py``: one process of a CPU data-parallel run (or the whole
one-process run when started without ``torchrun``).

It trains an MLP teacher with ``ce`` on the 64 labelled samples of 256 digits, distils it
into a small MLP student with ``hinton`` on all 256 (a second fit in the same process), and
writes ``weights-<rank>.safetensors`` and ``history-<rank>.json`` into ``--out``. Under
``torchrun`` the engine's ``Accelerator(cpu=True)`` reads the process group from the
environment (gloo).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdistill import Distiller
from kdistill.data import keep_labels, load_dataset
from kdistill.data.base import ArrayDataset
from kdistill.models import build_model

SAMPLES, LABELED, EPOCHS = 256, 64, 3


def main() -> None:
    """Train and write this process's weights and history."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", required=True, type=int, help="per process")
    args = parser.parse_args()

    digits = load_dataset("digits")
    labels = keep_labels(digits.train.labels[:SAMPLES].clone(), LABELED, seed=0)
    train = ArrayDataset(digits.train.inputs[:SAMPLES].clone(), labels)
    torch.manual_seed(1)
    teacher = build_model("mlp", digits.input_shape, digits.num_classes, hidden=[32])
    # A first fit in the same process, as `kdistill run` does when it trains the teacher:
    # the teacher learns the labelled samples (data-parallel too), then is distilled.
    Distiller(teacher, None, "ce", epochs=2, batch_size=args.batch_size, cpu=True,
              progress=False, seed=0, optimizer={"lr": 0.01}).fit(train)
    torch.manual_seed(0)
    student = build_model("mlp", digits.input_shape, digits.num_classes, hidden=[16])
    result = Distiller(student, teacher, "hinton", epochs=EPOCHS, batch_size=args.batch_size,
                       cpu=True, progress=False, seed=0,
                       optimizer={"name": "sgd", "lr": 0.2, "momentum": 0.9}).fit(train)

    # A model with BatchNorm: each process's running statistics see only its own micro-batches,
    # so the engine must hand the main process's buffers to every replica.
    torch.manual_seed(2)
    with_batch_norm = build_model("cnn", digits.input_shape, digits.num_classes, size="tiny")
    Distiller(with_batch_norm, None, "ce", epochs=1, batch_size=args.batch_size, cpu=True,
              progress=False, seed=0).fit(train)

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in with_batch_norm.state_dict().items()},
              str(args.out / f"batchnorm-{rank}.safetensors"))
    save_file({k: v.contiguous() for k, v in student.state_dict().items()},
              str(args.out / f"weights-{rank}.safetensors"))
    (args.out / f"history-{rank}.json").write_text(json.dumps(
        {"world": world, "history": result.history}))


if __name__ == "__main__":
    main()
