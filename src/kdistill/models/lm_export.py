"""Ship a language-model student and continue texts with it (``kdistill generate``).

A finished run of task ``lm`` keeps its student in ``<run>/student/`` as a plain transformers
folder (``save_pretrained``: weights, configuration and generation configuration) with the
data's tokenizer saved beside it, so it loads without kdistill; ``<run>/labels.json`` says the
task, ``lm``. :func:`continue_text` completes a prompt greedily (``temperature`` 0) or by
sampling from ``softmax(z / temperature)`` over the whole vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.checkpoint import atomic_write_text
from kdistill.errors import KdistillError
from kdistill.models.export import LABELS_FILE, STUDENT_FOLDER, OutputMeaning
from kdistill.models.lm import lm_folder, load_lm


def export_lm_student(model: nn.Module, run_dir: Path, tokenizer: str | Path) -> Path:
    """Write a run's language-model student and the tokenizer of ``tokenizer`` (a folder, GGUF
    file or installed model's name) to ``<run_dir>/student/``, and ``labels.json`` (task
    ``lm``); returns the student's folder."""
    from transformers import AutoTokenizer  # deferred: only language-model runs need it

    folder = run_dir / STUDENT_FOLDER
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(lm_folder(tokenizer), local_files_only=True) \
        .save_pretrained(folder)
    atomic_write_text(run_dir / LABELS_FILE, json.dumps(asdict(OutputMeaning("lm")),
                                                        indent=1) + "\n")
    return folder


def load_lm_run(run_dir: str | Path) -> tuple[nn.Module, Any]:
    """The student and tokenizer exported by the language-model run in ``run_dir``."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    labels, folder = run_dir / LABELS_FILE, run_dir / STUDENT_FOLDER
    if not labels.is_file() or not folder.is_dir():
        raise KdistillError(f"{run_dir}: not a finished run (expected {STUDENT_FOLDER}/ and "
                            f"{LABELS_FILE}, written when a run of task lm ends)")
    try:
        task = json.loads(labels.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError) as error:
        raise KdistillError(f"{labels}: unreadable ({error})") from None
    if task != "lm":
        raise KdistillError(f"{run_dir}: a run of task {task}, not a language model; generate "
                            "continues texts with the student of a run of task lm (kdistill "
                            "predict labels texts with the others)")
    return load_lm(folder), AutoTokenizer.from_pretrained(folder, local_files_only=True)


def continue_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.0, seed: int = 0) -> str:
    """The text ``model`` generates after ``prompt`` (its new tokens decoded without special
    tokens): greedy at ``temperature`` 0, else sampled with ``seed``."""
    encoded = tokenizer(prompt, return_tensors="pt")
    if encoded["input_ids"].shape[1] == 0:
        raise KdistillError("generate: the prompt makes no token; give a non-empty prompt")
    options: dict[str, Any] = {"do_sample": False} if temperature == 0 else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=encoded["input_ids"],
                             attention_mask=encoded["attention_mask"],
                             max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad,
                             **options)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
