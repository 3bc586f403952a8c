"""``tinybert``: TinyBERT's layer-to-layer distillation of a transformer encoder - embeddings,
hidden states and attention scores through a layer map - then its prediction layer."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from kdistill import losses
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import RecipeParams, Term, register
from kdistill.recipes.layer_stages import (
    LayerStagesParams,
    LayerStagesRecipe,
    prediction_term,
)
from kdistill.schedules import TrainState
from kdistill.taps import Taps

Stage = Literal["general", "task", "prediction"]
Projection = Literal["shared", "per_layer"]


def attention_scores(query: Tensor, key: Tensor) -> Tensor:
    """Pre-softmax attention scores ``[B, H, L, L]`` from a layer's query and key projections
    ``[B, L, H, d]`` (the ``query.<i>`` / ``key.<i>`` taps): A_h = Q_h K_h^T / sqrt(d), the
    scores BERT's self-attention adds its padding mask to before the softmax."""
    return (query.transpose(1, 2) @ key.permute(0, 2, 3, 1)) / math.sqrt(query.shape[-1])


class TinyBERTParams(LayerStagesParams):
    stage: Stage = "task"
    projection: Projection = "shared"
    embedding_weight: float = Field(default=1.0, ge=0)
    hidden_weight: float = Field(default=1.0, ge=0)
    attention_weight: float = Field(default=1.0, ge=0)


@register
class TinyBERT(LayerStagesRecipe):
    """TinyBERT: a transformer student learns the teacher layer by layer, then its predictions.

    Jiao, Yin, Shang, Jiang, Chen, Li, Wang & Liu (2020), "TinyBERT: Distilling BERT for
    Natural Language Understanding". Student layer m = 1..M learns from teacher layer g(m)
    (:func:`resolve_layer_map`: uniform g(m) = m N / M, or ``layer_map``; ``layer_map: auto``
    and ``auto_free`` are measured on the two models before training,
    :mod:`kdistill.layermap`); layer 0, the embedding output, from the teacher's. With the
    student's valid tokens (``token_mask``) and a learnt projection W from the student's width
    to the teacher's:

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

    intermediate_stage = "general"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.projections: nn.ModuleList | None = None

    # -- taps -------------------------------------------------------------------------------
    def _pairs(self) -> list[tuple[str, str]]:
        """(student, teacher) feature taps: the embeddings, then each mapped hidden state."""
        return [("embeddings", "embeddings"),
                *((f"hidden.{m}", f"hidden.{g}") for m, g in enumerate(self.mapped(), 1))]

    def _attention_layers(self) -> list[tuple[int, int]]:
        """(student, teacher) self-attention layer indices from 0, as the taps count them."""
        return [(m - 1, g - 1) for m, g in enumerate(self.mapped(), 1)]

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

    # -- modules ----------------------------------------------------------------------------
    def build(self, student: Taps, teacher: Taps | None) -> None:
        super().build(student, teacher)
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
