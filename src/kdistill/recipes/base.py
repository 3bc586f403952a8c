"""The recipe interface and the recipe registry.

A recipe is one distillation method. It names the taps it reads from the student and the
teacher, owns whatever trainable state the method adds (adapters, extra heads) as ``nn.Module``
parameters - optimised and checkpointed with the student - and turns taps into named, weighted
loss terms. The engine sums ``weight * value`` over terms, normalising each over the global batch
by its ``unit``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict
from torch import nn

from kdistill.losses.registry import Unit
from kdistill.names import unknown_name
from kdistill.schedules import TrainState
from kdistill.taps import Taps, parse_tap
from kdistill.teachers import FrozenTeacher, TeacherSource

TeacherModel = Literal["trained", "pretrained", "fresh", "none"]


@dataclass
class Term:
    """One loss term of a micro-batch.

    ``value`` is the mean over the term's units in this micro-batch: ``examples`` (every
    sample), ``labeled`` (samples with a known label), ``tokens`` (valid tokens) or
    ``token_pairs`` (valid (query, key) pairs of attention maps: the sum over samples of
    n_valid^2). The engine rescales it by local count / global count so that gradient
    accumulation and several processes give the gradient of the mean over the whole global
    batch.
    """

    value: torch.Tensor
    weight: float = 1.0
    unit: Unit = "examples"


def _checked_tap(name: str) -> str:
    parse_tap(name)
    return name


TapName = Annotated[str, AfterValidator(_checked_tap)]
"""A tap name in recipe parameters, checked for form when the parameters are validated."""


def _ordered_range(value: tuple[float, float]) -> tuple[float, float]:
    if not value[0] < value[1]:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value}")
    return value


ValueRange = Annotated[tuple[float, float], AfterValidator(_ordered_range)]
"""The valid range (low, high) of float inputs, e.g. (0, 1) for images."""


class RecipeParams(BaseModel):
    """Hyper-parameters of a recipe; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Recipe(nn.Module):
    """Base class of every method. Subclasses set the class attributes and :meth:`terms`.

    Class attributes besides the names:

    * ``uses_teacher`` / ``uses_unlabeled``: whether the method reads teacher taps, and whether
      it trains on samples without a label;
    * ``teacher_model``: what a config run hands to :meth:`teacher_source` - a ``trained``
      (frozen) teacher, a ``pretrained`` one (frozen, used as built from ``teacher.model``,
      e.g. a sentence encoder from its folder, or loaded from ``teacher.checkpoint``; never
      trained by the run), a ``fresh`` untrained model built from ``teacher.model`` (peers
      that train online) or ``none`` (the teacher is made from the student, e.g. its EMA);
    * ``keep_best``: an evaluation metric (``accuracy``, ``ece``...); when set, the phase ends
      with the student weights of its best end-of-epoch evaluation (``cer``, ``ece``,
      ``loss`` and ``mse`` are minimised, other metrics maximised);
    * ``teacher_recipe``: ``(recipe name, parameters)`` with which a config run trains the
      teacher when the config asks it to train one (default plain cross-entropy);
    * ``teacher_finetune``: whether a config run that trains the teacher then fine-tunes it
      adversarially (``teacher.finetune`` with its defaults; ``daft``) unless the teacher
      section says how to train it (``teacher.recipe`` or ``teacher.finetune``);
    * ``task``: ``classification`` (also per token), ``regression``, ``embedding`` (sentence
      encoders; it also trains on texts with class labels, which it ignores), ``retrieval``
      (bi-encoders on queries and passages) or ``lm`` (language models alone, data of task
      ``lm``, see :mod:`kdistill.batch`);
    * ``ctc``: whether the method also trains CTC recognisers (data of task ``ctc``: per-frame
      logits against target sequences, see :mod:`kdistill.batch`);
    * ``lm``: whether a classification method also trains language models (data of task
      ``lm``: next-token labels per position);
    * ``architecture``: the kind of model the method is made for, ``None`` when any model
      that gives the taps it reads will do (``tinybert`` needs BERT-style transformer
      encoders); the leaderboard, whose protocol distils a CNN into an MLP, leaves such
      recipes out;
    * ``teacher_input_change``: how :meth:`prepare` changes what the teacher reads (augmented or
      noisy copies), ``None`` when the teacher reads every sample as stored. With a frozen
      (``trained``) teacher that reads the samples as stored, the teacher's taps of a sample
      never change, so a teacher cache can answer them (:meth:`teacher_signal_varies`);
    * ``pools_tokens``: whether the token-level taps the method reads (``hidden.<i>``) are
      reduced to one vector per text over each model's own tokens (``token_mask``) before the
      models are compared, so that a student may tokenise differently from its teacher.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type[RecipeParams]] = RecipeParams
    uses_teacher: ClassVar[bool] = True
    uses_unlabeled: ClassVar[bool] = True
    teacher_model: ClassVar[TeacherModel] = "trained"
    keep_best: ClassVar[str | None] = None
    teacher_recipe: ClassVar[tuple[str, dict[str, Any]]] = ("ce", {})
    teacher_finetune: ClassVar[bool] = False
    task: ClassVar[Literal["classification", "regression", "embedding", "retrieval", "lm"]] = \
        "classification"
    ctc: ClassVar[bool] = False
    lm: ClassVar[bool] = False
    architecture: ClassVar[str | None] = None
    teacher_input_change: ClassVar[str | None] = None
    pools_tokens: ClassVar[bool] = False
    builds_teacher_source: ClassVar[bool] = False
    several_teachers: ClassVar[bool] = False
    own_teacher_tokens: ClassVar[bool] = False

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__()
        base = params.model_dump() if params is not None else {}
        self.params = self.Params(**{**base, **overrides})

    def student_taps(self) -> list[str]:
        """Taps read from the student's forward."""
        return ["logits"]

    def teacher_taps(self) -> list[str]:
        """Taps read from the teacher source."""
        return ["logits"] if self.uses_teacher else []

    def teacher_signal_varies(self) -> str | None:
        """Why the teacher taps this recipe reads for a sample can change during a run, or
        ``None`` when they cannot: its teacher is frozen and reads the sample as stored. Only
        then can a teacher cache (:mod:`kdistill.cache`) stand in for the teacher."""
        if not self.uses_teacher:
            return None
        if self.teacher_model == "fresh":
            return "its teachers are peers that train with the student"
        if self.teacher_model == "none":
            return "its teacher is made from the student and changes with every step"
        if self.teacher_input_change is not None:
            return f"its teacher reads {self.teacher_input_change}"
        return None

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """The model to train in place of ``student`` (e.g. with extra heads); called once
        before training. Must return an already wrapped student unchanged."""
        return student

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        """The teacher source built from a plain ``teacher`` model (see ``teacher_model``);
        by default a :class:`~kdistill.teachers.FrozenTeacher`."""
        return FrozenTeacher(teacher) if teacher is not None else None

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        """The training micro-batch as both models should see it (augmented copies,
        adversarial inputs...); ``student(batch)`` runs the unwrapped student, which is
        ``student.model`` (a :class:`kdistill.taps.TapReader`). The engine prepares every
        micro-batch of an optimizer step before it counts the loss units, so terms are
        normalised by the counts of the prepared batches (a batch may change its tokens: ``gkd``
        samples completions). A batch that grows must grow every sample by the same factor:
        stack the versions of the batch with :func:`kdistill.recipes.shared.stack_views`, which
        marks each row's view in ``batch["view"]``."""
        return batch

    def attach_teacher(self, teacher: TeacherSource | None) -> None:
        """Called with the run's teacher source before a phase of this recipe trains (after
        the source is bound): a recipe that uses the teacher beyond its taps (``seqkd``
        generates with the teacher's model in :meth:`prepare`) keeps it. Default: nothing."""

    def build(self, student: Taps, teacher: Taps | None) -> None:
        """Create trainable state whose shapes depend on the taps (called on the first batch)."""

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        raise NotImplementedError

    def phases(self, epochs: int) -> list[tuple[Recipe, int]]:
        """How this method splits a budget of ``epochs`` into (recipe, epochs) phases."""
        return [(self, epochs)]


