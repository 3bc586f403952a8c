"""Leaderboard of every registered classification recipe on MNIST-5k, all and few labels.

Same teacher, same student, same budget and several seeds for every recipe.

Run on demand (never in CI), from the repository root::

    .venv/bin/python benchmarks/leaderboard.py                  # the full run (~30 min, 2 cores)
    .venv/bin/python benchmarks/leaderboard.py --quick --seeds 0 # a smoke run of a few minutes

It writes ``docs/leaderboard.md`` (one table per setting, the teachers, the setups, the machine)
and ``benchmarks/results/leaderboard.json`` (every per-seed figure, rewritten after each
finished job, so a stopped benchmark keeps what it computed). ``--quick`` writes to
``runs/leaderboard-quick.{md,json}`` unless ``--output``/``--json`` say otherwise.

Protocol:

* data: ``mnist5k`` (3,750 training / 1,250 test images). 500 training images (50 per class,
  fixed seed) are held out as the validation split: it is the engine's evaluation data during
  training (recipes with ``keep_best`` choose their checkpoint on it); the test split is used
  for the final numbers only. Settings: ``all`` (the other 3,250 images, all labelled) and
  ``few`` (100 of them labelled, 10 per class, the rest unlabelled);
* teacher: one CNN trained with cross-entropy on every training label (through
  :func:`kdistill.run.obtain_teacher`, cached under ``$KDISTILL_CACHE``), shared by every recipe
  that distils a trained teacher. Recipes that need another teacher (``teacher_recipe``, a
  label-conditioned model) train theirs the same way; recipes whose teacher trains online
  (``teacher_model = "fresh"``) start from a fresh model of the same CNN architecture; recipes
  without a separate teacher (``"none"``) make it from the student;
* student: the same MLP for every recipe, the same budget (epochs, batch, optimizer, LR
  schedule) and seeds 0, 1, 2 (the seed sets the student's initialisation and the data order;
  the teacher stays the same). Recipes that train on labelled samples only get as many
  optimizer steps as the others in the ``few`` setting (more, shorter epochs; see
  :func:`kdistill.demo.step_matched_epochs`), except the plain ``ce`` baseline, which keeps the
  same epochs; ``ce-steps`` is its step-matched twin;
* metrics on the test split: accuracy, ECE and top-1 agreement with the shared teacher (for
  every recipe, whatever its own teacher was, so the column compares like with like).

Runs go to ``--workers`` spawned processes with one torch thread each. A run that fails is
recorded with its error and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdistill.batch import hidden_like
from kdistill.checkpoint import atomic_write_text
from kdistill.config import DataConfig, ModelConfig, RunConfig, TeacherConfig, check_registered
from kdistill.contexts import num_threads
from kdistill.data import ArrayDataset, DataSplits, keep_labels
from kdistill.demo import step_matched_epochs
from kdistill.engine import Distiller, wrap_student
from kdistill.evaluate import classification_metrics, count_parameters, eval_batches, predict
from kdistill.models import deployable
from kdistill.recipes import RECIPES, Recipe, build_recipe
from kdistill.run import (
    build_data,
    build_from,
    build_phases,
    build_teacher,
    obtain_teacher,
    teacher_key,
    teacher_training,
)
from kdistill.settings import OptimizerSettings, SchedulerSettings, TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
DATA = "mnist5k"
VALIDATION = 500  # held-out training images, stratified
VALIDATION_SEED = 0
FEW_LABELS = 100
EVAL_BATCH = 256
BASELINES = ("ce", "ce-steps")  # the rows every other row is judged against
SETTINGS: dict[str, int | None] = {"all": None, "few": FEW_LABELS}  # setting -> labels kept

# The teacher. The preset `cnn` size `small` (2 blocks, 16 and 32 channels) reaches only about
# 75% on MNIST-5k: its receptive field is 5x5 pixels before global pooling. Four blocks
# (28 -> 28 -> 14 -> 7 -> 4 pixels) reach about 97% in 20 epochs.
TEACHER = ModelConfig(name="cnn", options={"channels": [16, 32, 64, 64]})
STUDENT = ModelConfig(name="mlp", size="tiny")  # 784 -> 16 -> 10: 12,730 parameters


def teacher_settings(quick: bool) -> TrainerSettings:
    """How every trained teacher is trained (on all 3,750 training labels)."""
    return TrainerSettings(epochs=2 if quick else 20, batch_size=64, seed=0,
                           optimizer=OptimizerSettings(lr=1e-2, weight_decay=1e-4),
                           scheduler=SchedulerSettings(name="cosine"), progress=False)


def student_settings(quick: bool, seed: int) -> TrainerSettings:
    """The students' common budget; ``seed`` sets initialisation and data order."""
    return TrainerSettings(epochs=2 if quick else 20, batch_size=64, seed=seed, eval_every=1,
                           optimizer=OptimizerSettings(lr=1e-2),
                           scheduler=SchedulerSettings(name="cosine"), progress=False)


