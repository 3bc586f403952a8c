"""Leaderboard of every registered classification recipe on MNIST-5k, all and few labels.

Same teacher, student, budget and seeds for every recipe; each row's recipe settings (its
``recipe`` section, student options, kind of teacher) come from ``examples/<recipe>.yaml``. Run
on demand: ``.venv/bin/python benchmarks/leaderboard.py`` (~11 min, 2 cores) writes
``benchmarks/results/leaderboard.json`` (rewritten after each job) and ``docs/leaderboard.md``
(:mod:`leaderboard_report`); ``--quick --seeds 0``, a smoke run (2-epoch training, more where an
example fixes a longer phase), writes ``runs/leaderboard-quick.{md,json}``. Protocol:

* data: ``mnist5k`` (3,750 training / 1,250 test images). 500 training images (50 per class,
  seed 0) are held out as the validation split, the engine's evaluation data during training
  (``keep_best`` chooses on it); the test split gives the final numbers only. Settings: ``all``
  (the other 3,250 images, all labelled) and ``few`` (100 of them labelled, 10 per class);
* teacher: one CNN (channels 16, 32, 64, 64) trained 20 epochs with cross-entropy on every
  training label and cached, shared by every recipe that distils a trained teacher. A recipe
  whose example trains its teacher otherwise (``teacher.recipe``, ``teacher_recipe``) or wraps
  it (the oracle's label-conditioned model wraps the same CNN) gets its own, trained the same
  way; one fine-tuned adversarially (``teacher.finetune``, ``daft``'s default) starts from the
  shared CNN; online teachers (``teacher_model = "fresh"``) start as a fresh model of the same
  CNN;
* student: the MLP ``tiny`` (with the example's options, e.g. denoise's dropout), 20 epochs,
  batch 64, AdamW lr 0.01, cosine schedule, evaluated every epoch, seeds 0, 1, 2 (initialisation
  and data order). Recipes that train on labelled samples only get as many optimizer steps as
  the others in ``few`` (:func:`kdistill.demo.step_matched_epochs`), except the ``ce`` baseline,
  which keeps the same epochs; ``ce-steps`` is its step-matched twin;
* metrics on the test split: accuracy, ECE and top-1 agreement with the shared teacher (for
  every row, whatever its own teacher); teachers predict with the labels hidden.

Jobs go to ``--workers`` spawned processes with one torch thread each: the teachers first, then
the runs, the rows slowest in the previous report first. A job that fails is recorded with its
error and the benchmark goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from leaderboard_report import Report, previous_seconds, setup

from kdistill import config as kdconfig
from kdistill import run as kdrun
from kdistill.batch import hidden_like
from kdistill.config import DataConfig, ModelConfig, RunConfig, TeacherConfig
from kdistill.contexts import num_threads
from kdistill.data import ArrayDataset, DataSplits, holdout_split, keep_labels
from kdistill.demo import step_matched_epochs
from kdistill.evaluate import classification_metrics, count_parameters, eval_batches, predict
from kdistill.models import deployable
from kdistill.recipes import RECIPES, Recipe, build_recipe
from kdistill.settings import OptimizerSettings, SchedulerSettings, TrainerSettings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA, VALIDATION, VALIDATION_SEED, FEW_LABELS, EVAL_BATCH = "mnist5k", 500, 0, 100, 256
SETTINGS: dict[str, int | None] = {"all": None, "few": FEW_LABELS}  # setting -> labels kept
# The preset `cnn` size `small` (2 blocks) reaches only about 75% on MNIST-5k: its receptive
# field is 5x5 pixels before global pooling. Four blocks reach about 97% in 20 epochs.
TEACHER = ModelConfig(name="cnn", options={"channels": [16, 32, 64, 64]})
STUDENT = ModelConfig(name="mlp", size="tiny")  # 784 -> 16 -> 10: 12,730 parameters
UNTRAINED = {None: "none", "none": "made from the student",  # by the recipe's teacher_model
             "fresh": "online CNN (trained with the student)"}


def budget(quick: bool, seed: int = 0, weight_decay: float = 0.0) -> TrainerSettings:
    """The students' common budget (``seed``: initialisation and data order); the teachers'
    has ``weight_decay`` 1e-4 (and sees all 3,750 training labels)."""
    return TrainerSettings(epochs=2 if quick else 20, batch_size=64, seed=seed, eval_every=1,
                           optimizer=OptimizerSettings(lr=1e-2, weight_decay=weight_decay),
                           scheduler=SchedulerSettings(name="cosine"), progress=False)


@dataclasses.dataclass(frozen=True)
class Row:
    """A row: a recipe with its example's settings; ``step_matched`` forces (True) or forbids
    (False) step matching in ``few`` (None: when every phase trains on labelled samples only),
    ``settings`` where it runs, ``note`` what the report says of it."""

    name: str
    recipe: str
    step_matched: bool | None = None
    settings: tuple[str, ...] = tuple(SETTINGS)
    note: str = ""


BASELINES = (Row("ce", "ce", False, note="labels only; in `few` as many epochs as the others"),
             Row("ce-steps", "ce", True, ("few",), "labels only, as many steps as the others"))


class SetupError(ValueError):
    """A recipe without an example, an unknown requested row or a row that cannot run."""


def leaderboard_rows(requested: Sequence[str] | None = None, registry: Mapping[str, Any] = RECIPES,
                     examples: Path = EXAMPLES) -> list[Row]:
    """The baselines and every registered classification recipe that any architecture can
    use (only the ``requested`` ones and the baselines when given; a recipe made for one
    architecture, such as ``tinybert``'s transformers, cannot run on the protocol's models);
    :class:`SetupError` names a recipe without an ``examples/<recipe>.yaml`` and an unknown
    requested row."""
    names = sorted(name for name, entry in registry.items()
                   if entry.cls.task == "classification" and entry.cls.architecture is None)
    missing = [name for name in names if not (examples / f"{name}.yaml").is_file()]
    rows = [*BASELINES, *(Row(name, name) for name in names if name != "ce")]
    unknown = sorted(set(requested or ()) - {row.name for row in rows})
    if missing:
        raise SetupError(f"no examples/<recipe>.yaml for the registered classification "
                         f"recipe(s) {', '.join(missing)}")
    if unknown:
        raise SetupError(f"--recipes: no row named {', '.join(unknown)}; the rows: "
                         f"{', '.join(row.name for row in rows)}")
    return [r for r in rows if requested is None or r.name in requested or r in BASELINES]


def protocol_teacher(model: ModelConfig) -> ModelConfig:
    """The protocol's CNN in place of an example's teacher architecture; a model that wraps a
    ``base`` model (the oracle's label-conditioned model) keeps its options and wraps the CNN."""
    if "base" not in model.options:
        return TEACHER
    return model.model_copy(update={"options": {
        **model.options, "base": TEACHER.name, "base_size": None, "base_options": TEACHER.options}})


def fitted_epochs(recipe: Recipe, epochs: int) -> int:
    """``epochs``, or the fewest more into which ``recipe`` splits its phases: an example may
    fix a phase longer than the quick budget (annealing's ``phase1_epochs``)."""
    for candidate in range(epochs, epochs + 100):
        try:
            recipe.phases(candidate)
        except ValueError:
            continue
        return candidate
    return epochs  # check_registered names the problem


def teacher_user(config: RunConfig) -> Recipe | None:
    """The recipe of the run's first phase that uses a teacher (None: no teacher at all)."""
    return next((p.recipe for p in kdrun.build_phases(config) if p.recipe.uses_teacher), None)


def data_config(setting: str) -> DataConfig:
    return DataConfig(name=DATA, seed=0, labeled=SETTINGS[setting])


def run_config(row: Row, setting: str, seed: int, quick: bool, train_size: int) -> RunConfig:
    """One run: the recipe section and student options of ``examples/<recipe>.yaml`` on the
    protocol's data, student, teacher and budget (step matching counts ``train_size`` images)."""
    source = kdconfig.load_config(EXAMPLES / f"{row.recipe}.yaml")
    spec = dict(source.recipe or {})
    recipe = build_recipe(spec.pop("name"), **spec)
    trainer, labeled = budget(quick, seed), SETTINGS[setting]
    base = epochs = fitted_epochs(recipe, trainer.epochs)
    labels_only = all(not phase.uses_unlabeled for phase, _ in recipe.phases(base))
    if (labels_only if row.step_matched is None else row.step_matched) and labeled:
        epochs = step_matched_epochs(base, train_size, labeled, trainer.batch_size)
    config = RunConfig(name=f"{setting}-{row.name}-{seed}", cpu_threads=1, recipe=source.recipe,
                       trainer=trainer.model_copy(update={"epochs": epochs,
                                                          "eval_every": max(1, epochs // base)}),
                       data=data_config(setting),
                       student=STUDENT.model_copy(update={"options": source.student.options}))
    user = teacher_user(config)
    if user is None or user.teacher_model == "none" or source.teacher is None:
        return config
    trained = user.teacher_model == "trained"
    return config.model_copy(update={"teacher": TeacherConfig(
        model=protocol_teacher(source.teacher.model),
        train=budget(quick, weight_decay=1e-4) if trained else None,
        recipe=source.teacher.recipe if trained else None,
        finetune=source.teacher.finetune if trained else None)})


_DATA: dict[str, tuple[DataSplits, ArrayDataset]] = {}


def leaderboard_data(config: DataConfig,
                     validation: int = VALIDATION) -> tuple[DataSplits, ArrayDataset]:
    """The training split without ``validation`` held-out images, with all but
    ``config.labeled`` labels hidden, and the validation split (all labelled); the test split is
    the data set's own. Cached per process."""
    key = f"{config.model_dump_json()}|{validation}"
    if key not in _DATA:
        full = kdrun.build_data(config.model_copy(update={"labeled": None}))
        train, held = holdout_split(full.train, validation, VALIDATION_SEED)
        if config.labeled is not None:
            train = train.with_labels(keep_labels(train.labels, config.labeled, config.seed))
        _DATA[key] = (dataclasses.replace(full, train=train), held)
    return _DATA[key]


@dataclasses.dataclass(frozen=True)
class TeacherJob:
    """Obtain a trained teacher (``recipe`` trains it, ``finetune`` then fine-tunes it) under
    its cache ``key``; ``record`` starts its entry in the report."""

    key: str
    teacher: TeacherConfig
    recipe: dict[str, Any]
    finetune: kdconfig.FinetuneConfig | None
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunJob:
    """A student run, the key of the trained teacher it needs (or None) and the start of its
    entry in the report."""

    config: RunConfig
    teacher_key: str | None
    record: dict[str, Any]


def teacher_job(teacher: TeacherConfig, user: Recipe | None, name: str | None = None) -> TeacherJob:
    """``teacher`` trained as ``user`` asks (:func:`kdistill.run.teacher_training`,
    :func:`kdistill.run.teacher_finetuning`); its name is the model's plus any training recipe
    but ``ce`` and any adversarial fine-tuning, unless given."""
    recipe = kdrun.teacher_training(teacher, user)
    finetune = kdrun.teacher_finetuning(teacher, user)
    key, params = kdrun.teacher_key(teacher, data_config("all"), recipe, finetune), dict(recipe)
    model, trainer = teacher.model.name, params.pop("name")
    if finetune is not None:
        trainer += ", adversarially fine-tuned"
    return TeacherJob(key, teacher, recipe, finetune, {
        "name": name or model + ("" if trainer == "ce" else f" ({trainer})"), "key": key,
        "model": model, "recipe": trainer, "recipe_params": params,
        "finetune": finetune.model_dump(mode="json") if finetune is not None else None})


def timed(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``work()`` on one thread, with its status and wall time; an exception is a failure."""
    start = time.perf_counter()
    try:
        with num_threads(1):
            outcome = {"status": "ok", **work()}
    except Exception as error:  # recorded; the benchmark goes on
        outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(limit=8)}
    return {**outcome, "seconds": time.perf_counter() - start}


def obtain_teacher(job: TeacherJob) -> dict[str, Any]:
    """Obtain the teacher: size, cache hit, test logits and metrics (labels hidden from it)."""
    def work() -> dict[str, Any]:
        splits, _ = leaderboard_data(data_config("all"))
        model, info = kdrun.obtain_teacher(job.teacher, data_config("all"), splits,
                                           progress=False, recipe=job.recipe,
                                           finetune=job.finetune)
        logits = predict(model, [{**batch, "labels": hidden_like(batch["labels"])}
                                 for batch in eval_batches(splits.test, EVAL_BATCH)]).logits
        metrics = classification_metrics(logits, splits.test.labels)
        return {"cached": bool(info.get("cached")), "params": count_parameters(model),
                "accuracy": metrics["accuracy"], "ece": metrics["ece"], "logits": logits}
    return timed(work)


def train_student(job: RunJob, reference: torch.Tensor | None) -> dict[str, Any]:
    """Train one student; test metrics (agreement with the ``reference`` teacher's logits),
    the last validation accuracy and the steps."""
    def work() -> dict[str, Any]:
        splits, validation = leaderboard_data(job.config.data)
        _, fit = kdrun.train_run(job.config, splits, validation)
        logits = predict(deployable(fit.student), eval_batches(splits.test, EVAL_BATCH)).logits
        metrics = classification_metrics(logits, splits.test.labels, reference)
        return {"accuracy": metrics["accuracy"], "ece": metrics["ece"],
                "macro_f1": metrics["macro_f1"], "agreement": metrics.get("agreement"),
                "validation_accuracy": (fit.evaluations() or [{}])[-1].get("eval_accuracy"),
                "steps": max((r["step"] for r in fit.history), default=0)}
    return timed(work)


def collect(future: Future) -> dict[str, Any]:
    """A job's outcome; a worker that died (the pool breaks) is a failure too."""
    try:
        return future.result()
    except Exception as error:
        return {"status": "failed", "error": f"worker died: {type(error).__name__}: {error}",
                "seconds": 0.0}


def plan(rows: Sequence[Row], args: argparse.Namespace
         ) -> tuple[list[RunJob], dict[str, TeacherJob], dict[str, Any]]:
    """Every run, the teachers they need by key (the shared one first) and the rows' setups.
    Every config is checked first: a row that cannot run raises :class:`SetupError`."""
    train_size = len(leaderboard_data(data_config("all"))[0].train)
    shared = teacher_job(TeacherConfig(model=TEACHER, train=budget(args.quick, weight_decay=1e-4)),
                         None, "shared CNN")
    teachers, runs, setups, problems = {shared.key: shared}, [], {}, []
    for row in rows:
        configs = {(s, seed): run_config(row, s, seed, args.quick, train_size)
                   for s in args.settings if s in row.settings for seed in args.seeds}
        found = [f"{c.name}: {p}" for c in configs.values() for p in kdconfig.check_registered(c)]
        problems += found
        if found or not configs:
            continue
        config = next(iter(configs.values()))
        user = teacher_user(config)
        kind = user.teacher_model if user else None
        job = teacher_job(config.teacher, user) if kind == "trained" and config.teacher else None
        job = teachers.setdefault(job.key, job) if job else None
        setups[row.name] = setup(row.recipe, {s: c for (s, _), c in configs.items()},
                                 job.record["name"] if job else UNTRAINED[kind], row.note)
        runs += [RunJob(c, job.key if job else None, {
            "setting": s, "entry": row.name, "recipe": row.recipe, "seed": seed,
            "teacher": setups[row.name]["teacher"], "epochs": c.trainer.epochs})
            for (s, seed), c in configs.items()]
    if problems:
        raise SetupError("rows that cannot run (fix their example, or leave them out with "
                         "--recipes):\n  " + "\n  ".join(problems))
    return runs, teachers, setups


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol as the report records it."""
    splits, validation = leaderboard_data(data_config("all"))
    student = budget(args.quick)
    return {"data": DATA, "train": len(splits.train), "validation": len(validation),
            "test": len(splits.test), "few_labels": FEW_LABELS, "seeds": list(args.seeds),
            "quick": args.quick, "epochs": student.epochs, "batch_size": student.batch_size,
            "lr": student.optimizer.lr, "student": STUDENT.model_dump(),
            "student_params": count_parameters(kdrun.build_from(STUDENT, splits, 0)),
            "teacher_model": TEACHER.model_dump(),
            "teacher_training": budget(args.quick, weight_decay=1e-4).model_dump()}


class Benchmark:
    """Runs the jobs on the worker pool, recording each in the report as it finishes."""

    def __init__(self, args: argparse.Namespace, rows: Sequence[Row]):
        self.args, self.expected = args, previous_seconds(args.json)
        self.runs, self.teachers, setups = plan(rows, args)
        self.report = Report(args.json, args.output, args.workers, protocol(args), setups)

    def record(self, job: TeacherJob | RunJob, outcome: dict[str, Any]) -> None:
        """Add a finished job's entry to the report, print it and save the report."""
        entry = {**job.record, **outcome}
        self.report.add(entry, job.key if isinstance(job, TeacherJob) else None)
        title = f"teacher {entry['name']}" if isinstance(job, TeacherJob) else \
            f"[{len(self.report.data['runs'])}/{len(self.runs)}] {job.config.name}"
        result = f"accuracy {entry['accuracy']:.4f}" if entry["status"] == "ok" else \
            f"FAILED {entry['error']}"
        print(f"{title}: {result} ({entry['seconds']:.1f} s)", flush=True)
        self.report.save()

    def execute(self) -> None:
        """The teachers first (the fine-tuned ones once those they start from are cached),
        then every run whose teacher is there, the rows slowest in the previous report
        first."""
        logits: dict[str, torch.Tensor | None] = {}
        with ProcessPoolExecutor(self.args.workers, multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for finetuned in (False, True):
                teachers = [(job, pool.submit(obtain_teacher, job))
                            for job in self.teachers.values()
                            if (job.finetune is not None) == finetuned]
                for job, future in teachers:
                    outcome = collect(future)
                    logits[job.key] = outcome.pop("logits", None)
                    self.record(job, outcome)
            shared, futures = logits[next(iter(self.teachers))], {}
            for job in sorted(self.runs, key=lambda j: -self.expected.get(j.record["entry"], 0)):
                try:
                    if job.teacher_key is not None and logits[job.teacher_key] is None:
                        raise RuntimeError("its teacher failed")
                    futures[pool.submit(train_student, job, shared)] = job
                except RuntimeError as error:  # no teacher, or the pool broke
                    self.record(job, {"status": "failed", "error": f"not run: {error}",
                                      "seconds": 0.0})
            for future in as_completed(futures):
                self.record(futures[future], collect(future))
        self.report.save(final=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="student seeds (initialisation and data order); default 0 1 2")
    parser.add_argument("--recipes", nargs="+", metavar="ROW",
                        help="only these rows (e.g. hinton dml); the ce baselines always run")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="smoke budget: 2-epoch training")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--output", type=Path, help="markdown (default docs/leaderboard.md)")
    parser.add_argument("--json", type=Path,
                        help="per-seed results (default benchmarks/results/leaderboard.json)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    quick = ROOT / "runs" / "leaderboard-quick"
    args.output = args.output or (quick.with_suffix(".md") if args.quick else ROOT / "docs" /
                                  "leaderboard.md")
    args.json = args.json or (quick.with_suffix(".json") if args.quick else ROOT / "benchmarks" /
                              "results" / "leaderboard.json")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    benchmark = Benchmark(args, leaderboard_rows(args.recipes))
    print(f"{len(benchmark.runs)} runs, {len(benchmark.teachers)} teacher(s), "
          f"{args.workers} workers", flush=True)
    benchmark.execute()
    print(f"wrote {args.output} and {args.json} "
          f"({benchmark.report.data['total_seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
