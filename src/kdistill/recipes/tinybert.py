"""``tinybert``: TinyBERT's layer-to-layer distillation of a transformer encoder - embeddings,
hidden states and attention scores through a layer map - then its prediction layer."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor, nn

from kdistill import losses
from kdistill.errors import KdistillError
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import valid_rows
from kdistill.schedules import TrainState
from kdistill.taps import Taps, self_attention_layers
from kdistill.teachers import TeacherSource

Stage = Literal["general", "task", "prediction"]
Projection = Literal["shared", "per_layer"]


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


def attention_scores(query: Tensor, key: Tensor) -> Tensor:
    """Pre-softmax attention scores ``[B, H, L, L]`` from a layer's query and key projections
    ``[B, L, H, d]`` (the ``query.<i>`` / ``key.<i>`` taps): A_h = Q_h K_h^T / sqrt(d), the
    scores BERT's self-attention adds its padding mask to before the softmax."""
    return (query.transpose(1, 2) @ key.permute(0, 2, 3, 1)) / math.sqrt(query.shape[-1])


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


class TinyBERTParams(RecipeParams):
    stage: Stage = "task"
    student_layers: int = Field(default=4, ge=1)
    teacher_layers: int = Field(default=12, ge=1)
    layer_map: list[int] | Literal["auto"] | None = None
    projection: Projection = "shared"
    temperature: float = Field(default=1.0, gt=0)
    intermediate_epochs: int | None = Field(default=None, ge=1)
    embedding_weight: float = Field(default=1.0, ge=0)
    hidden_weight: float = Field(default=1.0, ge=0)
    attention_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _valid_map(self) -> TinyBERTParams:
        if self.layer_map != "auto":
            resolve_layer_map(self.layer_map, self.student_layers, self.teacher_layers)
        return self


