"""Run a validated :class:`RunConfig`: data, teacher (loaded or trained and cached), student,
phases, training, the final teacher-vs-student comparison and the report."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn

from kdistill.cache import CachedTeacher, CacheError, LogitSample, TeacherCache
from kdistill.checkpoint import (
    RunFolderError,
    atomic_save_tensors,
    atomic_write_text,
    check_fresh_run_folder,
    checkpoint_folders,
)
from kdistill.config import (
    FILE_DATASETS,
    NAMED_COLUMNS,
    TRAINED_WEIGHTS_HINT,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    RunConfig,
    TeacherConfig,
    check_output_folder,
    has_trained_weights,
    unlabeled_problems,
)
from kdistill.contexts import num_threads
from kdistill.data import (
    DATASETS,
    LM_DATASETS,
    DataSplits,
    TextDataset,
    WordTagDataset,
    add_unlabeled,
    keep_labels,
    labeled_indices,
    load_dataset,
)
from kdistill.data.retrieval import TEACHER_TOP, RetrievalPairs
from kdistill.data.shifts import check_shifts
from kdistill.engine import Distiller, FitResult, Phase, recipe_phases
from kdistill.engine.phases import resolve_layer_maps
from kdistill.engine.state import RESUMABLE_SETTINGS, changed_fields, format_changes
from kdistill.errors import KdistillError
from kdistill.evaluate import (
    benchmark_models,
    eval_batches,
    input_tokens,
    predict,
    shifted_evaluation,
)
from kdistill.layermap import DEFAULT_SAMPLES, LayerMap, compare_layers_on_data
from kdistill.models import build_model, deployable
from kdistill.models.export import OutputMeaning, export_run_student
from kdistill.models.hf import missing_head
from kdistill.models.lm import lm_folder
from kdistill.models.lm_export import export_lm_student
from kdistill.models.registry import model_options
from kdistill.models.text import TextModel, check_same_tokens
from kdistill.recipes import RECIPES, Recipe, build_recipe, cache_refusal, layer_map_pending
from kdistill.report import write_report
from kdistill.retrieval_metrics import rankings
from kdistill.settings import TrainerSettings, cache_dir
from kdistill.taps import TapError, resolve_module_taps, resolve_projection_taps
from kdistill.teachers import FrozenTeacher, TeacherSource
from kdistill.text_augment import TextAugmentSettings, augment_corpus, augment_tagged

RUN_RECORD = "run.json"
# Config fields a resume may change (prefixes of dotted paths): where the run is read from and
# how it is shown, logged, checkpointed and finally compared, not what is trained.
RESUMABLE_FIELDS = ("output_dir", "cpu_threads", "evaluation", "teacher.train.progress",
                    *(f"trainer.{name}" for name in sorted(RESUMABLE_SETTINGS)))
FRESH_HINT = "continue it with --resume or replace it with --overwrite"

logger = logging.getLogger("kdistill")


def build_data(config: DataConfig) -> DataSplits:
    """Load the data set; with ``labeled`` set, hide all but that many training labels; with
    ``unlabeled`` set, append those transfer texts to the training split (labels hidden)."""
    options: dict[str, Any] = {"seed": config.seed, **config.options}
    if "test_fraction" in loader_parameters(config.name):
        options["test_fraction"] = config.test_fraction
    if config.name in FILE_DATASETS:
        options["path"] = config.path
    if config.name in NAMED_COLUMNS:
        options["label_column"] = config.label_column
    try:
        if config.name in LM_DATASETS:  # a GGUF file's tokenizer is in its converted folder
            options["tokenizer"] = str(lm_folder(options["tokenizer"]))
        data = load_dataset(config.name, **options)
    except (ValueError, OSError) as error:  # the loaders name the file and what is wrong
        field = "data.path" if config.path is not None else "data"
        raise ConfigError(f"{field}: {error}") from None
    if config.labeled is not None:
        if data.task == "retrieval":
            raise ConfigError("data.labeled: retrieval data has no class labels to hide; give "
                              "unlabelled queries with data.options.passages instead")
        if config.labeled > len(data.train):
            raise ConfigError(f"data.labeled: {config.labeled} labels asked, the training split "
                              f"has {len(data.train)} samples")
        data.train = data.train.with_labels(keep_labels(data.train.labels, config.labeled,
                                                        config.seed))
    if config.unlabeled_sources:
        problems = unlabeled_problems(config)
        if problems:
            raise ConfigError(problems[0])
        try:
            data.train = add_unlabeled(data.train, config.unlabeled_sources)
        except (ValueError, OSError) as error:  # names the file and line
            raise ConfigError(f"data.unlabeled: {error}") from None
    if config.augment is not None:
        data.train = add_augmented(data.train, config.augment, data.name)
    return data


def add_augmented(train: Any, settings: TextAugmentSettings, name: str) -> Any:
    """``train`` followed by augmented copies of its texts, as unlabelled transfer rows."""
    if isinstance(train, WordTagDataset):
        samples = [(words, train.labels[i, :len(words)].tolist())
                   for i, words in enumerate(train.words)]
        tagged = augment_tagged(samples, settings, settings.replacer())
        return train.with_unlabeled([words for words, _ in tagged])
    if not isinstance(train, TextDataset):
        raise ConfigError(f"data.augment: data set '{name}' is not text; augmentation builds "
                          "a text transfer set")
    if train.pairs is not None:
        raise ConfigError("data.augment: sentence pairs are not augmented (a replaced word may "
                          "change how the pair relates); remove data.augment")
    return train.with_unlabeled(augment_corpus(train.raw, settings, settings.replacer()))


def loader_parameters(name: str) -> set[str]:
    """The keyword options the built-in data set ``name`` takes."""
    return set(inspect.signature(DATASETS[name]).parameters) if name in DATASETS else set()


def training_texts(data: DataSplits) -> list[str] | None:
    """The raw training texts (labelled and transfer) that text models build vocabularies
    from; None for data that is not text."""
    texts = getattr(data.train, "texts", None)
    return texts() if callable(texts) else None


def build_from(config: ModelConfig, data: DataSplits, seed: int,
               where: str = "model") -> nn.Module:
    """A registered model for ``data``, initialised from ``seed``; a model that cannot be built
    for this data is a :class:`ConfigError` naming the config section ``where``."""
    torch.manual_seed(seed)
    try:
        return build_model(config.name, data.input_shape, data.num_classes, size=config.size,
                           corpus=training_texts(data), task=data.task, **config.options)
    except (ValueError, TypeError, OSError) as error:
        raise ConfigError(f"{where}: cannot build model '{config.name}' for data of shape "
                          f"{tuple(data.input_shape)} with {data.num_classes} classes: "
                          f"{error}") from None


def build_student(config: RunConfig, data: DataSplits, phases: Sequence[Phase],
                  sections: Sequence[str]) -> nn.Module:
    """The student built for ``data`` and wrapped by each phase's recipe (extra heads...); a
    recipe that cannot wrap it is a :class:`ConfigError` naming the recipe's section."""
    student = build_from(config.student, data, config.trainer.seed, "student")
    for phase, where in zip(phases, sections, strict=True):
        try:
            student = phase.recipe.wrap_student(student)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return student


