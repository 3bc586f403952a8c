"""``hsk``: hidden-state knowledge compression - a transformer student learns only a small
slice of the teacher's hidden states (a few layers, tokens and entries), which a teacher cache
can hold, then its predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator
from torch import nn

from kdistill import losses
from kdistill.losses.slices import Dropped, TokenSlice
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import RecipeParams, Term, register
from kdistill.recipes.layer_stages import (
    LayerStagesParams,
    LayerStagesRecipe,
    prediction_term,
)
from kdistill.schedules import TrainState
from kdistill.taps import Taps, slice_tap

Stage = Literal["hidden", "task", "prediction"]
TokenAttention = Literal["uniform", "mapped"]


class HSKParams(LayerStagesParams):
    stage: Stage = "task"
    layers: int = Field(default=1, ge=1)
    tokens: int | None = Field(default=10, ge=1)
    width: float = Field(default=0.1, gt=0, le=1)
    token_attention: TokenAttention = "uniform"
    sep_token_id: int | None = Field(default=102, ge=0)
    dropped: Dropped = "zero"

    @model_validator(mode="after")
    def _valid(self) -> HSKParams:
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
class HSK(LayerStagesRecipe):
    """Hidden-state knowledge compression: distil a slice of the teacher's hidden states.

    Liu, Meng, Lin, Wang & Zhou (2021), "Marginal Utility Diminishes: Exploring the Minimum
    Knowledge for BERT Knowledge Distillation" (ACL). Student layer m = 0..M (0: the
    embeddings) learns teacher layer g(m) (g(0) = 0; g(1..M) from ``layer_map``: the uniform
    g(m) = m N / M of :func:`~kdistill.recipes.layer_stages.resolve_layer_map`, a list, or
    ``auto`` / ``auto_free``, measured before training). Only a slice of the teacher's hidden
    states is distilled:

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

    intermediate_stage = "hidden"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.projection: nn.Module | None = None

    # -- taps -------------------------------------------------------------------------------
    def kept_layers(self) -> list[tuple[int, int, int]]:
        """(m, g(m), a(m)) of every kept student layer m (0: the embeddings): the teacher's
        hidden state it learns and the self-attention layer (from 0) choosing its tokens."""
        p = self.params
        mapping = (0, *self.mapped())
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

    # -- modules ----------------------------------------------------------------------------
    def build(self, student: Taps, teacher: Taps | None) -> None:
        super().build(student, teacher)
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