@register
class TinyBERT(Recipe):
    """TinyBERT: a transformer student learns the teacher layer by layer, then its predictions.

    Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu (2020), "TinyBERT: Distilling BERT for
    Natural Language Understanding". Student layer m = 1..M learns from teacher layer g(m)
    (:func:`resolve_layer_map`: uniform g(m) = m N / M, or ``layer_map``; ``layer_map: auto``
    is measured on the two models before training, :mod:`kdistill.layermap`); layer 0, the
    embedding output, from the teacher's. With the student's valid tokens (``token_mask``) and
    a learnt projection W from the student's width to the teacher's:

        L_embd = MSE(E_s W_0, E_t)                              (unit: tokens)
        L_hidn = sum_m MSE(H_s^m W_m, H_t^g(m))                 (unit: tokens)
        L_attn = sum_m (1/h) sum_i MSE(A_s,i^m, A_t,i^g(m))     (unit: token pairs)
        L_pred = - sum_c softmax(z_t / T)_c log softmax(z_s / T)_c   (unit: examples)

    MSE is :func:`~kdistill.losses.hidden_mse` (mean over valid tokens x features).
    A_i = Q_i K_i^T / sqrt(d_head) are head i's pre-softmax scores
    (:func:`attention_scores`, from the ``query.<i>`` / ``key.<i>`` taps) and the attention
    MSE (:func:`~kdistill.losses.attention_mse`) runs over the (query, key) pairs of valid
    tokens: a pair with a padding token contributes 0 (TinyBERT's code sets masked scores to
    0). ``projection: shared`` is one W for the embeddings and every hidden layer (W_0 = W_m,
    the official code's ``fit_dense``), ``per_layer`` one W per mapped layer.

    Stages: ``general`` trains w_e L_embd + w_h L_hidn + w_a L_attn (no labels: the paper's
    general distillation, and the first step of its task distillation); ``prediction``
    trains L_pred (no labels either); ``task`` runs ``general`` for ``intermediate_epochs``
    (default: all but the last quarter of the budget), then ``prediction``. Defaults: the
    paper's TinyBERT_4 from BERT_BASE (``student_layers`` 4, ``teacher_layers`` 12), T = 1,
    weights 1. Our choices: docs/recipes.md.
    """

    name = "tinybert"
    summary = ("TinyBERT: embedding, hidden-state and attention-score MSE through a layer map, "
               "then the prediction layer")
    paper = ("Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language "
             "Understanding")
    Params = TinyBERTParams
    architecture = "BERT-style transformer encoders (self-attention with query and key layers)"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        p = self.params
        self.layer_map: tuple[int, ...] | None = None if p.layer_map == "auto" else \
            resolve_layer_map(p.layer_map, p.student_layers, p.teacher_layers)
        self.projections: nn.ModuleList | None = None

    @property
    def layer_map_pending(self) -> bool:
        """Whether ``layer_map`` is ``auto`` and not measured yet (see :class:`LayerMapped`)."""
        return self.layer_map is None

    def with_layer_map(self, mapping: Sequence[int]) -> TinyBERT:
        """This recipe with the layer map g(1), ..., g(M) = ``mapping``."""
        return TinyBERT(self.params, layer_map=list(mapping))

    # -- taps -------------------------------------------------------------------------------
    def _mapped(self) -> tuple[int, ...]:
        if self.layer_map is None:
            raise KdistillError("tinybert: layer_map 'auto' is measured on the student and the "
                                "teacher before training (kdistill train and Distiller.fit do "
                                "it); this recipe was asked for its taps before that")
        return self.layer_map

    def _pairs(self) -> list[tuple[str, str]]:
        """(student, teacher) feature taps: the embeddings, then each mapped hidden state."""
        return [("embeddings", "embeddings"),
                *((f"hidden.{m}", f"hidden.{g}") for m, g in enumerate(self._mapped(), 1))]

    def _attention_layers(self) -> list[tuple[int, int]]:
        """(student, teacher) self-attention layer indices from 0, as the taps count them."""
        return [(m - 1, g - 1) for m, g in enumerate(self._mapped(), 1)]

    def student_taps(self) -> list[str]:
        if self.params.stage == "prediction":
            return ["logits"]
        taps = ["token_mask", *(s for s, _ in self._pairs())]
        taps += [f"{kind}.{s}" for s, _ in self._attention_layers() for kind in ("query", "key")]
        return taps + (["logits"] if self.params.stage == "task" else [])

    def teacher_taps(self) -> list[str]:
        if self.params.stage == "prediction":
            return ["logits"]
        taps = [t for _, t in self._pairs()]
        taps += [f"{kind}.{t}" for _, t in self._attention_layers() for kind in ("query", "key")]
        return taps + (["logits"] if self.params.stage == "task" else [])

    # -- models -----------------------------------------------------------------------------
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
        if self.params.stage == "task":
            refuse_task_stage(self.name, "general")
        if self.params.stage == "prediction":
            return
        assert teacher is not None
        pairs = self._pairs()[:1] if self.params.projection == "shared" else self._pairs()
        self.projections = nn.ModuleList(
            make_adapter("linear", student[s], teacher[t], where="tinybert projection")
            for s, t in pairs)

    def _project(self, index: int, features: Tensor) -> Tensor:
        assert self.projections is not None
        return self.projections[0 if self.params.projection == "shared" else index](features)

    # -- terms ------------------------------------------------------------------------------
    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None
        if self.params.stage == "prediction":
            return prediction_term(student, teacher, batch, self.params.temperature)
        return self._intermediate(student, teacher)

    def _intermediate(self, student: Taps, teacher: Taps) -> dict[str, Term]:
        p, mask = self.params, student["token_mask"]
        features = [losses.hidden_mse(self._project(i, student[s]), teacher[t], mask)
                    for i, (s, t) in enumerate(self._pairs())]
        attention = [
            losses.attention_mse(attention_scores(student[f"query.{s}"], student[f"key.{s}"]),
                                 attention_scores(teacher[f"query.{t}"], teacher[f"key.{t}"]),
                                 mask)
            for s, t in self._attention_layers()]
        return {"embeddings": Term(features[0], p.embedding_weight, "tokens"),
                "hidden": Term(sum(features[1:]), p.hidden_weight, "tokens"),
                "attention": Term(sum(attention), p.attention_weight, "token_pairs")}

    def phases(self, epochs: int) -> list[tuple[Recipe, int]]:
        if self.params.stage != "task":
            return [(self, epochs)]
        first, second = split_budget(self.name, epochs, self.params.intermediate_epochs)
        return [(TinyBERT(self.params, stage="general"), first),
                (TinyBERT(self.params, stage="prediction"), second)]