def check_taps(model: nn.Module, taps: Iterable[str], where: str, phase: str) -> None:
    """Raise a :class:`ConfigError` when a ``module:`` tap names a submodule ``model`` lacks,
    or a ``query.<i>`` / ``key.<i>`` tap a self-attention layer it lacks (checked before
    training, so a typo does not cost a teacher's training first)."""
    names = list(taps)
    try:
        resolve_module_taps(model, names)
        resolve_projection_taps(model, names)
    except TapError as error:
        raise ConfigError(f"{where}: phase '{phase}': {error}") from None


# The recipe tasks that learn each data task. Embedding recipes read the texts alone, so texts
# with class labels serve them too (the labels then feed the evaluation's linear probe).
RECIPE_TASKS = {"classification": ("classification", "embedding"),
                "token_classification": ("classification",), "ctc": ("classification",),
                "regression": ("regression",), "embedding": ("embedding",),
                "retrieval": ("retrieval",), "lm": ("lm",)}


def check_task(recipe: Recipe, data: DataSplits, where: str) -> None:
    """Raise a :class:`ConfigError` when ``recipe`` cannot learn ``data``'s task (a regression
    recipe on class labels, a classification recipe on float scores or on texts without
    labels, a recipe without CTC on target sequences, one that trains no language model on
    language-modelling data; see :data:`RECIPE_TASKS`)."""
    if data.task == "ctc" and not recipe.ctc:
        fitting = sorted(name for name, entry in RECIPES.items() if entry.cls.ctc)
        raise ConfigError(f"{where}: '{recipe.name}' does not train CTC models but data set "
                          f"'{data.name}' is a ctc task; recipes for it: {fitting}")
    if data.task == "lm" and recipe.lm:
        return
    wanted = RECIPE_TASKS[data.task]
    if recipe.task not in wanted:
        fitting = sorted(name for name, entry in RECIPES.items() if entry.cls.task in wanted
                         or (data.task == "lm" and entry.cls.lm))
        raise ConfigError(f"{where}: '{recipe.name}' is a {recipe.task} recipe but data set "
                          f"'{data.name}' is a {data.task} task; recipes for it: {fitting}")


def check_tokenisations(student: nn.Module, teacher: nn.Module, recipe: Recipe,
                        where: str) -> None:
    """Raise a :class:`ConfigError` when ``recipe`` compares the tokens of text models that
    tokenise differently (see :func:`kdistill.models.text.check_same_tokens`); a recipe that
    pools each model's tokens first (``Recipe.pools_tokens``) compares none."""
    if recipe.pools_tokens:
        return
    try:
        check_same_tokens(student, teacher, [*recipe.student_taps(), *recipe.teacher_taps()])
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def load_weights(model: nn.Module, path: Path, what: str) -> nn.Module:
    """Load safetensors weights, with an error naming the file when they do not fit."""
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises several types for unreadable files
        raise ConfigError(f"{what}: cannot read {path}: {error}") from None
    missing, unexpected = (set(model.state_dict()) - set(state), set(state) -
                           set(model.state_dict()))
    if missing or unexpected:
        raise ConfigError(f"{what}: {path} does not fit the model: missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(f"{what}: {path} has tensors of other shapes: {error}") from None
    return model


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digests(data: DataConfig) -> dict[str, str]:
    """SHA-256 of the data files ``data`` reads: ``path``, ``options.test_path``,
    ``options.passages`` and each ``unlabeled`` file (built-in names are not files)."""
    files = {"data.path": data.path, "data.options.test_path": data.options.get("test_path"),
             "data.options.passages": data.options.get("passages"),
             **{f"data.unlabeled.{i}": source for i, source in enumerate(data.unlabeled_sources)}}
    return {key: file_digest(path) for key, path in files.items()
            if isinstance(path, str) and Path(path).is_file()}


def input_digests(config: RunConfig) -> dict[str, str]:
    """SHA-256 of the user files a run reads: the data files and ``teacher.checkpoint``."""
    checkpoint = config.teacher.checkpoint if config.teacher else None
    digests = data_digests(config.data)
    if checkpoint is not None and Path(checkpoint).is_file():
        digests["teacher.checkpoint"] = file_digest(checkpoint)
    return digests


def resumable(path: str) -> bool:
    """Whether a resume may change the config field at dotted ``path``."""
    return any(path == field or path.startswith(f"{field}.") for field in RESUMABLE_FIELDS)


@dataclass
class RunFolder:
    """The folder of a config run, checked before any work and written when the run starts.

    ``config.json`` holds the config in use since the run's newest start; ``run.json`` holds
    the digests of the files it reads and ``resumes``: for each resume, the step it continued
    from and the settings it changed (old and new value), so every value used is on record.
    """

    path: Path
    config: RunConfig
    resume: bool
    overwrite: bool = False
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)  # applied on resume
    record: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, config: RunConfig, *, resume: bool = False,
             overwrite: bool = False) -> RunFolder:
        """Check that ``config`` may start (or, with ``resume``, continue) a run in ``path``,
        writing nothing: a new run needs an empty folder unless ``overwrite``; a resume needs
        a checkpoint and may change only :data:`RESUMABLE_FIELDS` (each other change, and a
        changed input file, is listed in a :class:`RunFolderError`)."""
        if resume and overwrite:
            raise RunFolderError(f"run folder {path}: --resume continues the run and "
                                 "--overwrite replaces it; give one of them")
        inputs = input_digests(config)
        if not resume:
            check_fresh_run_folder(path, overwrite=overwrite, hint=FRESH_HINT)
            return cls(path, config, resume, overwrite,
                       record={"format": 1, "inputs": inputs, "resumes": []})
        saved_path = path / "config.json"
        if not path.is_dir():
            raise RunFolderError(f"nothing to resume: run folder {path} does not exist")
        if not saved_path.is_file():
            raise RunFolderError(f"nothing to resume in {path}: it holds no started run" if not
                                 checkpoint_folders(path) else
                                 f"cannot resume {path}: config.json is missing, so the run's "
                                 "settings are unknown")
        saved = _saved_config(saved_path)
        record = _saved_record(path / RUN_RECORD)
        changes = changed_fields(saved, config.model_dump(mode="json"))
        fixed = [c for c in changes if not resumable(c[0])]
        for key in sorted(set(record.get("inputs", {})) | set(inputs)):
            before, after = record.get("inputs", {}).get(key), inputs.get(key)
            if before is not None and before != after:
                fixed.append((f"{key} (file content)", f"sha256:{before[:12]}",
                              f"sha256:{after[:12]}" if after else None))
        if fixed:
            raise RunFolderError(
                f"cannot resume {path}: settings differ from the run's config.json and cannot "
                f"change mid-run ({format_changes(fixed)}); restore them, or start a new run "
                "with another name or --overwrite")
        if not checkpoint_folders(path):
            raise RunFolderError(f"nothing to resume: no checkpoint in {path / 'checkpoints'} "
                                 "(the run stopped before its first); start it again with "
                                 "--overwrite")
        record.setdefault("resumes", [])
        record["inputs"] = inputs
        return cls(path, config, resume, False,
                   [c for c in changes if resumable(c[0])], record)

    def started(self, step: int) -> None:
        """Record the start (engine ``on_start``): ``run.json``, then ``config.json``."""
        if self.resume:
            self.record["resumes"].append(
                {"step": step, "changed": {p: [old, new] for p, old, new in self.changes}})
            if self.changes:
                logger.warning("resuming %s at step %d with changed settings: %s (recorded in "
                               "%s; config.json holds the new values)", self.path, step,
                               format_changes(self.changes), RUN_RECORD)
        atomic_write_text(self.path / RUN_RECORD, json.dumps(self.record, indent=2))
        atomic_write_text(self.path / "config.json", self.config.model_dump_json(indent=2))


