"""Run configuration: YAML loaded safely and validated by pydantic into typed settings.

A config can only name registered things (data sets, models, recipes, losses); it never names
import paths or code. Every error says which field is at fault as a dotted path
(``trainer.optimizer.lr``) and, for names, the closest valid ones. All checks run before any
work starts.
"""

from __future__ import annotations

import csv
import inspect
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from kdistill.data import DATASETS, LM_DATASETS, TEXT_DATASETS, UNLABELED_CORPORA
from kdistill.data.lm import TOKENIZER_FILE
from kdistill.data.tables import csv_header, printable
from kdistill.data.text_files import text_file_columns
from kdistill.errors import KdistillError
from kdistill.models.hf import model_folder
from kdistill.models.lm import is_gguf
from kdistill.models.registry import (
    CONTEXT_PARAMETERS,
    FOLDER_CLASSIFIERS,
    MODEL_FILE_CHECKS,
    MODEL_SIZES,
    MODELS,
)
from kdistill.names import unknown_name
from kdistill.recipes import RECIPES, build_recipe
from kdistill.recipes.adversarial_training import AdversarialFinetune, AdversarialFinetuneParams
from kdistill.settings import (
    MAX_SEVERITY,
    RUN_NAME_PATTERN,
    OptimizerSettings,
    SchedulerSettings,
    Seed,
    Shift,
    Strict,
    Threads,
    TrainerSettings,
)
from kdistill.text_augment import TextAugmentSettings


class ConfigError(KdistillError):
    """A configuration that cannot run; the message names each bad field."""


def _exactly_one(first: str, first_value: Any, second: str, second_value: Any,
                 hint: str) -> None:
    """Raise when both or neither of two alternative sections are given."""
    if first_value is not None and second_value is not None:
        raise ValueError(f"both '{first}' and '{second}' are given; give exactly one ({hint})")
    if first_value is None and second_value is None:
        raise ValueError(f"neither '{first}' nor '{second}' is given; give exactly one ({hint})")


class DataConfig(Strict):
    """Which data: a built-in set (``digits``, ``digit-lines``, ``mnist5k``, ``fashion-mnist``,
    ``diabetes``, ``rotten-tomatoes``...) or a user file (``npz``, ``csv``, ``text``, ``conll``,
    ``hf_dataset``, ``sentences``, ``retrieval`` + ``path``); ``options`` are passed to the
    loader (e.g. ``train_size`` for ``fashion-mnist``, ``text_column`` for ``text``).
    ``unlabeled`` adds unlabelled transfer text to a text data set's training split: plain text
    files (one text per line) or built-in corpora (``guardian-headlines``), fed to the
    distillation terms only. ``augment`` adds
    augmented copies of the training texts to that transfer set (TinyBERT-style word
    replacement, word dropout and swaps; see :class:`TextAugmentSettings`)."""

    name: str = "digits"
    path: str | None = None
    label_column: str = "label"
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    labeled: int | None = Field(default=None, ge=1)
    seed: Seed = 0
    unlabeled: str | list[str] | None = None
    augment: TextAugmentSettings | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def unlabeled_sources(self) -> list[str]:
        """``unlabeled`` as a list (empty when there is none)."""
        return [self.unlabeled] if isinstance(self.unlabeled, str) else list(self.unlabeled or [])


