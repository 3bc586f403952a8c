"""DeiT's distillation token against its shared-features fallback, Hinton KD and CE on a ViT.

Rows, each on the same data, teacher, budget and seeds:

* ``deit-token``: ``examples/deit_vit.yaml`` as it is: the ViT student with its distillation
  token, recipe ``deit`` reading the token (``distillation_head: token``), the paper's method;
* ``deit-shared``: the same ViT without the token, ``deit`` with ``distillation_head:
  shared_features`` (a second head on the class token's output: not the paper's method);
* ``hinton``: the ViT without the token, the recipe of ``examples/hinton.yaml``;
* ``ce``: the ViT without the token, cross-entropy on the labels.

Protocol, as ``benchmarks/leaderboard.py``'s ``all`` setting: ``--validation`` training images
(default 500, stratified, seed 0) held out for the end-of-epoch evaluation only, every other
training label visible, the leaderboard's CNN teacher trained as there (same cache key: a
teacher the leaderboard cached is reused), metrics on the test split (agreement: with that
teacher). Student: the example's ViT with the patch size and size of :data:`SETUPS` for the
data set, the example's optimizer and schedule (AdamW lr 0.003, weight decay 0.05, cosine),
batch 64, ``--epochs`` epochs, one run per seed. Everything runs in this process, one after
the other, on one torch thread.

    .venv/bin/python benchmarks/deit_token.py [--data mnist5k] [--seeds 0 1 2] [--epochs 10]

writes ``benchmarks/results/deit_token.json`` (``--json``: elsewhere) once every run is done;
each run's line is printed as it ends.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from leaderboard import TEACHER, VALIDATION, budget, leaderboard_data
from leaderboard_report import command_line, now

from kdistill import config as kdconfig
from kdistill import run as kdrun
from kdistill.checkpoint import atomic_write_text
from kdistill.config import DataConfig, ModelConfig, RunConfig, TeacherConfig
from kdistill.evaluate import classification_metrics, count_parameters, eval_batches, predict
from kdistill.models import deployable
from kdistill.report import mean_std_text, summarise_runs

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "deit_vit.yaml"
HINTON = ROOT / "examples" / "hinton.yaml"
ROWS = ("deit-token", "deit-shared", "hinton", "ce")
# The ViT per data set: 28x28 MNIST in 7x7 patches (16 tokens), 8x8 digits in 4x4 (4 tokens).
SETUPS: dict[str, dict[str, Any]] = {"mnist5k": {"patch_size": 7, "size": "small"},
                                     "digits": {"patch_size": 4, "size": "tiny"}}
EVAL_BATCH = 256


def row_config(row: str, seed: int, args: argparse.Namespace) -> RunConfig:
    """The run of ``row`` at ``seed``: the example's student (with the token only in
    ``deit-token``), recipe and optimizer, on the protocol's data, teacher and budget."""
    example = kdconfig.load_config(EXAMPLE)
    recipes = {"deit-token": example.recipe,
               "deit-shared": {**(example.recipe or {}), "distillation_head": "shared_features"},
               "hinton": kdconfig.load_config(HINTON).recipe, "ce": {"name": "ce"}}
    setup = SETUPS[args.data]
    student = ModelConfig(name="vit", size=setup["size"], options={
        **example.student.options, "patch_size": setup["patch_size"],
        "distillation_token": row == "deit-token"})
    trainer = example.trainer.model_copy(update={
        "epochs": args.epochs, "seed": seed, "eval_every": 1, "progress": False})
    teacher = (None if row == "ce" else
               TeacherConfig(model=TEACHER, train=budget(False, weight_decay=1e-4)))
    return RunConfig(name=f"{row}-{seed}", cpu_threads=1, data=DataConfig(name=args.data, seed=0),
                     student=student, teacher=teacher, recipe=recipes[row], trainer=trainer)


def test_logits(model: torch.nn.Module, test: Any) -> torch.Tensor:
    return predict(model, eval_batches(test, EVAL_BATCH)).logits


def run_row(config: RunConfig, args: argparse.Namespace,
            teacher_logits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Train one student; its test metrics (agreement with the teacher's test predictions,
    computed once and kept in ``teacher_logits``), last validation accuracy and time."""
    splits, validation = leaderboard_data(config.data, args.validation)
    start = time.perf_counter()
    teacher, fit = kdrun.train_run(config, splits, validation)
    seconds = time.perf_counter() - start
    if teacher is not None and "teacher" not in teacher_logits:
        teacher_logits["teacher"] = test_logits(teacher, splits.test)
    student = deployable(fit.student)
    metrics = classification_metrics(test_logits(student, splits.test), splits.test.labels,
                                     teacher_logits.get("teacher"))
    return {"accuracy": metrics["accuracy"], "ece": metrics["ece"],
            "agreement": metrics.get("agreement"), "params": count_parameters(student),
            "validation_accuracy": (fit.evaluations() or [{}])[-1].get("eval_accuracy"),
            "seconds": seconds}


def teacher_accuracy(args: argparse.Namespace, logits: torch.Tensor) -> float:
    splits, _ = leaderboard_data(DataConfig(name=args.data, seed=0), args.validation)
    return classification_metrics(logits, splits.test.labels)["accuracy"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(SETUPS), default="mnist5k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="only these rows (default: all four)")
    parser.add_argument("--validation", type=int, default=VALIDATION,
                        help=f"training images held out for validation (default {VALIDATION})")
    parser.add_argument("--json", type=Path,
                        default=ROOT / "benchmarks" / "results" / "deit_token.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    # The teacher first: deit-token trains (or loads) it, then every row compares with it.
    order = sorted(args.rows, key=lambda row: row == "ce")
    configs = [row_config(row, seed, args) for row in order for seed in args.seeds]
    problems = [f"{c.name}: {p}" for c in configs for p in kdconfig.check_registered(c)]
    if problems:
        raise SystemExit("\n".join(problems))
    started, teacher_logits, runs = time.perf_counter(), {}, []
    for config in configs:
        row, seed = config.name.rsplit("-", 1)
        result = {"row": row, "seed": int(seed), "status": "ok",
                  **run_row(config, args, teacher_logits)}
        runs.append(result)
        print(f"{config.name}: accuracy {result['accuracy']:.4f} ece {result['ece']:.4f} "
              f"({result['seconds']:.1f} s)", flush=True)
    report = {
        "benchmark": "deit token vs shared-features head vs hinton vs ce, ViT student",
        "command": command_line(), "finished": now(), "data": args.data,
        "validation": args.validation, "epochs": args.epochs, "seeds": args.seeds,
        "student": {**SETUPS[args.data], "example": str(EXAMPLE.relative_to(ROOT))},
        "teacher": {"model": TEACHER.model_dump(),
                    "accuracy": (teacher_accuracy(args, teacher_logits["teacher"])
                                 if "teacher" in teacher_logits else None)},
        "runs": runs,
        "summary": summarise_runs(runs, "row", ["accuracy", "ece", "agreement", "seconds"]),
        "total_seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    for entry in report["summary"]:
        print(f"{entry['row']}: accuracy "
              f"{mean_std_text(entry['accuracy'], entry['accuracy_std'])}% over {entry['ok']} "
              "seed(s)")
    print(f"wrote {args.json} ({report['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