def _saved_config(path: Path) -> Any:
    """A run's saved config as JSON (with defaults filled in when it still validates)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunFolderError(f"cannot resume: {path} is unreadable ({error})") from None
    try:
        return RunConfig.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw


def _saved_record(path: Path) -> dict[str, Any]:
    """``run.json`` of a run (empty when absent or unreadable: nothing recorded)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"format": 1}
    return record if isinstance(record, dict) else {"format": 1}


def teacher_training(config: TeacherConfig, distilling: Recipe | None) -> dict[str, Any]:
    """The recipe (name and parameters) that trains the teacher: ``teacher.recipe`` if given,
    else the distilling recipe's ``teacher_recipe`` (plain cross-entropy for most)."""
    if config.recipe is not None:
        return dict(config.recipe)
    name, params = distilling.teacher_recipe if distilling is not None else ("ce", {})
    return {"name": name, **params}


def teacher_finetuning(config: TeacherConfig,
                       distilling: Recipe | None) -> FinetuneConfig | None:
    """The adversarial fine-tuning of the trained teacher: ``teacher.finetune`` if given; else,
    when ``teacher.recipe`` is not given either, the default fine-tuning if the distilling
    recipe's ``teacher_finetune`` asks for it (``daft``); else, and for a teacher loaded from
    ``teacher.checkpoint`` (used as it is), none."""
    if config.train is None or config.finetune is not None or config.recipe is not None:
        return config.finetune
    return FinetuneConfig() if distilling is not None and distilling.teacher_finetune else None


def teacher_data(data: DataConfig) -> DataConfig:
    """The data a teacher trains on: every label of the training split, without the
    unlabelled transfer set or augmented copies (it stands for a model that already exists)."""
    return data.model_copy(update={"labeled": None, "unlabeled": None, "augment": None})


# Trainer settings that change how fast or how visibly a model trains, never what it learns.
SPEED_ONLY = {"progress", "workers", "prefetch", "log_every", "checkpoint_every",
              "keep_checkpoints"}