class ModelConfig(Strict):
    """A registered model, a size preset and explicit builder options."""

    name: str
    size: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class CacheConfig(Strict):
    """A teacher-signal cache (``teacher.cache``; :mod:`kdistill.cache`): the teacher runs once
    over the training split (transfer rows too) and the student reads its taps from the folder
    ``path``, built on first use and reused while it matches the teacher, data and taps.
    ``dtype`` stores float taps in fp32, fp16 or bf16; ``top_k`` stores the logits as their k
    largest values plus the tail's mass; ``sample`` stores them as that many tokens drawn from
    the teacher's distribution with importance weights (random-sampling KD; the draws'
    proposal is the teacher at ``sample_temperature``, their generator seeded ``sample_seed``);
    ``batch_size`` is the teacher's batch while building; ``shard_rows`` the rows of a shard
    (default 4,096), which the build holds in memory while writing it: lower it for large rows
    (a language model's dense logits). ``teacher.cache: PATH`` is short for ``{path: PATH}``."""

    path: str = Field(min_length=1)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    top_k: int | None = Field(default=None, ge=1)
    sample: int | None = Field(default=None, ge=1)
    sample_temperature: float = Field(default=1.0, gt=0)
    sample_seed: int = Field(default=0, ge=0, lt=2**31)
    batch_size: int = Field(default=64, ge=1)
    shard_rows: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_sparse_form(self) -> CacheConfig:
        if self.top_k is not None and self.sample is not None:
            raise ValueError("top_k and sample are two ways to store the logits; give one")
        unused = {"sample_temperature", "sample_seed"} & self.model_fields_set
        if self.sample is None and unused:
            raise ValueError(f"{sorted(unused)} set the sampling of the logits; set sample (the "
                             "number of draws) too, or remove them")
        return self

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class FinetuneConfig(AdversarialFinetuneParams):
    """Adversarial fine-tuning of the trained teacher (``teacher.finetune``; DAFT, Nasery et
    al. 2022): once trained (``teacher.train``, ``teacher.recipe``), the teacher trains
    ``epochs`` more epochs on the objective of
    :class:`~kdistill.recipes.adversarial_training.AdversarialFinetune`, whose parameters are
    the other fields (PGD: ``epsilon``, ``steps``, ``step_size``, ``random_start``,
    ``value_range``; the clean cross-entropy's ``clean_weight``; the feature anchor to the
    standard model, ``anchor_weight`` and ``anchor_tap``), with the settings of
    ``teacher.train`` except the learning rate, multiplied by ``lr_factor``. Defaults: 3
    epochs, a tenth of the learning rate, epsilon 0.1 in 5 steps, ``clean_weight`` 0.5,
    ``anchor_weight`` 1 on ``module:features``. The fine-tuned teacher is cached under its own
    key; the teacher it starts from is the one ``teacher.train`` gives alone (cached and
    shared)."""

    epochs: int = Field(default=3, ge=1, strict=True)
    lr_factor: float = Field(default=0.1, gt=0, le=1, strict=True)

    def objective(self) -> AdversarialFinetune:
        """The fine-tuning objective with this section's parameters."""
        return AdversarialFinetune(**self.model_dump(exclude={"epochs", "lr_factor"}))

    def settings(self, train: TrainerSettings) -> TrainerSettings:
        """``train`` (the teacher's training settings) for the fine-tuning: ``epochs`` epochs
        at ``lr_factor`` times its learning rate."""
        optimizer = train.optimizer.model_copy(update={"lr": train.optimizer.lr * self.lr_factor})
        return train.model_copy(update={"epochs": self.epochs, "optimizer": optimizer})


