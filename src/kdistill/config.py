"""Run configuration: YAML loaded safely and validated by pydantic into typed settings.

A config can only name registered things (data sets, models, recipes, losses); it never names
import paths or code. Every error says which field is at fault as a dotted path
(``trainer.optimizer.lr``) and, for names, the closest valid ones. All checks run before any
work starts.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from kdistill.settings import OptimizerSettings, SchedulerSettings, Strict, TrainerSettings


class ConfigError(ValueError):
    """A configuration that cannot run; the message names each bad field."""


class DataConfig(Strict):
    """Which data: a built-in set (``digits``) or a user file (``npz``, ``csv`` + ``path``)."""

    name: str = "digits"
    path: str | None = None
    label_column: str = "label"
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    labeled: int | None = Field(default=None, ge=1)
    seed: int = 0


class ModelConfig(Strict):
    """A registered model, a size preset and explicit builder options."""

    name: str
    size: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class TeacherConfig(Strict):
    """The teacher: a model loaded from ``checkpoint`` (safetensors) or trained with ``train``
    (plain cross-entropy on every training label, cached on disk)."""

    model: ModelConfig
    checkpoint: str | None = None
    train: TrainerSettings | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (self.train is None):
            raise ValueError("give exactly one of 'checkpoint' or 'train'")
        return self


class PhaseConfig(Strict):
    """One phase: a recipe (``name`` + its parameters) for some epochs."""

    name: str | None = None
    recipe: dict[str, Any]
    epochs: int = Field(ge=1)
    optimizer: OptimizerSettings | None = None
    scheduler: SchedulerSettings | None = None


class EvaluationConfig(Strict):
    """How the final comparison measures latency."""

    batch_size: int = Field(default=64, ge=1)
    threads: int = Field(default=2, ge=1)
    repeats: int = Field(default=20, ge=1)


class RunConfig(Strict):
    """A whole run. Give ``recipe`` (one method, phases derived from it) or ``phases``."""

    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig
    teacher: TeacherConfig | None = None
    recipe: dict[str, Any] | None = None
    phases: list[PhaseConfig] | None = None
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="after")
    def _recipe_or_phases(self) -> RunConfig:
        if (self.recipe is None) == (self.phases is None):
            raise ValueError("give exactly one of 'recipe' or 'phases'")
        return self


# -- error messages ---------------------------------------------------------------------------
def _dotted(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _model_at(model: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model class that holds the field at ``loc`` (to suggest valid keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (inspect.isclass(current) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(str(part))
        if info is None:
            return None
        current = _inner_model(info.annotation)
    return current if inspect.isclass(current) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def close_names(name: str, known: Sequence[str]) -> str:
    """``; did you mean 'x'?`` or the list of valid names."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "; valid: " + ", ".join(sorted(known))


def format_validation_error(error: ValidationError, model: type[BaseModel],
                            prefix: Sequence[Any] = ()) -> list[str]:
    """One ``path: message`` line per pydantic error, with key suggestions."""
    lines = []
    for item in error.errors():
        loc = [*prefix, *item["loc"]]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            holder = _model_at(model, item["loc"])
            known = list(holder.model_fields) if holder else []
            message = f"unknown key '{item['loc'][-1]}'" + (
                close_names(str(item["loc"][-1]), known) if known else "")
        lines.append(f"{_dotted(loc)}: {message}")
    return lines


# -- checks of registered names ---------------------------------------------------------------
def _check_name(kind: str, name: str, known: Sequence[str], path: str) -> list[str]:
    return [] if name in known else [f"{path}: unknown {kind} '{name}'{close_names(name, known)}"]


def _check_model(model: ModelConfig, path: str) -> list[str]:
    from kdistill.models.registry import MODEL_SIZES, MODELS

    problems = _check_name("model", model.name, list(MODELS), f"{path}.name")
    if problems:
        return problems
    sizes = MODEL_SIZES.get(model.name, {})
    if model.size is not None and model.size not in sizes:
        problems.append(f"{path}.size: model '{model.name}' has no size '{model.size}'"
                        + close_names(model.size, list(sizes) or ["(none)"]))
    accepted = [p for p in inspect.signature(MODELS[model.name]).parameters
                if p not in ("input_shape", "num_classes")]
    for key in model.options:
        if key not in accepted:
            problems.append(f"{path}.options.{key}: model '{model.name}' has no option "
                            f"'{key}'{close_names(key, accepted)}")
    required = [p for p, v in inspect.signature(MODELS[model.name]).parameters.items()
                if v.default is inspect.Parameter.empty and p in accepted]
    preset = sizes.get(model.size or "", {})
    for key in required:
        if key not in model.options and key not in preset:
            problems.append(f"{path}.options.{key}: model '{model.name}' needs '{key}' "
                            f"(or a size: {', '.join(sorted(sizes)) or 'none'})")
    return problems


def _check_recipe(recipe: Mapping[str, Any], path: str) -> list[str]:
    from kdistill.recipes import RECIPES

    name = recipe.get("name")
    if not isinstance(name, str):
        return [f"{path}.name: a recipe needs a name; valid: {', '.join(sorted(RECIPES))}"]
    problems = _check_name("recipe", name, list(RECIPES), f"{path}.name")
    if problems:
        return problems
    params_model = RECIPES[name].cls.Params
    try:
        params_model(**{k: v for k, v in recipe.items() if k != "name"})
    except ValidationError as error:
        return format_validation_error(error, params_model, path.split("."))
    return []


def _check_data(data: DataConfig) -> list[str]:
    from kdistill.data import DATASETS

    problems = _check_name("data set", data.name, list(DATASETS), "data.name")
    if data.name in ("npz", "csv") and data.path is None:
        problems.append(f"data.path: data set '{data.name}' needs a file path")
    if data.path is not None and not Path(data.path).is_file():
        problems.append(f"data.path: file not found: {data.path}")
    return problems


def check_registered(config: RunConfig) -> list[str]:
    """Problems with registered names and recipe parameters (empty when the config is fine)."""
    problems = _check_data(config.data) + _check_model(config.student, "student")
    if config.teacher is not None:
        problems += _check_model(config.teacher.model, "teacher.model")
        if config.teacher.checkpoint and not Path(config.teacher.checkpoint).is_file():
            problems.append(f"teacher.checkpoint: file not found: {config.teacher.checkpoint}")
    if config.recipe is not None:
        problems += _check_recipe(config.recipe, "recipe")
    for i, phase in enumerate(config.phases or []):
        problems += _check_recipe(phase.recipe, f"phases.{i}.recipe")
    if not problems and config.teacher is None and _needs_teacher(config):
        problems.append("teacher: the recipe needs a teacher; add a 'teacher' section")
    return problems


def _needs_teacher(config: RunConfig) -> bool:
    from kdistill.recipes import build_recipe

    recipes = [config.recipe] if config.recipe is not None else [p.recipe for p in config.phases]
    for spec in recipes:
        recipe = build_recipe(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
        if recipe.uses_teacher:
            return True
    return False


# -- loading ----------------------------------------------------------------------------------
def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. trainer.epochs=3")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: empty field name in '{key}'")
    value = yaml.safe_load(text)
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: '{'.'.join(parts[:depth + 1])}' is not an "
                                  f"index of a list of {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
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


def parse_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`; raise :class:`ConfigError` listing
    every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        lines = format_validation_error(error, RunConfig)
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(lines)) from None
    problems = check_registered(config)
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems))
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file safely, apply ``--set`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    for assignment in overrides:
        if not isinstance(raw, dict):
            break
        apply_override(raw, assignment)
    return parse_config(raw, str(path))