def teacher_key(config: TeacherConfig, data: DataConfig, recipe: dict[str, Any] | None = None,
                finetune: FinetuneConfig | None = None) -> str:
    """A hash of everything that determines a trained teacher: its model, training recipe and
    settings (not those that change only speed or display: :data:`SPEED_ONLY`), its
    fine-tuning (``finetune``: a fine-tuned teacher never shares the key of the teacher it
    starts from), the settings of the data it trains on (:func:`teacher_data`) and the content
    of those data files (so an edited file trains anew).

    Settings at their default values are left out, so a setting added later with a default
    that keeps the old behaviour leaves every key, and every cached teacher, as it was."""
    assert config.train is not None
    recipe = recipe or {"name": "ce"}
    content = {"model": config.model.model_dump(exclude_defaults=True),
               "train": config.train.model_dump(exclude=SPEED_ONLY, exclude_defaults=True),
               **({"recipe": recipe} if recipe != {"name": "ce"} else {}),
               **({"finetune": finetune.model_dump(mode="json")} if finetune is not None
                  else {}),
               "data": teacher_data(data).model_dump(exclude_defaults=True),
               "data_files": data_digests(teacher_data(data)), "format": 4}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def obtain_teacher(config: TeacherConfig, data_config: DataConfig, data: DataSplits,
                   *, progress: bool = True, recipe: dict[str, Any] | None = None,
                   finetune: FinetuneConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher from its checkpoint, from the cache, or trained now (then cached) with
    ``recipe`` (see :func:`teacher_training`; default cross-entropy) and then, with
    ``finetune`` (see :func:`teacher_finetuning`), fine-tuned adversarially
    (:func:`finetune_teacher`) from the teacher obtained without it (cached under its own key).

    A trained teacher sees every label of the training split (its own data set is loaded again
    without ``labeled``): it stands for a model that already exists. It is the model its
    training recipe wraps (:meth:`~kdistill.recipes.Recipe.wrap_student`: ``msd``'s teacher
    keeps the channel classifiers it trained), trained, cached and loaded so.
    """
    if config.checkpoint is not None:
        model = build_from(config.model, data, 0, "teacher.model")
        return load_weights(model, Path(config.checkpoint), "teacher.checkpoint"), \
            {"source": config.checkpoint}
    assert config.train is not None
    recipe = recipe or {"name": "ce"}
    key = teacher_key(config, data_config, recipe, finetune)
    path = cache_dir() / "teachers" / f"{key}.safetensors"
    spec = dict(recipe)
    trainer_recipe = build_recipe(spec.pop("name"), **spec)
    model = build_from(config.model, data, config.train.seed, "teacher.model")
    try:  # a teacher trained with extra heads (msd's channels) keeps them, cached too
        model = trainer_recipe.wrap_student(model)
    except ValueError as error:
        raise ConfigError(f"teacher.recipe: {error}") from None
    if path.is_file():
        return load_weights(model, path, "teacher cache"), {"source": str(path), "cached": True}
    full = build_data(teacher_data(data_config))
    settings = config.train.model_copy(update={"progress": progress})
    if finetune is not None:
        check_finetune(finetune, model, full)
        model, start = obtain_teacher(config, data_config, data, progress=progress,
                                      recipe=recipe)
        logger.info("fine-tuning the teacher (%s) adversarially for %d epoch(s) "
                    "(teacher.finetune)", start["source"], finetune.epochs)
        finetune_teacher(model, finetune, settings, full.train)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(model.state_dict(), path)
        return model, {"source": str(path), "cached": False, "finetuned_from": start["source"]}
    if trainer_recipe.uses_teacher:
        raise ConfigError(f"teacher.recipe: '{trainer_recipe.name}' distils from a teacher and "
                          "cannot train the teacher itself")
    check_task(trainer_recipe, data, "teacher.recipe")
    Distiller(model, None, trainer_recipe, trainer=settings).fit(full.train)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(model.state_dict(), path)
    return model, {"source": str(path), "cached": False}


def check_finetune(finetune: FinetuneConfig, model: nn.Module, data: DataSplits) -> None:
    """Raise a :class:`ConfigError` naming ``teacher.finetune`` when the fine-tuning cannot
    run on ``model`` and ``data`` (checked before the teacher it starts from is trained): its
    ``anchor_tap`` must name a submodule of the model and the training inputs must be float
    (PGD perturbs them)."""
    try:
        resolve_module_taps(model, [finetune.anchor_tap])
    except TapError as error:
        raise ConfigError(f"teacher.finetune.anchor_tap: {error}") from None
    inputs = getattr(data.train, "inputs", None)
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise ConfigError(f"teacher.finetune: adversarial fine-tuning perturbs float inputs "
                          f"(images, feature vectors); data set '{data.name}' has none")


def finetune_teacher(model: nn.Module, finetune: FinetuneConfig, settings: TrainerSettings,
                     train: Any) -> None:
    """Fine-tune the trained ``model`` in place on ``train``: ``finetune``'s objective
    (:class:`~kdistill.recipes.adversarial_training.AdversarialFinetune`), its teacher a frozen
    copy of the model as it is now (the standard model whose features it stays near), with the
    teacher's training ``settings`` at ``finetune.lr_factor`` times the learning rate for
    ``finetune.epochs`` epochs."""
    standard = FrozenTeacher(copy.deepcopy(model))
    Distiller(model, standard, finetune.objective(), trainer=finetune.settings(settings)).fit(train)


def build_phases(config: RunConfig) -> list[Phase]:
    """The run's phases: from ``phases``, or the recipe's own split of ``trainer.epochs``."""
    if config.phases is None:
        spec = dict(config.recipe or {})
        recipe = build_recipe(spec.pop("name"), **spec)
        try:
            return recipe_phases(recipe, config.trainer.epochs)
        except ValueError as error:
            raise ConfigError(f"trainer.epochs: {error}") from None
    phases = []
    for i, phase in enumerate(config.phases):
        spec = dict(phase.recipe)
        recipe = build_recipe(spec.pop("name"), **spec)
        phases.append(Phase(recipe, phase.epochs, name=phase.name or f"{i}-{recipe.name}",
                            optimizer=phase.optimizer, scheduler=phase.scheduler))
    return phases


def build_teacher(config: RunConfig, data: DataSplits, phases: list[Phase], sections: list[str],
                  student: nn.Module) -> tuple[nn.Module | None, nn.Module | TeacherSource | None,
                                               list[Phase]]:
    """The teacher model and what to hand the :class:`Distiller` as teacher, as the first
    teacher-using recipe asks (``Recipe.teacher_model``): a trained teacher, frozen; a
    pretrained one, built from its folder (or loaded from its checkpoint) and frozen; a fresh
    model, which the recipe turns into online peers; or nothing (the recipe makes its teacher
    from the student). Also the phases with every ``layer_map: auto`` measured between
    ``student`` and this teacher (:func:`resolve_run_layer_maps`), whose taps are then
    checked."""
    users = [(p, where) for p, where in zip(phases, sections, strict=True)
             if p.recipe.uses_teacher]
    check_teacher_cache(config, users)
    if config.teacher is None or not users:
        return None, None, phases
    recipe = users[0][0].recipe
    if recipe.teacher_model == "pretrained" and config.teacher.models is not None:
        models = several_teachers(config, data)
        teacher = models[0]  # the run compares the student with the first model
        handed: nn.Module | TeacherSource = models
    elif recipe.teacher_model in ("fresh", "pretrained"):
        fresh = recipe.teacher_model == "fresh"
        teacher = build_from(config.teacher.model, teacher_view(data, recipe),
                             config.trainer.seed + 1 if fresh else 0, "teacher.model")
        if config.teacher.checkpoint is not None:
            load_weights(teacher, Path(config.teacher.checkpoint), "teacher.checkpoint")
        handed = teacher if fresh or recipe.builds_teacher_source else \
            FrozenTeacher(teacher, config.teacher.precision, config.teacher.compile)
    else:
        teacher = trained_teacher(config, data, recipe)
        handed = FrozenTeacher(teacher, config.teacher.precision, config.teacher.compile)
    resolved = resolve_run_layer_maps(config, data, phases, sections, student, teacher)
    users = [(p, where) for p, where in zip(resolved, sections, strict=True)
             if p.recipe.uses_teacher]
    for phase, where in users:
        check_taps(teacher, phase.recipe.teacher_taps(), where, phase.name or "")
    if config.teacher.cache is not None:
        assert isinstance(handed, FrozenTeacher)  # check_teacher_cache refused the others
        handed = CachedTeacher(teacher_cache(config, data, users, handed), live=handed)
    return teacher, handed, resolved


def teacher_view(data: DataSplits, recipe: Recipe) -> DataSplits:
    """``data`` as the teacher of ``recipe`` is built for: with no token count to cover when
    the teacher reads its own tokenization of the text (``Recipe.own_teacher_tokens``: its
    vocabulary is its tokenizer's, not the data's)."""
    return dataclasses.replace(data, num_classes=0) if recipe.own_teacher_tokens else data


def several_teachers(config: RunConfig, data: DataSplits) -> nn.ModuleList:
    """The pretrained models of ``teacher.models``, built for ``data`` as they are, in order:
    what a recipe that learns from several models at once (``several_teachers``) turns into
    its teacher source."""
    assert config.teacher is not None and config.teacher.models is not None
    return nn.ModuleList([build_from(model, data, 0, f"teacher.models.{i}")
                          for i, model in enumerate(config.teacher.models)])


def resolve_run_layer_maps(config: RunConfig, data: DataSplits, phases: list[Phase],
                           sections: list[str], student: nn.Module,
                           teacher: nn.Module) -> list[Phase]:
    """``phases`` with every ``layer_map: auto`` measured as ``kdistill layermap`` measures it
    (:func:`measure_layer_map`: the training inputs drawn with ``data.seed``), its student
    taps checked; a model the map cannot be measured on is a :class:`ConfigError` naming the
    phase's section."""
    pending = [where for p, where in zip(phases, sections, strict=True)
               if layer_map_pending(p.recipe)]
    if not pending:
        return phases
    try:
        resolved = resolve_layer_maps(phases, student, teacher, data.train,
                                      seed=config.data.seed,
                                      batch_size=config.evaluation.batch_size)
    except KdistillError as error:
        raise ConfigError(f"{pending[0]}: layer_map 'auto': {error}") from None
    for phase, where in zip(resolved, sections, strict=True):
        if where in pending:
            check_taps(student, phase.recipe.student_taps(), where, phase.name or "")
    return resolved


def trained_teacher(config: RunConfig, data: DataSplits, recipe: Recipe | None) -> nn.Module:
    """The teacher the teacher-using ``recipe`` distils from (None: no recipe reads one), from
    ``teacher.checkpoint``, the cache, or trained now as :func:`teacher_training` and
    :func:`teacher_finetuning` say (see :func:`obtain_teacher`); with neither ``train`` nor
    ``checkpoint``, the fine-tuned model of its folder (:func:`folder_teacher`)."""
    assert config.teacher is not None
    if config.teacher.train is None and config.teacher.checkpoint is None:
        return folder_teacher(config.teacher.model, data, recipe)
    training = teacher_training(config.teacher, recipe)
    finetune = teacher_finetuning(config.teacher, recipe)
    if config.teacher.train is not None:
        logger.info("teacher: trained by %s%s", training, "" if finetune is None else
                    f", then fine-tuned adversarially ({finetune.model_dump()})")
    teacher, _ = obtain_teacher(config.teacher, config.data, data,
                                progress=config.trainer.progress, recipe=training,
                                finetune=finetune)
    return teacher


def folder_teacher(model: ModelConfig, data: DataSplits, recipe: Recipe | None) -> nn.Module:
    """The teacher as the folder of ``model`` (``hf``, ``hf_text``) holds it: a model already
    fine-tuned, used as it is. Refused before loading when the recipe reads its logits and the
    folder has no head for the data (:func:`~kdistill.models.hf.missing_head`): that head
    would start at random."""
    options = model_options(model.name, model.size, model.options)
    task = options.get("head", "classification") if model.name == "hf" else data.task
    if recipe is not None and "logits" in recipe.teacher_taps():
        problem = missing_head(options["path"], task, data.num_classes)
        if problem is not None:
            raise ConfigError(
                f"teacher.model.options.path: '{options['path']}' is used as it is (no "
                f"teacher.train or teacher.checkpoint), but {problem}, so its {task} head "
                "would start untrained; give a folder fine-tuned for this data, or train the "
                "teacher here with teacher.train")
    logger.info("teacher: %s as its folder holds it", options["path"])
    return build_from(model, data, 0, "teacher.model")


# -- the teacher-signal cache (``teacher.cache``) ---------------------------------------------
def check_teacher_cache(config: RunConfig, users: Sequence[tuple[Phase, str]]) -> None:
    """Refuse ``teacher.cache``, before any teacher work, when no phase reads a teacher or a
    phase's teacher taps can change during the run (:func:`cache_refusal`)."""
    if config.teacher is None or config.teacher.cache is None:
        return
    if not users:
        raise ConfigError("teacher.cache: no phase reads a teacher, so there is nothing to "
                          "cache; remove teacher.cache")
    refusal = cache_refusal(phase.recipe for phase, _ in users)
    if refusal is not None:
        raise ConfigError(f"teacher.cache: {refusal}; remove teacher.cache")


def teacher_cache(config: RunConfig, data: DataSplits, users: Sequence[tuple[Phase, str]],
                  teacher: FrozenTeacher) -> TeacherCache:
    """The cache at ``teacher.cache`` of ``teacher`` on the training split (transfer rows too),
    holding every teacher tap of the phases in ``users``: reused when it matches, built (or
    its unfinished build finished) otherwise."""
    assert config.teacher is not None and config.teacher.cache is not None
    settings = config.teacher.cache
    taps = [tap for phase, _ in users for tap in phase.recipe.teacher_taps()]
    try:
        return TeacherCache.build(teacher, data.train, list(dict.fromkeys(taps)),
                                  Path(settings.path), batch_size=settings.batch_size,
                                  dtype=settings.dtype, top_k=settings.top_k,
                                  sample=(LogitSample(settings.sample,
                                                      settings.sample_temperature,
                                                      settings.sample_seed)
                                          if settings.sample is not None else None),
                                  shard_rows=settings.shard_rows,
                                  progress=config.trainer.progress)
    except CacheError as error:
        raise ConfigError(f"teacher.cache: {error}") from None


def build_teacher_cache(config: RunConfig, data: DataSplits | None = None) -> TeacherCache:
    """``kdistill cache``: the run's teacher cache (``teacher.cache``), built as
    :func:`train_run` would build it (the same data and teacher), without training; for
    ``data`` when given (as :func:`train_run` takes it, e.g. a subset of the training split),
    else the config's."""
    if config.teacher is None or config.teacher.cache is None:
        raise ConfigError("teacher.cache: not set; name the folder to build, e.g. "
                          "--set teacher.cache=cache/teacher")
    check_before_work(config)
    with num_threads(config.cpu_threads):
        data = data if data is not None else build_data(config.data)
        phases = build_phases(config)
        sections = (["recipe"] * len(phases) if config.phases is None else
                    [f"phases.{i}.recipe" for i in range(len(phases))])
        student = build_student(config, data, phases, sections)
        _, source, _ = build_teacher(config, data, phases, sections, student)
    assert isinstance(source, CachedTeacher)
    return source.cache


def measure_layer_map(config: RunConfig, samples: int = DEFAULT_SAMPLES,
                      data: DataSplits | None = None) -> LayerMap:
    """``kdistill layermap``: linear CKA between every hidden state of the config's student,
    as built before training (the network itself, without what a recipe wraps around it), and
    of its teacher, obtained as the run obtains it (:func:`trained_teacher`: from its
    checkpoint, its folder, the cache, or trained now and cached), on ``samples`` training
    inputs drawn with ``data.seed`` (from ``data`` when given, as :func:`train_run` takes it,
    else the config's); with the proposed, free and uniform maps (:mod:`kdistill.layermap`)."""
    if config.teacher is None or not has_trained_weights(config.teacher):
        raise ConfigError("teacher: layermap compares the student with a trained teacher; "
                          f"{TRAINED_WEIGHTS_HINT}")
    check_before_work(config)
    with num_threads(config.cpu_threads):
        data = data if data is not None else build_data(config.data)
        users = [phase.recipe for phase in build_phases(config) if phase.recipe.uses_teacher]
        student = build_from(config.student, data, config.trainer.seed, "student")
        teacher = trained_teacher(config, data, users[0] if users else None)
        return compare_layers_on_data(student, teacher, data.train, samples,
                                      batch_size=config.evaluation.batch_size,
                                      seed=config.data.seed)


@dataclass
class RunOutcome:
    """A finished run: its training result and the comparison rows."""

    fit: FitResult
    rows: list[dict[str, Any]]
    report: Path | None  # None on the other processes of a multi-process run


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process (torchrun/accelerate) run."""
    return PartialState().is_main_process


def compare(models: dict[str, nn.Module], test: Any, *, batch_size: int, threads: int,
            repeats: int) -> tuple[list[dict[str, Any]], str]:
    """Quality and cost of ``models`` on ``test``, side by side in one call; the first model is
    the speed-up reference and a model named ``teacher`` the reference for agreement. Also
    returns a sentence with the machine's load average while timing."""
    batches = eval_batches(test, batch_size)
    rows = benchmark_models(models, batches, reference=next(iter(models)),
                            teacher_logits_from="teacher" if "teacher" in models else None,
                            latency_batch=batches[0], threads=threads, repeats=repeats)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    tokens = input_tokens(batches[0])
    per_token = (f" tok/s: that batch's {tokens} input tokens per second." if tokens is not None
                 else "")
    return list(rows), (f"Latency: median forward time of one batch of {batch_size} on "
                        f"{threads} thread(s), models timed in alternating rounds.{per_token} "
                        "Load average "
                        f"of the machine while timing (1, 5, 15 min): {load}.")


def check_shift_request(config: RunConfig, data: DataSplits) -> None:
    """Raise a :class:`ConfigError` before training when ``evaluation.shifts`` cannot be
    applied to the test data (not image classification, or inputs of the wrong shape)."""
    shifts = config.evaluation.shifts
    if not shifts:
        return
    inputs = getattr(data.test, "inputs", None)
    if data.task != "classification" or not isinstance(inputs, torch.Tensor):
        raise ConfigError(f"evaluation.shifts: shifts apply to image classification data, not "
                          f"to '{data.name}' ({data.task})")
    try:
        check_shifts(inputs, shifts, config.evaluation.shift_severity)
    except ValueError as error:
        raise ConfigError(f"evaluation.shifts: data set '{data.name}': {error}") from None


def add_shift_accuracies(rows: list[dict[str, Any]], models: dict[str, nn.Module], test: Any,
                         config: RunConfig) -> None:
    """Add each model's accuracy under every ``evaluation.shifts`` shift to its row, as
    ``accuracy_<shift>``, and their mean as ``accuracy_shifted``."""
    shifts = config.evaluation.shifts
    if not shifts:
        return
    results = shifted_evaluation(models, test, shifts, config.evaluation.shift_severity,
                                 config.evaluation.batch_size)
    for row in rows:
        accuracies = results[row["name"]]
        row.update({f"accuracy_{shift}": accuracies[shift] for shift in shifts})
        row["accuracy_shifted"] = sum(accuracies[shift] for shift in shifts) / len(shifts)


def run(config: RunConfig, *, resume: bool = False, overwrite: bool = False) -> RunOutcome:
    """Train the configured student and compare it with its teacher (if any). The run folder
    (``output_dir/name``) must be empty unless ``resume`` continues its run or ``overwrite``
    replaces it (see :class:`RunFolder`)."""
    check_before_work(config)
    with num_threads(config.cpu_threads):
        return _run(config, resume, overwrite)


def train_run(config: RunConfig, data: DataSplits, eval_data: Any = None, *,
              run_dir: Path | None = None, resume: bool = False,
              overwrite: bool = False) -> tuple[nn.Module | None, FitResult]:
    """Train ``config``'s student on ``data.train``, its teacher obtained as the recipe asks,
    with end-of-epoch evaluations (and ``keep_best``) on ``eval_data`` (default ``data.test``;
    e.g. a validation split of :func:`kdistill.data.holdout_split`).

    Every check that needs the data runs before a teacher is trained. With ``run_dir``, the
    folder is checked first (:meth:`RunFolder.open`: empty unless ``resume`` or ``overwrite``;
    a resume's config against the run's); once the run has started, the config is saved there
    as ``config.json`` (and ``run.json``) and the engine writes its metrics log, checkpoints
    and final student there. A run that fails before it starts writes nothing there. Returns
    the teacher model (None without one, or when it reads other tokens than the student's
    test rows hold) and the fit; ``deployable(fit.student)`` is the
    model to ship.
    """
    folder = RunFolder.open(run_dir, config, resume=resume, overwrite=overwrite) \
        if run_dir is not None else None
    phases = build_phases(config)
    sections = (["recipe"] * len(phases) if config.phases is None else
                [f"phases.{i}.recipe" for i in range(len(phases))])
    student = build_student(config, data, phases, sections)
    for phase, where in zip(phases, sections, strict=True):
        check_task(phase.recipe, data, where)
        if not layer_map_pending(phase.recipe):  # checked once its map is measured
            check_taps(student, phase.recipe.student_taps(), where, phase.name or "")
    teacher, source, phases = build_teacher(config, data, phases, sections, student)
    if teacher is not None:
        for phase, where in zip(phases, sections, strict=True):
            check_tokenisations(student, teacher, phase.recipe, where)
        rank_by_teacher(data, teacher, config.evaluation.batch_size)
    distiller = Distiller(student, source, phases=phases, trainer=config.trainer,
                          run_dir=run_dir)
    evaluation = data.test if eval_data is None else eval_data
    if distiller.teacher is not None and distiller.teacher.evaluation_source() is None:
        teacher = None  # it reads other tokens (span_kd): no score on the student's test rows
    return teacher, distiller.fit(data.train, evaluation, resume=resume, overwrite=overwrite,
                                  on_start=folder.started if folder is not None else None)


def _run(config: RunConfig, resume: bool, overwrite: bool) -> RunOutcome:
    # Everything that can fail on the config alone fails before a teacher is trained; the run
    # folder is checked first of all.
    run_dir = Path(config.output_dir) / config.name
    RunFolder.open(run_dir, config, resume=resume, overwrite=overwrite)
    data = build_data(config.data)
    check_shift_request(config, data)
    teacher, result = train_run(config, data, run_dir=run_dir, resume=resume,
                                overwrite=overwrite)
    if not is_main_process():
        return RunOutcome(result, [], None)
    models = {"teacher": teacher} if teacher is not None else {}
    models["student"] = deployable(result.student)
    if data.task == "lm":
        export_lm_student(models["student"], run_dir, config.data.options["tokenizer"])
    elif isinstance(models["student"], TextModel):
        export_run_student(models["student"], run_dir,
                           OutputMeaning(data.task, data.label_names, data.target_scale))
    rows, load = compare(models, data.test, batch_size=config.evaluation.batch_size,
                         threads=config.evaluation.threads, repeats=config.evaluation.repeats)
    add_shift_accuracies(rows, models, data.test, config)
    notes = load + relevance_note(data)
    if config.trainer.on_nonfinite == "skip" or result.skipped_steps():
        notes += (f"\n\nSkipped training steps (non-finite loss or gradients, "
                  f"trainer.on_nonfinite: skip): {result.skipped_steps()}.")
    report = write_report(run_dir, title=f"kdistill run: {config.name}", rows=rows,
                          histories={"student": result.history}, notes=notes,
                          settings={"recipe": config.recipe or [
                                        {"phase": p.name, "epochs": p.epochs, **p.recipe}
                                        for p in config.phases or []],
                                    "data": config.data.model_dump()})
    return RunOutcome(result, rows, report)


# -- everything that can be known before training (``kdistill check``) ------------------------
TRIAL_BATCH = 8  # the largest micro-batch of a trial step


def preflight(config: RunConfig) -> DataSplits:
    """Find, without training, the problems a run of ``config`` would meet before or in its
    first steps; raise a :class:`ConfigError` naming the config section.

    Loads the data (every check of a data file), checks the shifts, mixed precision, each
    phase's task and the teacher's training recipe, builds the student and the teacher's
    architecture (loading a teacher checkpoint, training nothing), checks their module taps,
    and then makes a trial: one epoch of every phase over a few training samples (the
    teacher's training too), on these freshly built models, with an evaluation on a few test
    samples. The trial finds what only a forward pass shows: taps a model does not produce,
    shapes an adapter or a loss cannot take, a batch a model cannot run on. Nothing is written
    to disk. A model whose building would run code from its folder
    (:func:`code_running_models`) is not built, and then there is no trial. Returns the data.
    """
    check_before_work(config)
    unbuilt = code_running_models(config)
    with num_threads(config.cpu_threads):
        data = build_data(config.data)
        check_shift_request(config, data)
        phases = build_phases(config)
        sections = (["recipe"] * len(phases) if config.phases is None else
                    [f"phases.{i}.recipe" for i in range(len(phases))])
        for phase, where in zip(phases, sections, strict=True):
            check_task(phase.recipe, data, where)
        users = [(p, where) for p, where in zip(phases, sections, strict=True)
                 if p.recipe.uses_teacher]
        check_teacher_cache(config, users)
        recipe = users[0][0].recipe if users and config.teacher is not None else None
        teacher_phases = teacher_training_phases(config, recipe, data)
        student = None
        if "student" not in unbuilt:
            student = build_student(config, data, phases, sections)
            for phase, where in zip(phases, sections, strict=True):
                if not layer_map_pending(phase.recipe):  # the trial measures its map
                    check_taps(student, phase.recipe.student_taps(), where, phase.name or "")
        teacher = None
        if recipe is not None and not any(w.startswith("teacher.") for w in unbuilt):
            teacher = trial_teacher(config, data, recipe, users, teacher_phases)
            rank_by_teacher(data, teacher.model if isinstance(teacher, FrozenTeacher)
                            else teacher, config.evaluation.batch_size)
        if student is not None and not unbuilt:
            trial_fit(student, teacher, phases, config.trainer, data,
                      "recipe" if config.phases is None else "phases")
    return data


def code_running_models(config: RunConfig) -> list[str]:
    """The model sections (``student``, ``teacher.model``) whose building would run code from
    the model's folder: an ``hf`` model, or an ``oracle`` on an ``hf`` base, with
    ``trust_remote_code: true``. ``kdistill check`` does not build them."""
    sections = [("student", config.student)]
    if config.teacher is not None and config.teacher.models is not None:
        sections += [(f"teacher.models.{i}", m) for i, m in enumerate(config.teacher.models)]
    elif config.teacher is not None:
        sections.append(("teacher.model", config.teacher.model))
    found = []
    for where, model in sections:
        options = model.options
        if model.name == "oracle" and options.get("base") == "hf":
            options = options.get("base_options") or {}
        elif model.name != "hf":
            continue
        if options.get("trust_remote_code") is True:
            found.append(where)
    return found


def check_before_work(config: RunConfig) -> None:
    """The checks of the machine a run needs before any work (loading data, training a
    teacher): a file where the run folder goes, fp16 without a GPU."""
    # load_config checks the run folder too; again here for a RunConfig made in Python.
    problems = check_output_folder(config)
    if problems:
        raise ConfigError(problems[0])
    check_precision(config.trainer, "trainer")
    if config.teacher is not None and config.teacher.train is not None:
        check_precision(config.teacher.train, "teacher.train")


def rank_by_teacher(data: DataSplits, teacher: nn.Module, batch_size: int) -> None:
    """Label unlabelled retrieval queries (``data.train``) by ``teacher``'s own ranking of
    their collection, in place (:meth:`RetrievalPairs.with_teacher_ranking`: its top 10
    relevant, its top passage the positive, the next ones hard negatives); other data is left
    as it is."""
    train = data.train
    if not isinstance(train, RetrievalPairs) or train.ranked:
        return
    assert train.collection is not None
    queries = predict(teacher, text_batches(train.queries, batch_size)).logits
    passages = predict(teacher, text_batches(train.collection, batch_size)).logits
    data.train = train.with_teacher_ranking(rankings(queries, passages, train.ranking_depth))
    logger.info("retrieval: %d training queries labelled by the teacher's own ranking of %d "
                "passages (its top %d relevant)", len(train), len(passages), TEACHER_TOP)


def text_batches(texts: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
    """``texts`` as batches of raw text for :func:`kdistill.evaluate.predict`."""
    return [{"input": list(texts[i:i + batch_size])} for i in range(0, len(texts), batch_size)]


def relevance_note(data: DataSplits) -> str:
    """For retrieval data, a sentence of the report saying where relevance comes from."""
    if data.task != "retrieval":
        return ""
    if getattr(data.test, "teacher_relevance", False):
        return (f"\n\nRetrieval relevance: no labels; each query's relevant passages are the "
                f"teacher's own top {TEACHER_TOP} (so the teacher scores 1 on every ranking "
                "metric, and the student's recall10 is its overlap with the teacher).")
    return ("\n\nRetrieval relevance: the labelled query-passage pairs of the data; "
            "teacher_overlap10 is the share of the teacher's top 10 the model keeps.")


def check_precision(settings: TrainerSettings, where: str) -> None:
    """Raise a :class:`ConfigError` for fp16 mixed precision without a GPU."""
    if settings.mixed_precision == "fp16" and (settings.cpu or not torch.cuda.is_available()):
        raise ConfigError(f"{where}.mixed_precision: 'fp16' needs a GPU (on CPU it would "
                          "silently train in fp32); use 'bf16' on CPU")


def teacher_training_phases(config: RunConfig, distilling: Recipe | None,
                            data: DataSplits) -> list[Phase] | None:
    """The phases that would train the teacher for the first teacher-using recipe
    ``distilling`` (None when no teacher is trained), its recipe checked as
    :func:`obtain_teacher` checks it."""
    if distilling is None or config.teacher is None or config.teacher.train is None \
            or distilling.teacher_model == "fresh":
        return None
    spec = teacher_training(config.teacher, distilling)
    trainer_recipe = build_recipe(spec.pop("name"), **spec)
    if trainer_recipe.uses_teacher:
        raise ConfigError(f"teacher.recipe: '{trainer_recipe.name}' distils from a teacher "
                          "and cannot train the teacher itself")
    check_task(trainer_recipe, data, "teacher.recipe")
    try:
        return recipe_phases(trainer_recipe, config.teacher.train.epochs)
    except ValueError as error:
        raise ConfigError(f"teacher.train.epochs: {error}") from None


def trial_teacher(config: RunConfig, data: DataSplits, recipe: Recipe,
                  users: Sequence[tuple[Phase, str]],
                  teacher_phases: list[Phase] | None) -> nn.Module | TeacherSource:
    """The teacher a trial hands to the :class:`Distiller`, as :func:`build_teacher` would but
    untrained: the architecture (with the checkpoint's weights if one is given), its module
    taps checked for every teacher-using phase in ``users``; a teacher the run would train
    (``teacher_phases``) gets a trial of its own training first, and of its adversarial
    fine-tuning when it has one (:func:`teacher_finetuning`)."""
    assert config.teacher is not None
    if recipe.teacher_model == "pretrained" and config.teacher.models is not None:
        models = several_teachers(config, data)
        for model in models:
            for phase, where in users:
                check_taps(model, phase.recipe.teacher_taps(), where, phase.name or "")
        return models
    fresh = recipe.teacher_model == "fresh"
    train = config.teacher.train
    seed = config.trainer.seed + 1 if fresh else train.seed if train is not None else 0
    teacher = build_from(config.teacher.model, teacher_view(data, recipe), seed,
                         "teacher.model")
    if config.teacher.checkpoint is not None:
        load_weights(teacher, Path(config.teacher.checkpoint), "teacher.checkpoint")
    for phase, where in users:
        if not layer_map_pending(phase.recipe):  # the trial measures its map
            check_taps(teacher, phase.recipe.teacher_taps(), where, phase.name or "")
    if fresh:
        return teacher
    if train is not None and teacher_phases is not None:
        full = data if teacher_data(config.data) == config.data else \
            build_data(teacher_data(config.data))
        finetune = teacher_finetuning(config.teacher, recipe)
        if finetune is not None:
            check_finetune(finetune, teacher, full)
        trial_fit(teacher, None, teacher_phases, train, full, "teacher.train")
        if finetune is not None:
            trial_fit(teacher, FrozenTeacher(copy.deepcopy(teacher)),
                      [Phase(finetune.objective(), finetune.epochs)], finetune.settings(train),
                      full, "teacher.finetune")
    if recipe.builds_teacher_source:
        return teacher
    return FrozenTeacher(teacher, config.teacher.precision, config.teacher.compile)


def trial_fit(student: nn.Module, teacher: nn.Module | TeacherSource | None,
              phases: Sequence[Phase], settings: TrainerSettings, data: DataSplits,
              where: str) -> None:
    """One epoch of each phase over a few training samples (labelled and unlabelled ones, at
    most :data:`TRIAL_BATCH` per micro-batch) with an evaluation on a few test samples; a
    failure is a one-line :class:`ConfigError` naming the section ``where``."""
    batch = min(settings.batch_size, TRIAL_BATCH)
    per_kind = batch * settings.accumulation
    labeled = labeled_indices(data.train)
    known = set(labeled)
    unlabeled = [i for i in range(len(data.train)) if i not in known][:per_kind]
    rows = sorted(labeled[:per_kind] + unlabeled)
    train, test = data.train.select(rows), data.test.select(range(min(len(data.test), batch)))
    trial = settings.model_copy(update={"epochs": 1, "batch_size": batch, "progress": False,
                                        "checkpoint_every": None})
    try:
        Distiller(student, teacher, phases=[dataclasses.replace(p, epochs=1) for p in phases],
                  trainer=trial).fit(train, test)
    except ConfigError:
        raise
    except (KdistillError, ValueError, TypeError, RuntimeError, IndexError, KeyError) as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"{where}: a trial step on {len(rows)} training samples failed: "
                          f"{message}") from None