@dataclass(frozen=True)
class Setup:
    """One leaderboard row: a registered recipe, its parameters and what differs from the
    common protocol.

    ``teacher`` describes the teacher in the table (default: from the recipe's
    ``teacher_model``); ``teacher_model`` replaces the shared CNN as the teacher's model;
    ``student_options`` are added to the student's model options; ``step_matched`` forces
    (True) or forbids (False) step matching in the ``few`` setting (None: step-match when every
    phase trains on labelled samples only); ``settings`` lists where the row runs; ``cost``
    is a rough run time relative to ``hinton``, used only to start long runs first.
    """

    recipe: str
    params: Mapping[str, Any] = field(default_factory=dict)
    teacher: str | None = None
    teacher_model: ModelConfig | None = None
    student_options: Mapping[str, Any] = field(default_factory=dict)
    step_matched: bool | None = None
    settings: tuple[str, ...] = tuple(SETTINGS)
    cost: float = 1.0
    note: str = ""


KD = {"temperature": 4.0, "alpha": 0.9}

# Parameters are the examples' (examples/<recipe>.yaml, chosen on digits with 50 labels), not
# tuned on this benchmark. Every registered classification recipe needs an entry here.
SETUPS: dict[str, Setup] = {
    "ce": Setup("ce", step_matched=False, cost=0.2,
                note="labels only; in `few` as many epochs as the others (2 steps each)"),
    "ce-steps": Setup("ce", step_matched=True, settings=("few",), cost=0.2,
                      note="labels only, as many optimizer steps as the others"),
    "hinton": Setup("hinton", KD),
    "dkd": Setup("dkd", {"alpha": 1.0, "beta": 2.0, "temperature": 4.0, "ce_weight": 0.3,
                         "warmup_epochs": 3}),
    "fitnets": Setup("fitnets", {"student_tap": "module:features",
                                 "teacher_tap": "module:features", "adapter": "linear", **KD},
                     note="hint phase: the first third of the epochs"),
    "composite": Setup("composite", {"terms": [
        {"loss": "ce", "weight": 0.1},
        {"loss": "kd", "params": {"temperature": 4.0}, "weight": 0.9},
        {"name": "hint", "loss": "hidden_mse", "student": "module:features",
         "teacher": "module:features", "adapter": "linear",
         "weight": {"name": "linear", "start": 1.0, "end": 0.0, "length": 10,
                    "unit": "epochs"}}]},
        note="Hinton KD plus a feature hint fading out over 10 epochs"),
    "annealing": Setup("annealing", {"t_max": 10},
                       note="phase 1: two thirds of the epochs, best by validation agreement"),
    "continuation": Setup("continuation", {"t_max": 10, "margin": 0.5}),
    "deit": Setup("deit", {"mode": "hard", "alpha": 0.5, "temperature": 1.0,
                           "unlabeled": "teacher"}, note="deployed: mean of both heads"),
    "okdhp": Setup("okdhp", {"branches": 3, "temperature": 3.0, "kl_weight": 1.0},
                   teacher="none: a gated ensemble of its own branches", cost=0.6,
                   note="deployed: trunk + branch 0"),
    "oracle": Setup("oracle", KD, teacher="CNN that also sees the labels (own, trained once)",
                    teacher_model=ModelConfig(name="oracle", options={
                        "base": "cnn", "base_size": None, "base_options": TEACHER.options,
                        "label_dropout": 0.5})),
    "dml": Setup("dml", {"peers": 2, "temperature": 1.0}, cost=2.5),
    "bdkd": Setup("bdkd", {"temperature": 1.0, "gap_scale": 0.5}, cost=3.5),
    "mean_teacher": Setup("mean_teacher", {"momentum": 0.99, "consistency": "mse",
                                           "noise": 0.3}, cost=0.5,
                          note="Gaussian input noise 0.3, drawn apart for student and teacher"),
    "atsen": Setup("atsen", {}, teacher="online CNN peer + EMA teachers of both", cost=5.0),
    "denoise": Setup("denoise", {"augmentation": "image", "max_shift": 1, "noise_std": 0.1},
                     student_options={"dropout": 0.1}, cost=3.0,
                     note="student dropout 0.1 (the consistency term needs it)"),
    "adversarial": Setup("adversarial", {"epsilon": 0.1, "steps": 5, "clean_weight": 0.5},
                         cost=1.0, note="PGD-5, epsilon 0.1, half the weight on clean CE"),
    "daft": Setup("daft", KD, teacher="CNN trained adversarially (own, trained once)"),
}

