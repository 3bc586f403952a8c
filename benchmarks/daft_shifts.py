"""Accuracy under distribution shift of ``daft`` students on MNIST-5k: the teacher fine-tuned
adversarially (daft's default) or trained adversarially from scratch, against ``hinton`` and
``ce``, with the leaderboard's protocol (:mod:`leaderboard`: data split, CNN teacher, student,
budget; the ``all`` setting).

Every student and teacher is scored on the clean test split and on the four shifts of
``examples/daft.yaml`` (noise, blur, contrast, rotation at severity 3; :mod:`kdistill.data.shifts`).
Run on demand: ``.venv/bin/python benchmarks/daft_shifts.py`` (seeds 0, 1, 2 by default; one
process, one thread; teachers cached in ``$KDISTILL_CACHE``, the leaderboard's shared CNN among
them) prints a markdown table (students: mean ± sd over the seeds) and writes
``benchmarks/results/daft_shifts.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import leaderboard as lb
import torch

from kdistill import run as kdrun
from kdistill.config import RunConfig
from kdistill.evaluate import classification_metrics, eval_batches, predict, shifted_evaluation
from kdistill.models import deployable
from kdistill.report import mean_std, mean_std_text

SHIFTS, SEVERITY = ("noise", "blur", "contrast", "rotation"), 3.0  # as examples/daft.yaml
# daft's teacher before the fine-tuning: the adversarial recipe from scratch (its former default).
SCRATCH = {"name": "adversarial", "epsilon": 0.1, "steps": 5, "clean_weight": 0.5}
ROWS = ("ce", "hinton", "daft", "daft-scratch")


def configs(seed: int) -> dict[str, RunConfig]:
    """Each row's run, as the leaderboard builds it; ``daft-scratch`` is ``daft`` with its
    teacher trained by :data:`SCRATCH` and not fine-tuned."""
    rows = {row.name: row for row in lb.leaderboard_rows(["hinton", "daft"])}
    size = len(lb.leaderboard_data(lb.data_config("all"))[0].train)
    made = {name: lb.run_config(rows[name], "all", seed, False, size) for name in ROWS[:3]}
    daft = made["daft"]
    assert daft.teacher is not None
    made["daft-scratch"] = daft.model_copy(update={
        "name": f"all-daft-scratch-{seed}",
        "teacher": daft.teacher.model_copy(update={"recipe": SCRATCH, "finetune": None})})
    return made


def scores(model: torch.nn.Module, test: Any) -> dict[str, float]:
    """Clean accuracy, accuracy under each shift and the shifts' mean."""
    model.eval()
    logits = predict(model, eval_batches(test, lb.EVAL_BATCH)).logits
    shifted = shifted_evaluation({"model": model}, test, SHIFTS, SEVERITY, lb.EVAL_BATCH)["model"]
    return {"clean": classification_metrics(logits, test.labels)["accuracy"], **shifted,
            "shifted": statistics.fmean(shifted.values())}


def teacher_name(config: RunConfig) -> str:
    user = lb.teacher_user(config)
    return "none" if config.teacher is None else lb.teacher_job(config.teacher, user).record["name"]


def measure(seeds: Sequence[int]) -> dict[str, Any]:
    """Train every row for every seed (teachers first, timed); each model's scores."""
    splits, validation = lb.leaderboard_data(lb.data_config("all"))
    results: dict[str, Any] = {"teachers": {}, "students": {}}
    for seed in seeds:
        for row, config in configs(seed).items():
            name = teacher_name(config)
            if config.teacher is not None and name not in results["teachers"]:
                user = lb.teacher_user(config)
                start = time.perf_counter()
                teacher, _ = kdrun.obtain_teacher(
                    config.teacher, config.data, splits, progress=False,
                    recipe=kdrun.teacher_training(config.teacher, user),
                    finetune=kdrun.teacher_finetuning(config.teacher, user))
                results["teachers"][name] = {"seconds": time.perf_counter() - start,
                                             **scores(teacher, splits.test)}
                print(f"teacher {name}: {results['teachers'][name]}", flush=True)
            start = time.perf_counter()
            _, fit = kdrun.train_run(config, splits, validation)
            entry = {"teacher": name, "seconds": time.perf_counter() - start,
                     **scores(deployable(fit.student), splits.test)}
            results["students"].setdefault(row, {})[seed] = entry
            print(f"{row} seed {seed}: {entry}", flush=True)
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown: teachers, then students (mean ± sd over seeds), accuracies in %."""
    columns = ["clean", *SHIFTS, "shifted"]
    lines = ["| model | teacher | " + " | ".join(columns) + " | seconds |",
             "|---" * (len(columns) + 3) + "|"]
    for name, entry in results["teachers"].items():
        lines.append(f"| teacher | {name} | " + " | ".join(
            f"{100 * entry[c]:.2f}" for c in columns) + f" | {entry['seconds']:.0f} |")
    for row, by_seed in results["students"].items():
        runs = list(by_seed.values())
        lines.append(f"| `{row}` | {runs[0]['teacher']} | " + " | ".join(
            mean_std_text(*mean_std([r[c] for r in runs])) for c in columns)
            + f" | {statistics.fmean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path,
                        default=lb.ROOT / "benchmarks" / "results" / "daft_shifts.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = measure(args.seeds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seeds": args.seeds, **results}, indent=2))
    print(table(results))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
