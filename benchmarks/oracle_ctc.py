"""Oracle Teacher on a CTC task: ``oracle`` against ``hinton`` and ``ce`` on ``digit-lines``.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/oracle_ctc.py [--seeds 0 1 2]`` writes
``benchmarks/results/oracle_ctc.json`` after every run (a rerun keeps the runs already saved
under the same protocol; ``--fresh`` starts over) and prints the summary table. Teachers are
cached under ``$KDISTILL_CACHE`` (default ``./.kdistill-cache``) like any run's.

Protocol:

* data: ``examples/ctc/oracle.yaml``'s ``digit-lines`` (data seed 0 for every run: 2,000
  training and 500 test lines of 3-5 digits; test lines use digit images no training line
  uses);
* student: ``crnn`` tiny (7,027 parameters), 10 epochs, batch 32, AdamW lr 0.003, trained
  with ``ce`` (CTC alone), ``hinton`` (from a plain ``crnn`` base teacher) and ``oracle``
  (from an ``oracle_ctc`` base teacher, which reads the target digits); both KD recipes with
  T = 2, alpha = 0.5 (the example's values, not tuned);
* teachers: ``crnn`` base and ``oracle_ctc`` base, 10 epochs of CTC on every training line,
  trained anew for each seed (``teacher.train.seed`` = seed);
* seeds 0, 1, 2 by default (model initialisation and data order of student and teacher);
* every figure is measured on the 500 test lines: CER (edit distance of the greedy reading per
  target digit) and line accuracy. Teachers also give the mean probability of the true target,
  p(y | x) (for the oracle: given the true target); the oracle teacher is also read when given
  the *next* test line's targets instead of its own: its CER against those given targets and
  against the true ones tells how far it follows the targets it is given rather than the image;
* one thread (``torch.set_num_threads(1)``), so a run's time is a single core's.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from resumable import saved_results, write_json
from torch import nn

from kdistill.config import RunConfig, load_config
from kdistill.data import DataSplits, SequenceDataset
from kdistill.evaluate import ctc_metrics, eval_batches, predict, task_metrics
from kdistill.models import deployable
from kdistill.recipes import build_recipe
from kdistill.report import markdown_grid, mean_std, mean_std_text
from kdistill.run import build_data, obtain_teacher, teacher_training, train_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ctc" / "oracle.yaml"
OUTPUT = ROOT / "benchmarks" / "results" / "oracle_ctc.json"
VARIANTS = {"ce": ["recipe={name: ce}"],
            "hinton": ["recipe.name=hinton", "teacher.model.name=crnn"],
            "oracle": []}
SEEDS = (0, 1, 2)
THREADS = 1
EVAL_BATCH = 100


def variant_config(variant: str, seed: int) -> RunConfig:
    """The example with the variant's recipe and teacher, and ``seed`` for student and
    teacher."""
    return load_config(EXAMPLE, [*VARIANTS[variant], f"name=ctc-{variant}",
                                 f"trainer.seed={seed}", f"teacher.train.seed={seed}",
                                 "trainer.progress=false"])


def target_probability(model: nn.Module, data: SequenceDataset) -> float:
    """The mean over lines of p(y | x), the probability ``model`` gives the line's target."""
    predictions = predict(model, eval_batches(data, EVAL_BATCH))
    log_probs = predictions.logits.log_softmax(-1).transpose(0, 1)
    frames = torch.full((len(data),), log_probs.shape[0])
    nll = F.ctc_loss(log_probs, data.labels.clamp_min(0), frames, data.target_lengths,
                     blank=log_probs.shape[-1] - 1, reduction="none")
    return float(torch.exp(-nll).mean())


def teacher_figures(teacher: nn.Module, data: DataSplits) -> dict[str, float]:
    """The teacher's test CER and line accuracy (an oracle given the true targets), p(y | x)
    and, for a teacher that reads targets, its readings given the next line's targets."""
    test = data.test
    figures = {**task_metrics(predict(teacher, eval_batches(test, EVAL_BATCH))),
               "p_target": target_probability(teacher, test)}
    if getattr(teacher, "batch_inputs", ()):
        others = SequenceDataset(test.inputs, test.labels.roll(1, dims=0))
        given = predict(teacher, eval_batches(others, EVAL_BATCH))
        figures["cer_vs_given_other_targets"] = task_metrics(given)["cer"]
        figures["cer_with_other_targets"] = ctc_metrics(given.logits, test.labels,
                                                        test.target_lengths)["cer"]
    return figures