TEACHER_KINDS = {"trained": "CNN (shared)", "fresh": "online CNN (trained with the student)",
                 "none": "EMA of the student"}


# -- recipes and setups -------------------------------------------------------------------------
class SetupError(ValueError):
    """A registered classification recipe without a setup, or an unknown requested row."""


def classification_recipes(registry: Mapping[str, Any] = RECIPES) -> list[str]:
    """The registered recipes the leaderboard must cover."""
    return sorted(name for name, entry in registry.items()
                  if entry.cls.task == "classification")


def check_setups(registry: Mapping[str, Any] = RECIPES,
                 setups: Mapping[str, Setup] = SETUPS) -> list[str]:
    """Raise :class:`SetupError` naming every registered classification recipe that no setup
    covers; return the setups whose recipe is not registered (they are skipped)."""
    covered = {setup.recipe for setup in setups.values()}
    missing = [name for name in classification_recipes(registry) if name not in covered]
    if missing:
        raise SetupError(f"no leaderboard setup for the registered classification recipe(s) "
                         f"{', '.join(missing)}: add them to SETUPS in benchmarks/leaderboard.py")
    return sorted(entry for entry, setup in setups.items() if setup.recipe not in registry)


def select_entries(requested: Sequence[str] | None, registry: Mapping[str, Any] = RECIPES,
                   setups: Mapping[str, Setup] = SETUPS) -> list[str]:
    """The rows to run: the requested ones (all registered by default) plus the baselines."""
    available = [e for e, s in setups.items() if s.recipe in registry]
    if requested is None:
        return available
    unknown = [e for e in requested if e not in available]
    if unknown:
        raise SetupError(f"--recipes: no registered setup named {', '.join(unknown)}; "
                         f"available: {', '.join(available)}")
    return [e for e in available if e in requested or e in BASELINES]


def labels_only(recipe: Recipe, epochs: int) -> bool:
    """Whether every phase of ``recipe`` trains on labelled samples only."""
    return all(not phase.uses_unlabeled for phase, _ in recipe.phases(epochs))


def teacher_model_kind(recipe: Recipe, epochs: int) -> str | None:
    """``teacher_model`` of the first phase that uses a teacher (None: no teacher at all)."""
    users = [phase for phase, _ in recipe.phases(epochs) if phase.uses_teacher]
    return users[0].teacher_model if users else None


def teacher_description(setup: Setup, kind: str | None) -> str:
    if setup.teacher is not None:
        return setup.teacher
    return "none" if kind is None else TEACHER_KINDS[kind]


def data_config(setting: str) -> DataConfig:
    return DataConfig(name=DATA, seed=0, labeled=SETTINGS[setting])


