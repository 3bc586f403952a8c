"""Worker of ``test_lm_distributed.py``: one process of a CPU data-parallel ``token_kd`` run of
a tiny Llama (or the whole one-process run when started without ``torchrun``).

Eight prompt/completion rows with 1 to 8 labelled tokens each, so that the processes' shares of
a global batch hold different numbers of tokens; the student learns a frozen tiny Llama teacher
with ``token_kd`` (forward KL plus a CE term, both per token). Writes
``weights-<rank>.safetensors`` and ``history-<rank>.json`` (with what the teacher looked like
after training) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for lm_models
from lm_models import EOS, PAD, tiny_llama  # noqa: E402

from kdistill import Distiller  # noqa: E402
from kdistill.data.lm import pad_rows  # noqa: E402
from kdistill.recipes import build_recipe  # noqa: E402

EPOCHS = 2


def rows():
    """Eight rows whose completions hold 1 .. 8 labelled tokens (prompt of 2 tokens)."""
    sequences = [[4 + i, 5 + i] + [10 + j for j in range(i)] + [EOS] for i in range(8)]
    return pad_rows(sequences, [2] * 8, block_size=12, pad_id=PAD)


def main() -> None:
    """Train and write this process's weights and history."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--batch-size", required=True, type=int, help="per process")
    args = parser.parse_args()
    teacher, student = tiny_llama(seed=1), tiny_llama(layers=1, seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes: list[bool] = []
    teacher.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    result = Distiller(student, teacher, build_recipe("token_kd", ce_weight=0.5), epochs=EPOCHS,
                       batch_size=args.batch_size, cpu=True, progress=False, seed=0,
                       optimizer={"name": "sgd", "lr": 0.5}).fit(rows())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    teacher_state = {"class": type(teacher).__name__,
                     "unchanged": all(torch.equal(v, before[k])
                                      for k, v in teacher.state_dict().items()),
                     "frozen": not any(p.requires_grad for p in teacher.parameters()),
                     "calls": len(modes), "inference_mode": all(modes)}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()},
              str(args.out / f"weights-{rank}.safetensors"))
    (args.out / f"history-{rank}.json").write_text(json.dumps(
        {"world": world, "history": result.history, "teacher": teacher_state}))


if __name__ == "__main__":
    main()