class TeacherConfig(Strict):
    """The teacher: a model loaded from ``checkpoint`` (safetensors) or trained with ``train``
    on every training label (cached on disk) by ``recipe`` and then, with ``finetune``,
    fine-tuned adversarially (:class:`FinetuneConfig`). When neither ``recipe`` nor
    ``finetune`` is given, the distillation recipe says how: its ``teacher_recipe`` (plain
    cross-entropy for most), followed by the default fine-tuning when its
    ``teacher_finetune`` is set (``daft``). A recipe whose peers train online
    (``teacher_model: fresh``) takes the model freshly initialised, and an embedding recipe
    (``teacher_model: pretrained``) the model as built (a sentence encoder from its folder) or
    from ``checkpoint``: give no ``train``. A model read from its folder (``hf``, ``hf_text``) with
    neither ``train`` nor ``checkpoint`` is a fine-tuned teacher used as it is
    (:func:`kdistill.run.folder_teacher`). ``cache``
    runs the frozen teacher once and trains the student from its stored answers. A frozen
    teacher runs its forward in ``precision`` (autocast; taps come back in float32) and, with
    ``compile``, through ``torch.compile`` (see :class:`kdistill.teachers.FrozenTeacher`).

    A recipe that learns from several pretrained models at once (``ka``) takes them as
    ``models``, a list of model sections, in place of ``model`` (which then stands for the
    first of them)."""

    model: ModelConfig
    models: list[ModelConfig] | None = Field(default=None, min_length=1)
    checkpoint: str | None = None
    train: TrainerSettings | None = None
    recipe: dict[str, Any] | None = None
    finetune: FinetuneConfig | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    cache: CacheConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _model_or_models(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and value.get("models") is not None:
            if "model" in value:
                raise ValueError("both 'model' and 'models' are given; give 'model' for one "
                                 "teacher or 'models' for several")
            models = value["models"]
            if isinstance(models, list) and models:
                return {**value, "model": models[0]}
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if self.models is not None and self.checkpoint is not None:
            raise ValueError("'checkpoint' loads the weights of one teacher; with 'models' "
                             "give each model's own weights in its options (e.g. hf_lm's path)")
        if self.checkpoint is not None and self.train is not None:
            raise ValueError("both 'checkpoint' and 'train' are given; give one (load weights "
                             "from 'checkpoint' or train the teacher with 'train')")
        if self.recipe is not None and self.train is None:
            raise ValueError("'recipe' says how to train the teacher and needs 'train'")
        if self.finetune is not None and self.train is None:
            raise ValueError("'finetune' fine-tunes the teacher that 'train' trains and needs "
                             "'train'")
        return self


class PhaseConfig(Strict):
    """One phase: a recipe (``name`` + its parameters) for some epochs."""

    name: str | None = None
    recipe: dict[str, Any]
    epochs: int = Field(ge=1)
    optimizer: OptimizerSettings | None = None
    scheduler: SchedulerSettings | None = None


class EvaluationConfig(Strict):
    """How the final comparison measures latency, and which distribution shifts of the test
    images it also scores accuracy under (:mod:`kdistill.data.shifts`; none by default)."""

    batch_size: int = Field(default=64, ge=1)
    threads: Threads = 2
    repeats: int = Field(default=20, ge=1)
    shifts: list[Shift] = Field(default_factory=list)
    shift_severity: float = Field(default=3.0, ge=0.0, le=MAX_SEVERITY)


class RunConfig(Strict):
    """A whole run. Give ``recipe`` (one method, phases derived from it) or ``phases``.

    ``cpu_threads`` sets torch's CPU threads for the whole run (teacher training, distillation,
    evaluation); unset keeps torch's default. Small models often train fastest on 1 thread.
    """

    name: str = Field(default="run", pattern=RUN_NAME_PATTERN, max_length=255)
    output_dir: str = Field(default="runs", min_length=1)
    cpu_threads: Threads | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig
    teacher: TeacherConfig | None = None
    recipe: dict[str, Any] | None = None
    phases: list[PhaseConfig] | None = None
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _recipe_or_phases(self) -> RunConfig:
        _exactly_one("recipe", self.recipe, "phases", self.phases,
                     "one method with 'recipe', or a list of 'phases'")
        return self


# -- error messages ---------------------------------------------------------------------------
def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _field_model(current: Any, part: Any) -> tuple[bool, Any]:
    """Whether ``part`` names a field of the model class ``current``, and the model inside
    that field's annotation (``None`` when the field holds no model)."""
    if not (inspect.isclass(current) and issubclass(current, BaseModel)):
        return False, None
    info = current.model_fields.get(str(part))
    if info is None:
        return False, None
    return True, _inner_model(info.annotation)


def _clean_loc(model: type[BaseModel], loc: Sequence[Any],
               key_error: bool) -> tuple[list[Any], type[BaseModel] | None, bool]:
    """The location without pydantic's union-member tags (``function-after[...]``, ``float``),
    the model class holding its last field, and whether a tag was removed at the very end
    (an error of one scalar member of a union, e.g. ``weight: float | Schedule``)."""
    cleaned: list[Any] = []
    current: Any = model
    holder: Any = model
    trailing_tag = False
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        trailing_tag = False
        if isinstance(part, int) or current is None:
            cleaned.append(part)
            continue
        is_field, inner = _field_model(current, part)
        if is_field or (last and key_error):
            cleaned.append(part)
            holder = current
            current = inner
        elif inspect.isclass(current) and issubclass(current, BaseModel):
            trailing_tag = last  # a union member tag: skip it
        else:
            cleaned.append(part)
    valid_holder = holder if inspect.isclass(holder) and issubclass(holder, BaseModel) else None
    return cleaned, valid_holder, trailing_tag


def _inner_model(annotation: Any) -> Any:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_validation_error(error: ValidationError, model: type[BaseModel],
                            prefix: Sequence[Any] = ()) -> list[str]:
    """One ``path: message`` line per pydantic error, with key and value suggestions.

    Union-member tags are removed from the paths, and when one member of a union (say the
    ``float`` of ``float | Schedule``) fails only because the value is a mapping meant for
    another member, that member's error is left out.
    """
    entries: list[tuple[list[Any], str, bool]] = []
    for item in error.errors():
        key_error = item["type"] == "extra_forbidden"
        loc, holder, union_scalar = _clean_loc(model, item["loc"], key_error)
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        if key_error:
            message = unknown_name("key", str(loc[-1]), holder.model_fields if holder else [])
        elif item["type"] == "literal_error" and isinstance(value, str):
            expected = [e.strip().strip("'") for e in
                        str(item.get("ctx", {}).get("expected", "")).replace(" or ", ", ")
                        .split(",")]
            message = unknown_name("value", value, expected)
        elif item["type"] != "missing" and not isinstance(value, Mapping | list):
            message += f" (got {_shown(value)})"
        skip = union_scalar and isinstance(value, Mapping)
        entries.append(([*prefix, *loc], message, skip))
    lines: list[str] = []
    for loc, message, skip in entries:
        others = [e for e in entries if not e[2] and e[0][:len(loc)] == loc]
        if skip and others:
            continue
        line = f"{_dotted(loc)}: {message}"
        if line not in lines:
            lines.append(line)
    return lines


# -- checks of registered names ---------------------------------------------------------------
def _check_name(kind: str, name: str, known: Sequence[str], path: str) -> list[str]:
    return [] if name in known else [f"{path}: {unknown_name(kind, name, known)}"]


def _options_model(name: str, builder: Any, accepted: Sequence[str]) -> type[BaseModel]:
    """A pydantic model of a model builder's options, typed from its signature."""
    hints = typing.get_type_hints(builder, include_extras=True)
    parameters = inspect.signature(builder).parameters
    fields: dict[str, Any] = {}
    for key in accepted:
        default = parameters[key].default
        fields[key] = (hints.get(key, Any), ... if default is inspect.Parameter.empty
                       else default)
    return create_model(f"{name}_options", __config__=ConfigDict(
        extra="forbid", arbitrary_types_allowed=True, strict=True, allow_inf_nan=False), **fields)


def _check_model(model: ModelConfig, path: str) -> list[str]:
    problems = _check_name("model", model.name, list(MODELS), f"{path}.name")
    if problems:
        return problems
    builder = MODELS[model.name]
    sizes = MODEL_SIZES.get(model.name, {})
    if model.size is not None and model.size not in sizes:
        if not sizes:
            return [f"{path}.size: model '{model.name}' has no size '{model.size}'; it has no "
                    "size presets, give its options instead"]
        return [f"{path}.size: {unknown_name(f'{model.name} size', model.size, sizes)}"]
    accepted = [p for p in inspect.signature(builder).parameters
                if p not in ("input_shape", "num_classes", *CONTEXT_PARAMETERS)]
    for key in model.options:
        if key not in accepted:
            problems.append(f"{path}.options.{key}: "
                            + unknown_name(f"{model.name} option", key, accepted))
    if problems:
        return problems
    preset = sizes.get(model.size or "", {})
    required = [p for p, v in inspect.signature(builder).parameters.items()
                if v.default is inspect.Parameter.empty and p in accepted]
    for key in required:
        if key not in model.options and key not in preset:
            problems.append(f"{path}.options.{key}: model '{model.name}' needs '{key}' "
                            f"(or a size: {', '.join(sorted(sizes)) or 'none'})")
    if problems:
        return problems
    options_model = _options_model(model.name, builder, accepted)
    try:
        options = options_model.model_validate({**preset, **model.options}).model_dump()
    except ValidationError as error:
        return format_validation_error(error, options_model, [*path.split("."), "options"])
    files = MODEL_FILE_CHECKS.get(model.name)
    return files(options, f"{path}.options") if files else []


def _recipe_problems(recipe: Mapping[str, Any], path: str) -> tuple[list[str], Any]:
    """Problems of one recipe section and, when there are none, the built recipe."""
    name = recipe.get("name")
    if not isinstance(name, str):
        return [f"{path}.name: a recipe needs a name; valid names: "
                f"{', '.join(sorted(RECIPES))}"], None
    problems = _check_name("recipe", name, list(RECIPES), f"{path}.name")
    if problems:
        return problems, None
    params = {k: v for k, v in recipe.items() if k != "name"}
    try:
        return [], build_recipe(name, **params)  # parameters (tap names too) are validated here
    except ValidationError as error:
        return format_validation_error(error, RECIPES[name].cls.Params, path.split(".")), None
    except (ValueError, TypeError) as error:
        return [f"{path}: {error}"], None


def _check_recipe(recipe: Mapping[str, Any], path: str) -> list[str]:
    return _recipe_problems(recipe, path)[0]


FILE_DATASETS = ("npz", "csv", "text", "conll", "hf_dataset", "sentences", "retrieval",
                 *LM_DATASETS)  # the data sets that read data.path
NAMED_COLUMNS = ("csv", "text", "hf_dataset")  # the data sets that take data.label_column
FOLDER_DATASETS = ("hf_dataset", "lm_hf_dataset")  # data.path may be a folder


def _check_data(data: DataConfig) -> list[str]:
    problems = _check_name("data set", data.name, list(DATASETS), "data.name")
    if problems:
        return problems
    problems = _check_data_options(data) + unlabeled_problems(data)
    if data.name not in FILE_DATASETS:
        if data.path is not None:
            problems.append(f"data.path: data set '{data.name}' is built in and reads no file; "
                            f"use one of {', '.join(FILE_DATASETS)} for your own data")
        return problems
    if data.path is None:
        return [*problems, f"data.path: data set '{data.name}' needs a file path"]
    path = Path(data.path)
    if path.is_dir() and data.name not in FOLDER_DATASETS:
        return [*problems, f"data.path: {data.path} is a folder, not a file"]
    if not path.exists():
        return [*problems, f"data.path: file not found: {data.path}"]
    if data.name == "csv":
        problems += _check_csv_header(path, data.label_column)
    if data.name == "text" and not problems:
        problems += _check_text_columns(path, data)
    return problems


def unlabeled_problems(data: DataConfig) -> list[str]:
    """``data.unlabeled`` given for a data set that is not text, or naming a file that does
    not exist (and is not a built-in corpus)."""
    sources = data.unlabeled_sources
    if sources and data.name not in TEXT_DATASETS:
        return [f"data.unlabeled: data set '{data.name}' is not text; unlabelled transfer texts "
                f"go with a text data set ({', '.join(TEXT_DATASETS)})"]
    return [f"data.unlabeled: file not found: {source} (give plain text files, one text per "
            f"line, or a built-in corpus: {', '.join(UNLABELED_CORPORA)})"
            for source in sources if source not in UNLABELED_CORPORA
            and not Path(source).is_file()]


def _check_text_columns(path: Path, data: DataConfig) -> list[str]:
    """The columns a ``text`` data set reads, against its file's columns (a CSV or TSV
    header, or the fields of the first JSON line)."""
    try:
        present = text_file_columns(path)
    except (OSError, ValueError) as error:
        return [f"data.path: {error}"]
    defaults = inspect.signature(DATASETS[data.name]).parameters
    wanted = {f"data.options.{key}": data.options.get(key, defaults[key].default)
              for key in ("text_column", "pair_column")}
    wanted["data.label_column"] = data.label_column
    return [f"{field}: " + unknown_name(f"{path.name} column", column, present)
            for field, column in wanted.items() if column is not None and column not in present]


def _check_data_options(data: DataConfig) -> list[str]:
    """``data.options`` against the loader's keyword parameters (names and types), and the
    ``data`` fields given explicitly that this data set would ignore."""
    loader = DATASETS[data.name]
    parameters = inspect.signature(loader).parameters
    own = {"seed": "data.seed", "test_fraction": "data.test_fraction"}
    if data.name in FILE_DATASETS:
        own["path"] = "data.path"
    if data.name in NAMED_COLUMNS:
        own["label_column"] = "data.label_column"
    accepted = [p for p in parameters if p not in own]
    problems = []
    for key in data.options:
        if key in own and key in parameters:
            problems.append(f"data.options.{key}: give it as {own[key]}, not as an option")
        elif not accepted:
            problems.append(f"data.options.{key}: data set '{data.name}' takes no options")
        elif key not in accepted:
            problems.append(f"data.options.{key}: "
                            + unknown_name(f"{data.name} option", key, accepted))
    if not problems:
        model = _options_model(f"{data.name}_data", loader, accepted)
        try:
            model.model_validate(data.options)
        except ValidationError as error:
            problems += format_validation_error(error, model, ["data", "options"])
    given = data.model_fields_set
    if "test_fraction" in given and "test_fraction" not in parameters:
        problems.append(f"data.test_fraction: data set '{data.name}' has its own test split; "
                        "remove test_fraction")
    if "label_column" in given and data.name not in NAMED_COLUMNS:
        problems.append(f"data.label_column: only the data sets {', '.join(NAMED_COLUMNS)} "
                        f"have named columns, not '{data.name}'; remove label_column")
    for option in ("test_path", "passages"):
        file = data.options.get(option)
        if not problems and isinstance(file, str) and not Path(file).is_file():
            problems.append(f"data.options.{option}: file not found: {file}")
    tokenizer = data.options.get("tokenizer")
    if not problems and data.name in LM_DATASETS and isinstance(tokenizer, str):
        problems += _tokenizer_problems(tokenizer)
    return problems


def _tokenizer_problems(tokenizer: str) -> list[str]:
    """A language-modelling data set's ``tokenizer``: a GGUF file or a folder holding a
    ``tokenizer.json`` (or the name of an installed model)."""
    try:
        located = model_folder(tokenizer)
    except FileNotFoundError as error:
        return [f"data.options.tokenizer: {error}"]
    if is_gguf(located):
        return [] if located.is_file() else [
            f"data.options.tokenizer: GGUF file not found: {tokenizer}"]
    if not (located / TOKENIZER_FILE).is_file():
        return [f"data.options.tokenizer: no {TOKENIZER_FILE} in {tokenizer} (give the "
                "teacher's model folder or GGUF file: the student shares its tokenizer)"]
    return []


def folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a folder to write into (it, or the nearest of its parents
    that exists, is a file), or None when it can."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            if os.path.isdir(candidate):
                return None
            if candidate == path:
                return f"{path} is a file, not a folder"
            return f"{candidate} is a file, so {path} cannot be a folder"
    return None


def check_output_folder(config: RunConfig) -> list[str]:
    """A problem when the run's folder ``<output_dir>/<name>`` cannot be created because a file
    is in the way (the output folder itself, one of its parents, or the run folder)."""
    output = Path(config.output_dir)
    problem = folder_problem(output)
    if problem is not None:
        return [f"output_dir: {problem}"]
    problem = folder_problem(output / config.name)
    if problem is not None:
        return [f"name: {problem} (a run writes into <output_dir>/<name>)"]
    return []


def _check_csv_header(path: Path, label_column: str) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            header = csv_header(path, csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return [f"data.path: cannot read {path} as CSV: {error}"]
    except ValueError as error:  # empty, or a blank or repeated column name
        return [f"data.path: {error}"]
    if label_column not in header:
        return ["data.label_column: " + unknown_name(f"{path.name} column", label_column, header)]
    return []


def check_registered(config: RunConfig) -> list[str]:
    """Problems with registered names, recipe parameters, tap names, files and the split of
    the budget into phases (empty when the config is fine)."""
    problems = (check_output_folder(config) + _check_data(config.data)
                + _check_model(config.student, "student"))
    if config.teacher is not None:
        if config.teacher.models is None:
            problems += _check_model(config.teacher.model, "teacher.model")
        for i, model in enumerate(config.teacher.models or []):
            problems += _check_model(model, f"teacher.models.{i}")
        if config.teacher.checkpoint and not Path(config.teacher.checkpoint).is_file():
            problems.append(f"teacher.checkpoint: file not found: {config.teacher.checkpoint}")
    specs = ([("recipe", config.recipe)] if config.recipe is not None else
             [(f"phases.{i}.recipe", p.recipe) for i, p in enumerate(config.phases or [])])
    recipes = []
    for path, spec in specs:
        found, recipe = _recipe_problems(spec, path)
        problems += found
        recipes.append(recipe)
    if problems:
        return problems
    if config.recipe is not None:
        try:
            recipes = [r for r, _ in recipes[0].phases(config.trainer.epochs)]
        except ValueError as error:
            problems.append(f"trainer.epochs: {error}")
    users = [r for r in recipes if r.uses_teacher]
    if users:
        problems += _check_teacher_role(config.teacher, users[0])
    if config.teacher is not None and config.teacher.recipe is not None:
        problems += _check_recipe(config.teacher.recipe, "teacher.recipe")
    return problems


TRAINED_WEIGHTS_HINT = ("give teacher.checkpoint or teacher.train (or a fine-tuned model "
                        f"folder: {', '.join(FOLDER_CLASSIFIERS)})")


def has_trained_weights(teacher: TeacherConfig) -> bool:
    """Whether the teacher comes trained: loaded from ``checkpoint``, trained by the run
    (``train``), or a model folder (:data:`FOLDER_CLASSIFIERS`) used as it is."""
    return (teacher.checkpoint is not None or teacher.train is not None
            or teacher.model.name in FOLDER_CLASSIFIERS)


def _check_teacher_role(teacher: TeacherConfig | None, recipe: Any) -> list[str]:
    """Whether the teacher section gives what the recipe's ``teacher_model`` asks for."""
    kind = recipe.teacher_model
    if kind == "none":
        return [] if teacher is None else [
            f"teacher: recipe '{recipe.name}' makes its teacher from the student; remove the "
            "'teacher' section"]
    if teacher is None:
        return [f"teacher: recipe '{recipe.name}' needs a teacher; add a 'teacher' section"]
    if teacher.models is not None and not recipe.several_teachers:
        several = sorted(name for name, entry in RECIPES.items() if entry.cls.several_teachers)
        return [f"teacher.models: recipe '{recipe.name}' distils one teacher; give it as "
                f"teacher.model (recipes that learn from several models: {several})"]
    if recipe.builds_teacher_source:
        for field, value, default in (("precision", teacher.precision, "fp32"),
                                      ("compile", teacher.compile, False)):
            if value != default:
                return [f"teacher.{field}: recipe '{recipe.name}' runs its teacher models "
                        f"itself, in fp32 and uncompiled; remove teacher.{field}"]
    if kind == "pretrained" and teacher.train is not None:
        return [f"teacher.train: recipe '{recipe.name}' distils a pretrained teacher as it is "
                "(built from teacher.model, or loaded from teacher.checkpoint); remove "
                "teacher.train"]
    if kind == "fresh" and teacher.train is not None:
        return [f"teacher.train: recipe '{recipe.name}' trains its teacher online with the "
                "student from a fresh model; remove teacher.train (or give a checkpoint to "
                "start from)"]
    if kind == "trained" and not has_trained_weights(teacher):
        return [f"teacher: recipe '{recipe.name}' distils a trained teacher; "
                f"{TRAINED_WEIGHTS_HINT}"]
    return []


# -- loading ----------------------------------------------------------------------------------
class _SafeUniqueLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only: no Python objects), refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A short description of a YAML error with its line and column."""
    if isinstance(error, yaml.MarkedYAMLError):
        problem = error.problem or "invalid YAML"
        if "could not determine a constructor" in problem:
            problem += (" (configs are plain data: tags that build Python objects are not "
                        "allowed)")
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({error.context})" if error.context else ""
        return f"{problem}{context}{where}"
    if isinstance(error, yaml.reader.ReaderError):
        return (f"unacceptable character #x{error.character:04x} at position {error.position} "
                "(YAML allows no control characters)")
    return " ".join(str(error).split())


def safe_load_yaml(text: str, source: str = "config") -> Any:
    """Parse YAML text as plain data (safe loader, duplicate keys refused)."""
    try:
        return yaml.load(text, Loader=_SafeUniqueLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(printable(f"{source}: not valid YAML: {_yaml_problem(error)}")
                          ) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw config dict in place."""
    try:
        _apply_override(raw, assignment)
    except ConfigError as error:  # a line break in the assignment must not split the message
        raise ConfigError(printable(str(error))) from None


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. trainer.epochs=3")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: empty field name in '{key}'")
    value = safe_load_yaml(text, f"--set {assignment}")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' is not an "
                                  f"index of a list of {len(node)}")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' is a value, "
                              "not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: '{last}' is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def invalid(source: str, problems: Sequence[str]) -> ConfigError:
    """The error for a config with ``problems``: one line (``source: field: message``) for one
    problem, a header line and an indented line per problem for several."""
    problems = [printable(problem) for problem in problems]
    if len(problems) == 1:
        return ConfigError(f"{source}: {problems[0]}")
    return ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems))


Model = TypeVar("Model", bound=BaseModel)


def validated_sections(raw: Any, schema: type[Model], source: str) -> Model:
    """``raw`` (a mapping of sections read from ``source``) validated as ``schema``; a
    :class:`ConfigError` lists every problem by its field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise invalid(source, format_validation_error(error, schema)) from None


def parse_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`; raise :class:`ConfigError` listing
    every problem."""
    config = validated_sections(raw, RunConfig, source)
    problems = check_registered(config)
    if problems:
        raise invalid(source, problems)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file safely, apply ``--set`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the file as UTF-8 text ({error})") from None
    raw = safe_load_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_config(raw, str(path))