@runtime_checkable
class LayerMapped(Protocol):
    """A recipe distilling student layers from teacher layers through a map that can be
    measured on the two models (``layer_map: auto`` or ``auto_free``): ``layer_map_pending``
    until then, ``pins_last_layer`` whether the measured map must send the student's last
    layer to the teacher's last, and ``with_layer_map(g)`` the recipe with student layer
    m = 1..M learning from teacher layer g[m - 1]
    (:func:`kdistill.engine.phases.resolve_layer_maps` measures and sets it)."""

    @property
    def layer_map_pending(self) -> bool: ...

    @property
    def pins_last_layer(self) -> bool: ...

    def with_layer_map(self, mapping: Sequence[int]) -> Recipe: ...


def layer_map_pending(recipe: Recipe) -> bool:
    """Whether ``recipe`` waits for a layer map measured on the models (:class:`LayerMapped`)."""
    return isinstance(recipe, LayerMapped) and recipe.layer_map_pending


def cache_refusal(recipes: Iterable[Recipe]) -> str | None:
    """Why a teacher cache cannot serve one of ``recipes`` (the first reason found, naming the
    recipe), or ``None`` when it can serve them all (see :meth:`Recipe.teacher_signal_varies`)."""
    for recipe in recipes:
        reason = recipe.teacher_signal_varies()
        if reason is not None:
            return (f"recipe '{recipe.name}' cannot read a teacher cache: {reason}, so the "
                    "teacher must run live")
    return None


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    cls: type[Recipe]

    @property
    def summary(self) -> str:
        return self.cls.summary

    @property
    def paper(self) -> str:
        return self.cls.paper


RECIPES: dict[str, RecipeEntry] = {}


def register(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator adding a recipe to :data:`RECIPES` under ``cls.name``."""
    if cls.name in RECIPES:
        raise ValueError(f"recipe '{cls.name}' is registered twice")
    RECIPES[cls.name] = RecipeEntry(cls.name, cls)
    return cls


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``."""
    if name not in RECIPES:
        raise ValueError(unknown_name("recipe", name, RECIPES))
    return RECIPES[name].cls


def build_recipe(name: str, **params: Any) -> Recipe:
    """Instantiate a registered recipe with keyword hyper-parameters."""
    return get_recipe(name)(**params)