def obtain(config: RunConfig, data: DataSplits) -> tuple[nn.Module, dict[str, Any]]:
    """The config's teacher, trained now or loaded from the cache, and the time it took."""
    assert config.teacher is not None and config.recipe is not None
    spec = dict(config.recipe)
    distilling = build_recipe(spec.pop("name"), **spec)
    started = time.perf_counter()
    teacher, origin = obtain_teacher(config.teacher, config.data, data, progress=False,
                                     recipe=teacher_training(config.teacher, distilling))
    return teacher, {**origin, "seconds": time.perf_counter() - started}


def student_run(config: RunConfig, data: DataSplits) -> dict[str, Any]:
    """Train one student (its teacher from the cache); its test figures and training time."""
    started = time.perf_counter()
    _, fit = train_run(config, data)
    seconds = time.perf_counter() - started
    student = deployable(fit.student)
    return {**task_metrics(predict(student, eval_batches(data.test, EVAL_BATCH))),
            "train_seconds": seconds, "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--fresh", action="store_true",
                        help="train every run again (default: keep the runs already saved)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    results = saved_results(args.output, args.fresh, __doc__, {"runs": [], "teachers": []})
    torch.set_num_threads(THREADS)
    data = build_data(variant_config("oracle", 0).data)
    for seed in args.seeds:
        for variant in VARIANTS:
            if any(r["variant"] == variant and r["seed"] == seed for r in results["runs"]):
                continue
            config = variant_config(variant, seed)
            if variant != "ce" and not any(t["variant"] == variant and t["seed"] == seed
                                           for t in results["teachers"]):
                teacher, origin = obtain(config, data)
                figures = teacher_figures(teacher, data)
                results["teachers"].append({"variant": variant, "seed": seed,
                                            "model": config.teacher.model.name, **figures,
                                            **origin, "threads": THREADS})
                print(results["teachers"][-1])
                write_json(args.output, results)
            run = {"variant": variant, "seed": seed, **student_run(config, data),
                   "threads": THREADS}
            results["runs"].append(run)
            print(run)
            write_json(args.output, results)
    print(summary(results))


def cell(runs: list[dict[str, Any]], key: str) -> str:
    """Mean ± sd in percent of ``key`` over ``runs`` (– when none has it)."""
    return mean_std_text(*mean_std([r.get(key, math.nan) for r in runs]))


def summary(results: Mapping[str, Any]) -> str:
    """Markdown tables: the students per recipe, then the teachers."""
    rows = []
    for variant in VARIANTS:
        runs = [r for r in results["runs"] if r["variant"] == variant]
        if runs:
            rows.append([variant, cell(runs, "cer"), cell(runs, "accuracy"),
                         " ".join(str(r["seed"]) for r in runs),
                         f"{mean_std([r['train_seconds'] for r in runs])[0]:.0f}"])
    students = markdown_grid(["student recipe", "CER %", "line acc %", "seeds", "train s"],
                             rows)
    rows = []
    for variant in ("hinton", "oracle"):
        teachers = [t for t in results["teachers"] if t["variant"] == variant]
        if teachers:
            rows.append([teachers[0]["model"], cell(teachers, "cer"),
                         cell(teachers, "accuracy"), cell(teachers, "p_target"),
                         cell(teachers, "cer_vs_given_other_targets"),
                         cell(teachers, "cer_with_other_targets"),
                         " ".join(str(t["seed"]) for t in teachers)])
    teachers_table = markdown_grid(["teacher", "CER %", "line acc %", "p(y|x) %",
                                    "CER vs given other targets %",
                                    "CER given other targets %", "seeds"], rows)
    return f"{students}\n\n{teachers_table}\n"


if __name__ == "__main__":
    main()