def run_config(entry: str, setting: str, seed: int, quick: bool, train_size: int) -> RunConfig:
    """The :class:`RunConfig` of one run (checked with :func:`kdistill.config.check_registered`
    by the caller). ``train_size`` is the number of training images after the validation split,
    for step matching."""
    setup = SETUPS[entry]
    trainer = student_settings(quick, seed)
    recipe = build_recipe(setup.recipe, **setup.params)
    labeled = SETTINGS[setting]
    matched = setup.step_matched if setup.step_matched is not None else \
        labels_only(recipe, trainer.epochs)
    if matched and labeled is not None:
        epochs = step_matched_epochs(trainer.epochs, train_size, labeled, trainer.batch_size)
        trainer = trainer.model_copy(update={"epochs": epochs,
                                             "eval_every": max(1, epochs // trainer.epochs)})
    kind = teacher_model_kind(recipe, trainer.epochs)
    model = setup.teacher_model or TEACHER
    teacher = None
    if kind == "trained":
        teacher = TeacherConfig(model=model, train=teacher_settings(quick))
    elif kind == "fresh":
        teacher = TeacherConfig(model=model)
    student = STUDENT.model_copy(update={"options": {**STUDENT.options,
                                                     **setup.student_options}})
    return RunConfig(name=f"{setting}-{entry}-{seed}", cpu_threads=1, data=data_config(setting),
                     student=student, teacher=teacher,
                     recipe={"name": setup.recipe, **setup.params}, trainer=trainer)


# -- data -----------------------------------------------------------------------------------------
_DATA: dict[str, tuple[DataSplits, ArrayDataset]] = {}


def leaderboard_data(config: DataConfig,
                     validation: int = VALIDATION) -> tuple[DataSplits, ArrayDataset]:
    """The training split without ``validation`` held-out images (stratified, fixed seed), with
    all but ``config.labeled`` labels hidden (10 per class for 100), and the validation split
    (all labelled). The test split is the data set's own. Cached per process."""
    key = f"{config.model_dump_json()}|{validation}"
    if key not in _DATA:
        from sklearn.model_selection import train_test_split

        full = build_data(config.model_copy(update={"labeled": None}))
        inputs, labels = full.train.inputs, full.train.labels
        kept, held = train_test_split(np.arange(len(labels)), test_size=validation,
                                      random_state=VALIDATION_SEED, stratify=labels.numpy())
        kept, held = torch.as_tensor(np.sort(kept)), torch.as_tensor(np.sort(held))
        train = ArrayDataset(inputs[kept], labels[kept])
        if config.labeled is not None:
            train = train.with_labels(keep_labels(train.labels, config.labeled, config.seed))
        splits = DataSplits(full.name, train, full.test, full.num_classes, full.input_shape,
                            full.task)
        _DATA[key] = (splits, ArrayDataset(inputs[held], labels[held]))
    return _DATA[key]


# -- the jobs (run in worker processes) -----------------------------------------------------------
@dataclass(frozen=True)
class TeacherJob:
    """Train (or load from the cache) one trained teacher."""

    key: str
    teacher: TeacherConfig
    data: DataConfig
    recipe: dict[str, Any]


@dataclass(frozen=True)
class RunJob:
    """One student run."""

    setting: str
    entry: str
    seed: int
    config: RunConfig
    teacher_key: str | None  # the trained teacher it needs first, if any


def init_worker() -> None:
    torch.set_num_threads(1)


def hidden_label_batches(dataset: ArrayDataset) -> list[dict[str, Any]]:
    """Evaluation batches with every label hidden: a label-conditioned teacher then predicts
    from the input alone (the targets are compared outside)."""
    return [{**batch, "labels": hidden_like(batch["labels"])}
            for batch in eval_batches(dataset, EVAL_BATCH)]


def execute_teacher(job: TeacherJob) -> dict[str, Any]:
    """Obtain the teacher; its test logits (labels hidden from its input) and cost."""
    start = time.perf_counter()
    try:
        with num_threads(1):
            splits, _ = leaderboard_data(job.data)
            model, info = obtain_teacher(job.teacher, job.data, splits, progress=False,
                                         recipe=job.recipe)
            logits = predict(model, hidden_label_batches(splits.test)).logits
        return {"status": "ok", "logits": logits.numpy(), "cached": bool(info.get("cached")),
                "params": count_parameters(model), "seconds": time.perf_counter() - start}
    except Exception as error:  # a failed teacher fails its runs, not the benchmark
        return failure(error, start)


def execute_run(job: RunJob) -> dict[str, Any]:
    """Train one student; its test logits, last validation accuracy, steps and wall time."""
    start = time.perf_counter()
    try:
        with num_threads(1):
            config = job.config
            splits, validation = leaderboard_data(config.data)
            phases = build_phases(config)
            student = wrap_student(build_from(config.student, splits, config.trainer.seed,
                                              "student"), phases)
            _, source = build_teacher(config, splits, phases, ["recipe"] * len(phases))
            fit = Distiller(student, source, phases=phases,
                            trainer=config.trainer).fit(splits.train, validation)
            logits = predict(deployable(fit.student), eval_batches(splits.test, EVAL_BATCH))
        evaluations = fit.evaluations()
        return {"status": "ok", "logits": logits.logits.numpy(),
                "validation_accuracy": evaluations[-1].get("eval_accuracy") if evaluations
                else None,
                "steps": max((r["step"] for r in fit.history), default=0),
                "seconds": time.perf_counter() - start}
    except Exception as error:  # recorded in the table; the benchmark goes on
        return failure(error, start)


def failure(error: BaseException, start: float) -> dict[str, Any]:
    return {"status": "failed", "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(limit=8),
            "seconds": time.perf_counter() - start}


# -- aggregation and verdicts ---------------------------------------------------------------------
def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None for fewer than two values, both
    None for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


METRICS = ("accuracy", "agreement", "ece", "seconds")


def summarise(runs: Sequence[Mapping[str, Any]], setting: str) -> list[dict[str, Any]]:
    """One row per entry of ``setting`` (in the order of :data:`SETUPS`): mean and std of
    every metric over its successful seeds, the number of seeds and the failures."""
    rows: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["setting"] != setting:
            continue
        row = rows.setdefault(run["entry"], {"entry": run["entry"], "recipe": run["recipe"],
                                             "teacher": run.get("teacher", ""), "seeds": 0,
                                             "errors": [], "_runs": []})
        row["seeds"] += 1
        if run["status"] == "ok":
            row["_runs"].append(run)
        else:
            row["errors"].append(run.get("error") or "unknown error")
    for row in rows.values():
        done = row.pop("_runs")
        row["ok"] = len(done)
        for metric in METRICS:
            row[metric], row[f"{metric}_std"] = mean_std(r.get(metric) for r in done)
    order = list(SETUPS)
    return sorted(rows.values(), key=lambda r: order.index(r["entry"]) if r["entry"] in order
                  else len(order))


def verdict(accuracy: float | None, baseline: float | None) -> str:
    """``yes`` when the mean accuracy exceeds the baseline's mean, ``no`` when it does not
    (ties included), ``n/a`` when either is missing."""
    if accuracy is None or baseline is None:
        return "n/a"
    return "yes" if accuracy > baseline else "no"


# -- markdown -------------------------------------------------------------------------------------
def percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def signed_points(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "–"
    return f"{100 * (value - baseline):+.2f}"


def short_error(errors: Sequence[str], limit: int = 80) -> str:
    first = errors[0].splitlines()[0] if errors else "unknown error"
    return first if len(first) <= limit else first[:limit - 3] + "..."


def render_setting(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of one setting: one line per entry, verdict columns for each
    baseline present (``ce``, and ``ce-steps`` where it runs)."""
    baselines = {r["entry"]: r for r in rows if r["entry"] in BASELINES}
    header = ["recipe", "teacher", "accuracy %", "agreement %", "ECE %", "Δ acc vs ce (pts)",
              *[f"beats {b}?" for b in BASELINES if b in baselines], "time/run (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ce = baselines.get("ce", {}).get("accuracy")
    for row in rows:
        failed = f"failed: {short_error(row['errors'])}".replace("|", "\\|")
        if row["ok"] == 0:
            cells = [failed, "–", "–", "–"]
            verdicts = ["n/a" for b in BASELINES if b in baselines]
        else:
            accuracy = percent(row["accuracy"], row["accuracy_std"])
            if row["errors"]:
                accuracy += f" ({len(row['errors'])} of {row['seeds']} seeds {failed})"
            cells = [accuracy, percent(row["agreement"], row["agreement_std"]),
                     percent(row["ece"], row["ece_std"]),
                     "–" if row["entry"] == "ce" else signed_points(row["accuracy"], ce)]
            verdicts = ["–" if row["entry"] == b else
                        verdict(row["accuracy"], baselines[b]["accuracy"])
                        for b in BASELINES if b in baselines]
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "–"
        lines.append("| " + " | ".join([f"`{row['entry']}`", row["teacher"], *cells, *verdicts,
                                        seconds]) + " |")
    return "\n".join(lines)


SETTING_TITLES = {"all": "All labels", "few": f"Few labels ({FEW_LABELS})"}


def render_markdown(report: Mapping[str, Any]) -> str:
    """The whole ``docs/leaderboard.md`` from the JSON report."""
    meta = report["protocol"]
    out = [
        "# Leaderboard: kdistill recipes on MNIST-5k",
        "",
        f"Generated by `benchmarks/leaderboard.py` on {report['finished'] or report['started']}"
        + (" (**quick smoke budget, not a real result**)" if meta["quick"] else "") + ".",
        f"Reproduce: `{report['command']}`.",
        "",
        f"Data: `{DATA}`, {meta['train']:,} training images ({meta['validation']} more held "
        f"out as the validation split, stratified and labelled in both settings, used only for "
        f"end-of-epoch evaluation and `keep_best`), {meta['test']:,} test images for every "
        "figure below. Recipe parameters are those of `examples/<recipe>.yaml` (chosen on "
        "digits with 50 labels), not tuned here; see Setups below. Student: "
        f"`{STUDENT.name}` size `{STUDENT.size}` ({meta['student_params']:,} parameters) for "
        f"every recipe, {meta['epochs']} epochs, batch {meta['batch_size']}, AdamW lr "
        f"{meta['lr']}, cosine schedule; seeds {', '.join(map(str, meta['seeds']))} (student "
        "initialisation and data order; the teacher is the same). Mean ± standard deviation "
        "over seeds. Agreement is top-1 agreement with the shared CNN teacher for every row; "
        "ECE uses 15 bins. \"Beats ce?\" compares mean accuracies: \"no\" means the recipe's "
        "mean does not exceed the baseline's.",
        "",
    ]
    for setting, title in SETTING_TITLES.items():
        rows = report["summary"].get(setting)
        if not rows:
            continue
        labels = (f"all {meta['train']:,} training labels" if SETTINGS[setting] is None else
                  f"{SETTINGS[setting]} labels (10 per class) + {meta['train'] - FEW_LABELS:,} "
                  "unlabelled images; recipes that train on labelled samples only "
                  "(`ce-steps`, and those marked step-matched below) get as many optimizer "
                  "steps as the others, the plain `ce` the same number of epochs")
        out += [f"## {title}", "", f"The student sees {labels}.", "", render_setting(rows), ""]
    out += ["## Teachers", "", f"Each trained on all {meta['train'] + meta['validation']:,} "
            "training labels (the validation images included) and cached. Test accuracy and "
            "ECE are computed with the labels hidden from the model's input (this matters for "
            "the oracle teacher only).", "",
            "| teacher | model | training recipe | params | accuracy % | ECE % | train time (s) |",
            "|---|---|---|---|---|---|---|"]
    for teacher in report["teachers"].values():
        if teacher["status"] != "ok":
            out.append(f"| {teacher['name']} | – | – | – | failed: "
                       f"{short_error([teacher['error']])} | – | – |")
            continue
        time_note = "cached" if teacher["cached"] else f"{teacher['seconds']:.0f}"
        out.append(f"| {teacher['name']} | {teacher['model']} | {teacher['recipe']} | "
                   f"{teacher['params']:,} | {100 * teacher['accuracy']:.2f} | "
                   f"{100 * teacher['ece']:.2f} | {time_note} |")
    out += ["", "## Setups", "",
            "| row | recipe | teacher | parameters | epochs (all / few) | notes |",
            "|---|---|---|---|---|---|"]
    for entry, setup in report["setups"].items():
        params = json.dumps(setup["params"], separators=(", ", ": ")) if setup["params"] else "–"
        epochs = " / ".join(str(setup["epochs"].get(s, "–")) for s in SETTINGS)
        out.append(f"| `{entry}` | `{setup['recipe']}` | {setup['teacher']} | "
                   f"`{params}` | {epochs} | {setup['note']} |")
    if report["skipped"]:
        out += ["", "Setups whose recipe is not registered (skipped): "
                + ", ".join(f"`{e}`" for e in report["skipped"]) + "."]
    machine = report["machine"]
    loads = ", ".join(f"{v:.2f}" for v in machine["load_start"])
    during = f"{machine['load_mean']:.2f}" if machine["load_mean"] is not None else "–"
    out += ["", "## Machine", "",
            f"{machine['cpus']} CPUs, {report['workers']} worker processes with one torch "
            f"thread each; torch {machine['torch']}, Python {machine['python']}. Load average "
            f"(1, 5, 15 min) at the start: {loads}; mean 1-minute load average at the end of "
            f"each run: {during}. Total wall time {report['total_seconds'] / 60:.1f} min "
            f"for {len(report['runs'])} runs; time/run is the wall time of one run in its "
            "worker (data, teacher loading, training, test predictions), so it grows with the "
            "machine's load.", ""]
    return "\n".join(out)


# -- the benchmark --------------------------------------------------------------------------------
def teacher_name(job: TeacherJob, reference: str) -> str:
    if job.key == reference:
        return "shared CNN"
    model = job.teacher.model.name
    return f"{model} ({job.recipe['name']})" if job.recipe.get("name") != "ce" else model


def plan(entries: Sequence[str], settings: Sequence[str], seeds: Sequence[int],
         quick: bool) -> tuple[list[RunJob], dict[str, TeacherJob], str]:
    """Every run, the trained teachers they need (by cache key) and the shared teacher's key.
    Every config is checked first (:func:`kdistill.config.check_registered`): a setup that
    cannot run raises :class:`SetupError` before any training."""
    splits, _ = leaderboard_data(data_config("all"))
    reference_config = TeacherConfig(model=TEACHER, train=teacher_settings(quick))
    reference = teacher_key(reference_config, data_config("all"), {"name": "ce"})
    teachers = {reference: TeacherJob(reference, reference_config, data_config("all"),
                                      {"name": "ce"})}
    runs, problems = [], []
    for setting in settings:
        for entry in entries:
            if setting not in SETUPS[entry].settings:
                continue
            for seed in seeds:
                config = run_config(entry, setting, seed, quick, len(splits.train))
                found = check_registered(config)
                if found:
                    problems += [f"{config.name}: {problem}" for problem in found]
                    continue
                key = None
                users = [p.recipe for p in build_phases(config) if p.recipe.uses_teacher]
                if users and users[0].teacher_model == "trained" and config.teacher:
                    recipe = teacher_training(config.teacher, users[0])
                    key = teacher_key(config.teacher, config.data, recipe)
                    teachers.setdefault(key, TeacherJob(key, config.teacher,
                                                        data_config("all"), recipe))
                runs.append(RunJob(setting, entry, seed, config, key))
    if problems:
        raise SetupError("setups that cannot run (fix SETUPS, or name the other rows with "
                         "--recipes):\n  " + "\n  ".join(problems))
    return runs, teachers, reference


def setups_section(entries: Sequence[str], quick: bool, train_size: int) -> dict[str, Any]:
    """The setups as recorded in the report: recipe, parameters, teacher, epochs per setting."""
    section = {}
    for entry in entries:
        setup = SETUPS[entry]
        configs = {s: run_config(entry, s, 0, quick, train_size) for s in setup.settings}
        kind = teacher_model_kind(build_recipe(setup.recipe, **setup.params),
                                  student_settings(quick, 0).epochs)
        notes = [setup.note] if setup.note else []
        if setup.recipe != "ce" and "few" in configs and \
                configs["few"].trainer.epochs != student_settings(quick, 0).epochs:
            notes.append("step-matched in `few`")
        section[entry] = {"recipe": setup.recipe, "params": dict(setup.params),
                          "teacher": teacher_description(setup, kind),
                          "student": configs[setup.settings[0]].student.model_dump(),
                          "epochs": {s: c.trainer.epochs for s, c in configs.items()},
                          "note": "; ".join(notes)}
    return section


class Benchmark:
    """Schedules the jobs on the worker pool and keeps the report up to date on disk."""

    def __init__(self, args: argparse.Namespace, entries: list[str], skipped: list[str]):
        self.args = args
        self.json_path: Path = args.json
        self.started = time.perf_counter()
        self.loads: list[float] = []
        self.runs, self.teacher_jobs, self.reference = plan(
            entries, args.settings, args.seeds, args.quick)
        splits, validation = leaderboard_data(data_config("all"))
        self.test_labels = splits.test.labels
        self.reference_logits: torch.Tensor | None = None
        student = build_from(STUDENT, splits, 0)
        first = student_settings(args.quick, 0)
        self.report: dict[str, Any] = {
            "benchmark": "kdistill leaderboard",
            "command": command_line(),
            "started": now(), "finished": None, "workers": args.workers,
            "protocol": {"data": DATA, "train": len(splits.train), "validation": len(validation),
                         "test": len(splits.test), "few_labels": FEW_LABELS,
                         "seeds": list(args.seeds), "quick": args.quick,
                         "epochs": first.epochs, "batch_size": first.batch_size,
                         "lr": first.optimizer.lr, "student": STUDENT.model_dump(),
                         "student_params": count_parameters(student),
                         "teacher_model": TEACHER.model_dump(),
                         "teacher_training": teacher_settings(args.quick).model_dump()},
            "setups": setups_section(entries, args.quick, len(splits.train)),
            "skipped": skipped, "teachers": {}, "runs": [], "summary": {},
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                        "python": platform.python_version(), "platform": platform.platform(),
                        "load_start": list(os.getloadavg()), "load_end": None,
                        "load_mean": None},
            "total_seconds": 0.0,
        }

    # -- bookkeeping ------------------------------------------------------------------------
    def save(self, final: bool = False) -> None:
        report = self.report
        report["total_seconds"] = time.perf_counter() - self.started
        report["machine"]["load_mean"] = statistics.fmean(self.loads) if self.loads else None
        report["summary"] = {s: summarise(report["runs"], s) for s in SETTINGS}
        if final:
            report["finished"] = now()
            report["machine"]["load_end"] = list(os.getloadavg())
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.json_path, json.dumps(report, indent=1) + "\n")
        if final:
            self.args.output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.args.output, render_markdown(report))

    def record_teacher(self, job: TeacherJob, outcome: Mapping[str, Any]) -> None:
        entry = {"name": teacher_name(job, self.reference), "key": job.key,
                 "model": job.teacher.model.name, "recipe": job.recipe["name"],
                 "recipe_params": {k: v for k, v in job.recipe.items() if k != "name"},
                 "status": outcome["status"], "seconds": outcome["seconds"]}
        if outcome["status"] == "ok":
            logits = torch.as_tensor(outcome["logits"])
            metrics = classification_metrics(logits, self.test_labels)
            entry.update(cached=outcome["cached"], params=outcome["params"],
                         accuracy=metrics["accuracy"], ece=metrics["ece"])
            if job.key == self.reference:
                self.reference_logits = logits
        else:
            entry.update(error=outcome["error"], traceback=outcome["traceback"])
        self.report["teachers"][job.key] = entry
        print(f"teacher {entry['name']}: {outcome['status']} ({outcome['seconds']:.0f} s)"
              + (f" accuracy {entry['accuracy']:.4f}" if "accuracy" in entry else
                 f" {entry.get('error')}"), flush=True)

    def record_run(self, job: RunJob, outcome: Mapping[str, Any]) -> None:
        setup = SETUPS[job.entry]
        record: dict[str, Any] = {
            "setting": job.setting, "entry": job.entry, "recipe": setup.recipe,
            "seed": job.seed, "teacher": self.report["setups"][job.entry]["teacher"],
            "epochs": job.config.trainer.epochs, "status": outcome["status"],
            "seconds": outcome["seconds"],
        }
        if outcome["status"] == "ok":
            metrics = classification_metrics(torch.as_tensor(outcome["logits"]),
                                             self.test_labels, self.reference_logits)
            record.update(accuracy=metrics["accuracy"], ece=metrics["ece"],
                          macro_f1=metrics["macro_f1"], agreement=metrics.get("agreement"),
                          validation_accuracy=outcome["validation_accuracy"],
                          steps=outcome["steps"])
        else:
            record.update(error=outcome["error"], traceback=outcome.get("traceback"))
        self.report["runs"].append(record)
        self.loads.append(os.getloadavg()[0])
        done, total = len(self.report["runs"]), len(self.runs)
        result = f"accuracy {record['accuracy']:.4f}" if "accuracy" in record else \
            f"FAILED {record['error']}"
        print(f"[{done}/{total}] {job.setting} {job.entry} seed {job.seed}: {result} "
              f"({outcome['seconds']:.1f} s)", flush=True)

    # -- scheduling -------------------------------------------------------------------------
    def execute(self) -> None:
        import multiprocessing

        waiting = sorted(self.runs, key=lambda r: -SETUPS[r.entry].cost)
        ready: set[str] = set()
        failed: dict[str, str] = {}
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.args.workers, mp_context=context,
                                 initializer=init_worker) as pool:
            pending: dict[Future, TeacherJob | RunJob] = {
                pool.submit(execute_teacher, job): job for job in self.teacher_jobs.values()}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    job = pending.pop(future)
                    outcome = collect(future)
                    if isinstance(job, TeacherJob):
                        self.record_teacher(job, outcome)
                        if outcome["status"] == "ok":
                            ready.add(job.key)
                        else:
                            failed[job.key] = f"teacher training failed: {outcome['error']}"
                    else:
                        self.record_run(job, outcome)
                    self.save()
                if self.reference not in ready and self.reference not in failed:
                    continue  # every run waits for the shared teacher (agreement needs it)
                for job in list(waiting):
                    if job.teacher_key in failed:
                        waiting.remove(job)
                        self.record_run(job, {"status": "failed", "seconds": 0.0,
                                              "error": failed[job.teacher_key]})
                    elif job.teacher_key is None or job.teacher_key in ready:
                        waiting.remove(job)
                        try:
                            pending[pool.submit(execute_run, job)] = job
                        except RuntimeError as error:  # the pool broke: a worker died
                            self.record_run(job, {"status": "failed", "seconds": 0.0,
                                                  "error": f"not run: {error}"})
        self.save(final=True)


def collect(future: Future) -> dict[str, Any]:
    """A job's outcome; a worker that died (the pool breaks) is a failure too."""
    try:
        return future.result()
    except Exception as error:
        return {"status": "failed", "error": f"worker died: {type(error).__name__}: {error}",
                "seconds": 0.0}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    script = Path(sys.argv[0])
    shown = script.relative_to(ROOT) if script.is_absolute() and script.is_relative_to(ROOT) \
        else script
    return shlex.join([".venv/bin/python", str(shown), *sys.argv[1:]])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="student seeds (initialisation and data order); default 0 1 2")
    parser.add_argument("--recipes", nargs="+", default=None, metavar="ROW",
                        help="run only these rows (setup names, e.g. hinton ce-steps); the ce "
                             "baselines are always added")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="label settings to run; default both")
    parser.add_argument("--quick", action="store_true",
                        help="smoke budget: 2-epoch teachers and students")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown table (default docs/leaderboard.md; with --quick "
                             "runs/leaderboard-quick.md)")
    parser.add_argument("--json", type=Path, default=None,
                        help="per-seed results (default benchmarks/results/leaderboard.json; "
                             "with --quick runs/leaderboard-quick.json)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.output is None:
        args.output = ROOT / ("runs/leaderboard-quick.md" if args.quick else "docs/leaderboard.md")
    if args.json is None:
        args.json = ROOT / ("runs/leaderboard-quick.json" if args.quick else
                            "benchmarks/results/leaderboard.json")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    skipped = check_setups()
    if skipped:
        print(f"setups skipped, recipe not registered: {', '.join(skipped)}", file=sys.stderr)
    entries = select_entries(args.recipes)
    benchmark = Benchmark(args, entries, skipped)
    print(f"{len(benchmark.runs)} runs, {len(benchmark.teacher_jobs)} teacher(s), "
          f"{args.workers} workers", flush=True)
    benchmark.execute()
    print(f"wrote {args.output} and {args.json} "
          f"({benchmark.report['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
