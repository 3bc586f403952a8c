"""``hsk``: hidden-state knowledge compression - a transformer student learns only a small
slice of the teacher's hidden states (a few layers, tokens and entries), which a teacher cache
can hold, then its predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from kdistill import losses
from kdistill.errors import KdistillError
from kdistill.losses.slices import Dropped, TokenSlice
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.layer_stages import (
    check_depth,
    prediction_term,
    refuse_task_stage,
    resolve_layer_map,
    split_budget,
)
from kdistill.schedules import TrainState
from kdistill.taps import Taps, slice_tap
from kdistill.teachers import TeacherSource

Stage = Literal["hidden", "task", "prediction"]
TokenAttention = Literal["uniform", "mapped"]


class HSKParams(RecipeParams):
    stage: Stage = "task"
    student_layers: int = Field(default=4, ge=1)
    teacher_layers: int = Field(default=12, ge=1)
    layer_map: list[int] | Literal["auto"] | None = None
    layers: int = Field(default=1, ge=1)
    tokens: int | None = Field(default=10, ge=1)
    width: float = Field(default=0.1, gt=0, le=1)
    token_attention: TokenAttention = "uniform"
    sep_token_id: int | None = Field(default=102, ge=0)
    dropped: Dropped = "zero"
    temperature: float = Field(default=1.0, gt=0)
    intermediate_epochs: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> HSKParams:
        if self.layer_map != "auto":
            resolve_layer_map(self.layer_map, self.student_layers, self.teacher_layers)
        if self.layers > self.student_layers + 1:
            raise ValueError(f"layers ({self.layers}) counts the student's hidden states kept "
                             "from the top, the embeddings included: at most student_layers + "
                             f"1 ({self.student_layers + 1})")
        if (self.tokens is not None and self.token_attention == "uniform"
                and self.teacher_layers % self.student_layers):
            raise ValueError(f"token_attention 'uniform' reads the attention of teacher layer "
                             f"m N / M, which needs teacher_layers ({self.teacher_layers}) to "
                             f"be a multiple of student_layers ({self.student_layers}); use "
                             "token_attention 'mapped'")
        return self


@register
class HSK(Recipe):
    """Hidden-state knowledge compression: distil a slice of the teacher's hidden states.

    Liu, Meng, Lin, Wang & Zhou (2021), "Marginal Utility Diminishes: Exploring the Minimum
    Knowledge for BERT Knowledge Distillation" (ACL). Student layer m = 0..M (0: the
    embeddings) learns teacher layer g(m) (g(0) = 0; g(1..M) from ``layer_map``: the uniform
    g(m) = m N / M of :func:`~kdistill.recipes.tinybert.resolve_layer_map`, a list, or ``auto``,
    measured before training). Only a slice of the teacher's hidden states is distilled:

    * depth: the student's top ``layers`` hidden states, m in D = {M - layers + 1, ..., M};
    * length: per sample, the ``tokens`` valid tokens P_m whose pre-softmax attention score
      from [CLS], averaged over the heads, is largest in teacher self-attention layer a(m)
      ([SEP] tokens, id ``sep_token_id``, never kept; [CLS] can be). ``token_attention``
      ``uniform`` (the code's default, ``att_ttop12``): a(m) = m N / M (layer 1 for the
      embeddings), whatever g is; ``mapped``: a(m) = g(m), the layer whose output is distilled
      (layer 1 for the embeddings). ``tokens: null`` keeps every valid token;
    * width: of those tokens' entries, the fraction ``width`` of largest magnitude, per sample
      (mask M_m: K = max(1, floor(width |P_m| d)) entries).

    With one learnt projection W from the student's width to the teacher's (TinyBERT's
    ``fit_dense``), per sample, summed over the kept layers::

        L_hsk = sum_{m in D} (1 / (|P_m| d)) sum_{p in P_m} sum_c
                    ((H_s^m[p] W)_c - M_m[p, c] H_t^g(m)[p, c])^2

    (``dropped: zero``, as the code: the student is compared on every entry of the kept tokens
    and dropped entries pull it to 0; ``dropped: ignore`` averages over the K kept entries
    only), then the mean over samples (unit: examples; :func:`~kdistill.losses.sliced_mse`).
    The teacher answers the slice as a tap (``slice:...``, :func:`kdistill.taps.slice_tap`), so
    a teacher cache stores only the slice and the student trains without the teacher.

    Stages, as the paper trains: ``hidden`` trains L_hsk (no labels); ``prediction`` trains
    soft cross-entropy at ``temperature`` (no labels either); ``task`` runs ``hidden`` for
    ``intermediate_epochs`` (default: all but the last quarter), then ``prediction``. Defaults:
    the paper's 3-D compression "1l_10t_0.1h" (1 layer, 10 tokens, 10% width) for TinyBERT_4 from
    BERT_BASE (M = 4, N = 12), [SEP] = 102 (BERT's uncased vocabulary), T = 1. Our choices and
    what differs from the code: docs/recipes.md.
    """

    name = "hsk"
    summary = ("hidden-state knowledge compression: MSE on a slice of the teacher's hidden "
               "states (top layers, [CLS]-attended tokens, largest entries), then predictions")
    paper = ("Liu et al. 2021, Marginal Utility Diminishes: Exploring the Minimum Knowledge "
             "for BERT Knowledge Distillation")
    Params = HSKParams
    architecture = "BERT-style transformer encoders (self-attention with query and key layers)"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        p = self.params
        self.layer_map: tuple[int, ...] | None = None if p.layer_map == "auto" else \
            resolve_layer_map(p.layer_map, p.student_layers, p.teacher_layers)
        self.projection: nn.Module | None = None

    @property
    def layer_map_pending(self) -> bool:
        """Whether ``layer_map`` is ``auto`` and not measured yet (see :class:`LayerMapped`)."""
        return self.layer_map is None

    def with_layer_map(self, mapping: Sequence[int]) -> HSK:
        """This recipe with the layer map g(1), ..., g(M) = ``mapping``."""
        return HSK(self.params, layer_map=list(mapping))

    # -- taps -------------------------------------------------------------------------------
    def kept_layers(self) -> list[tuple[int, int, int]]:
        """(m, g(m), a(m)) of every kept student layer m (0: the embeddings): the teacher's
        hidden state it learns and the self-attention layer (from 0) choosing its tokens."""
        if self.layer_map is None:
            raise KdistillError("hsk: layer_map 'auto' is measured on the student and the "
                                "teacher before training (kdistill train and Distiller.fit do "
                                "it); this recipe was asked for its taps before that")
        p = self.params
        mapping = (0, *self.layer_map)
        step = p.teacher_layers // p.student_layers
        kept = []
        for m in range(p.student_layers - p.layers + 1, p.student_layers + 1):
            layer = m * step if p.token_attention == "uniform" else mapping[m]
            kept.append((m, mapping[m], max(layer - 1, 0)))
        return kept

    def _slice_tap(self, teacher_layer: int, attention: int) -> str:
        p = self.params
        chosen = p.tokens is not None
        return slice_tap(f"hidden.{teacher_layer}", attention=attention if chosen else None,
                         tokens=p.tokens, width=p.width, sep=p.sep_token_id if chosen else None)

    def _pairs(self) -> list[tuple[str, str]]:
        """(student hidden-state tap, teacher slice tap) of every kept layer."""
        return [(f"hidden.{m}", self._slice_tap(g, a)) for m, g, a in self.kept_layers()]

    def student_taps(self) -> list[str]:
        if self.params.stage == "prediction":
            return ["logits"]
        return [s for s, _ in self._pairs()]

    def teacher_taps(self) -> list[str]:
        if self.params.stage == "prediction":
            return ["logits"]
        return [t for _, t in self._pairs()]

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
            refuse_task_stage(self.name, "hidden")
        if self.params.stage == "prediction":
            return
        assert teacher is not None
        s, t = self._pairs()[0]
        cut = teacher[t]
        assert isinstance(cut, TokenSlice)
        self.projection = make_adapter("linear", losses.gather_tokens(student[s], cut.positions),
                                       cut.values, where="hsk projection")

    # -- terms ------------------------------------------------------------------------------
    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None
        if self.params.stage == "prediction":
            return prediction_term(student, teacher, batch, self.params.temperature)
        assert self.projection is not None
        total = []
        for s, t in self._pairs():
            cut = teacher[t]
            assert isinstance(cut, TokenSlice)
            projected = self.projection(losses.gather_tokens(student[s], cut.positions))
            total.append(losses.sliced_mse(projected, cut, self.params.dropped))
        return {"hidden": Term(sum(total), 1.0, "examples")}

    def phases(self, epochs: int) -> list[tuple[Recipe, int]]:
        if self.params.stage != "task":
            return [(self, epochs)]
        first, second = split_budget(self.name, epochs, self.params.intermediate_epochs)
        return [(HSK(self.params, stage="hidden"), first),
                (HSK(self.params, stage="prediction"), second)]
