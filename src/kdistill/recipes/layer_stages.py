"""What the layer-to-layer recipes of transformer encoders (``tinybert``, ``hsk``) share:
the layer map (:class:`LayerStagesParams`), the depth check of a model, the prediction-layer
term and the stages, stage ``task`` split into an intermediate phase and a prediction phase
(:class:`LayerStagesRecipe`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator
from torch import nn

from kdistill import losses
from kdistill.errors import KdistillError
from kdistill.recipes.base import Recipe, RecipeParams, Term
from kdistill.recipes.shared import valid_rows
from kdistill.taps import Taps, self_attention_layers
from kdistill.teachers import TeacherSource

MEASURED_MAPS = ("auto", "auto_free")  # layer_map values measured before training


def resolve_layer_map(layer_map: Sequence[int] | None, student_layers: int,
                      teacher_layers: int) -> tuple[int, ...]:
    """g(1), ..., g(M): the teacher layer (1..N) each student layer m = 1..M learns from (the
    embeddings, layer 0, always learn from the teacher's embeddings).

    ``None`` gives the paper's uniform map g(m) = m N / M, which needs N to be a multiple of M
    (the official code asserts it); a list is taken as it is, one teacher layer per student
    layer. ``ValueError`` names the field at fault.
    """
    if layer_map is None:
        if teacher_layers % student_layers:
            raise ValueError(f"the uniform layer map g(m) = m N / M needs teacher_layers "
                             f"({teacher_layers}) to be a multiple of student_layers "
                             f"({student_layers}); give layer_map, one teacher layer per "
                             "student layer")
        step = teacher_layers // student_layers
        return tuple(m * step for m in range(1, student_layers + 1))
    if len(layer_map) != student_layers:
        raise ValueError(f"layer_map {list(layer_map)} has {len(layer_map)} entries for "
                         f"{student_layers} student layers (student_layers): give one teacher "
                         f"layer (1-{teacher_layers}) per student layer")
    outside = [g for g in layer_map if not 1 <= g <= teacher_layers]
    if outside:
        raise ValueError(f"layer_map {list(layer_map)}: teacher layer(s) {outside} outside "
                         f"1-{teacher_layers} (teacher_layers: {teacher_layers}); the "
                         "embeddings (layer 0) are always mapped to the student's embeddings")
    return tuple(layer_map)


def check_depth(recipe: str, model: nn.Module, role: str, field: str, expected: int) -> None:
    """Refuse (``ValueError``) a ``model`` without BERT-style self-attention layers, or with
    another number of them than ``expected`` (the recipe's ``field``)."""
    found = len(self_attention_layers(model))
    if not found:
        raise ValueError(f"{recipe}: the {role} ({type(model).__name__}) has no BERT-style "
                         "self-attention layers (modules with 'query' and 'key' linear "
                         f"layers); {recipe} distils transformer encoders")
    if found != expected:
        raise ValueError(f"{recipe}: {field} is {expected} but the {role} has {found} "
                         f"transformer layers; set {field}: {found}")


def prediction_term(student: Taps, teacher: Taps, batch: Mapping[str, Any],
                    temperature: float) -> dict[str, Term]:
    """The prediction layer's term, soft cross-entropy at ``temperature`` T:
    - sum_c softmax(z_t / T)_c log softmax(z_s / T)_c (unit: examples)."""
    z_s, z_t = student["logits"], teacher["logits"]
    rows, unit = valid_rows(z_s, batch)
    return {"prediction": Term(losses.soft_ce(z_s[rows], z_t[rows], temperature=temperature),
                               1.0, unit)}


def split_budget(recipe: str, epochs: int, intermediate_epochs: int | None) -> tuple[int, int]:
    """Stage ``task``'s epochs for the intermediate phase and for the prediction phase:
    ``intermediate_epochs``, by default all but the last quarter of ``epochs``."""
    if epochs < 2:
        raise ValueError(f"{recipe}: stage 'task' needs at least 2 epochs: one for the "
                         "intermediate layers and one for the prediction layer")
    first = intermediate_epochs or epochs - max(1, epochs // 4)
    if first >= epochs:
        raise ValueError(f"{recipe}: intermediate_epochs ({first}) must be smaller than "
                         f"epochs ({epochs})")
    return first, epochs - first


def refuse_task_stage(recipe: str, intermediate: str) -> None:
    """Stage ``task`` reached :meth:`Recipe.build` as one phase: say how to split it."""
    raise ValueError(f"{recipe}: stage 'task' runs as two phases (the intermediate layers, then "
                     f"the prediction layer); in a 'phases' list give a phase with stage "
                     f"'{intermediate}' and then one with stage 'prediction'")


class LayerStagesParams(RecipeParams):
    """What every layer-to-layer recipe takes (its ``stage`` is its own): the depths M and N,
    the layer map (``None``: uniform; a list; ``auto``: measured before training, the last
    student layer on the teacher's last; ``auto_free``: measured without that pin), the
    prediction layer's temperature and stage ``task``'s intermediate epochs."""

    student_layers: int = Field(default=4, ge=1)
    teacher_layers: int = Field(default=12, ge=1)
    layer_map: list[int] | Literal["auto", "auto_free"] | None = None
    temperature: float = Field(default=1.0, gt=0)
    intermediate_epochs: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _valid_map(self) -> Self:
        if self.layer_map not in MEASURED_MAPS:
            resolve_layer_map(self.layer_map, self.student_layers, self.teacher_layers)
        return self


class LayerStagesRecipe(Recipe):
    """A layer-to-layer recipe of transformer encoders with stages: ``intermediate_stage``
    (the layers through the layer map), ``prediction`` (:func:`prediction_term`) and ``task``
    (both, as two phases, :func:`split_budget`). Its models' depths are checked against the
    declared ones; ``layer_map: auto`` waits for its measurement (a
    :class:`~kdistill.recipes.base.LayerMapped` recipe)."""

    intermediate_stage: ClassVar[str]

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        p = self.params
        self.layer_map: tuple[int, ...] | None = None if p.layer_map in MEASURED_MAPS else \
            resolve_layer_map(p.layer_map, p.student_layers, p.teacher_layers)

    @property
    def layer_map_pending(self) -> bool:
        """Whether ``layer_map`` is ``auto`` or ``auto_free`` and not measured yet."""
        return self.layer_map is None

    @property
    def pins_last_layer(self) -> bool:
        """Whether the measured map sends the last student layer to the teacher's last
        (``auto``; not ``auto_free``)."""
        return self.params.layer_map != "auto_free"

    def with_layer_map(self, mapping: Sequence[int]) -> Self:
        """This recipe with the layer map g(1), ..., g(M) = ``mapping``."""
        return type(self)(self.params, layer_map=list(mapping))

    def mapped(self) -> tuple[int, ...]:
        """g(1), ..., g(M); an error while a measured ``layer_map`` is not measured yet."""
        if self.layer_map is None:
            raise KdistillError(f"{self.name}: layer_map '{self.params.layer_map}' is measured on "
                                "the student and the teacher before training (kdistill train "
                                "and Distiller.fit do it); this recipe was asked for its taps "
                                "before that")
        return self.layer_map

    def wrap_student(self, student: nn.Module) -> nn.Module:
        """The student unchanged, once its depth is checked against ``student_layers``."""
        if self.params.stage != "prediction":
            check_depth(self.name, student, "student", "student_layers",
                        self.params.student_layers)
        return student

    def teacher_source(self, student: nn.Module,
                       teacher: nn.Module | None) -> TeacherSource | None:
        """The frozen teacher, once its depth is checked against ``teacher_layers``."""
        if teacher is not None and self.params.stage != "prediction":
            check_depth(self.name, teacher, "teacher", "teacher_layers",
                        self.params.teacher_layers)
        return super().teacher_source(student, teacher)

    def build(self, student: Taps, teacher: Taps | None) -> None:
        """Refuse stage ``task`` run as one phase (:meth:`phases` splits it)."""
        if self.params.stage == "task":
            refuse_task_stage(self.name, self.intermediate_stage)

    def phases(self, epochs: int) -> list[tuple[Recipe, int]]:
        if self.params.stage != "task":
            return [(self, epochs)]
        first, second = split_budget(self.name, epochs, self.params.intermediate_epochs)
        return [(type(self)(self.params, stage=self.intermediate_stage), first),
                (type(self)(self.params, stage="prediction"), second)]
