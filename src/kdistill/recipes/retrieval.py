"""Retrieval distillation: a bi-encoder student learns how a frozen bi-encoder teacher scores
queries against passages (task ``retrieval``, batches of :mod:`kdistill.batch`).

A batch holds B queries and the P distinct passages of their rows (each query's positive and
hard negatives, the other queries' passages serving as in-batch negatives); both models encode
all B + P texts, each with its own tokenizer. A query's score of a passage is the dot product
(``similarity: dot``) or the cosine (``cosine``) of their vectors divided by a temperature
``tau``:

    z_bp = sim(q_b, p_p) / tau,    p_p in C_b

``C_b`` is every passage of the batch except those relevant to query b other than its own
positive ``pos_b`` (another copy of a relevant passage is no negative; its score is left out of
every distribution). Only these score distributions are compared, never tokens, so the two
models may tokenise differently (and differ in width and depth).

* ``lead``: LEAD's layer-wise score distillation (:class:`LEAD`);
* ``dcd``: dynamic contrastive distillation on teacher-chosen hard negatives (:class:`DCD`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from kdistill import losses
from kdistill.batch import POSITIVE, RELEVANCE
from kdistill.models.sentence import pool
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.schedules import TrainState
from kdistill.taps import SENTENCE_EMBEDDING, Taps

Similarity = Literal["dot", "cosine"]
LayerPooling = Literal["cls", "mean"]
TOKEN_MASK = "token_mask"


@dataclass(frozen=True)
class RetrievalBatch:
    """What a recipe reads of a retrieval batch: B queries, each query's positive column [B]
    and the relevance [B, P] of the passages."""

    queries: int
    positive: Tensor
    relevance: Tensor

    @classmethod
    def of(cls, batch: Mapping[str, Any], recipe: str) -> RetrievalBatch:
        missing = [k for k in ("index", POSITIVE, RELEVANCE) if k not in batch]
        if missing:
            raise ValueError(f"{recipe}: the batch lacks {missing} (a retrieval batch of queries "
                             f"and passages, see kdistill.batch); keys: {sorted(batch)}")
        positive = batch[POSITIVE].reshape(-1).long()
        return cls(len(positive), positive, batch[RELEVANCE].bool())

    @property
    def left_out(self) -> Tensor:
        """[B, P]: the passages relevant to a query other than its own positive (no part of
        its distributions)."""
        own = F.one_hot(self.positive, self.relevance.shape[1]).bool()
        return self.relevance & ~own

    def scores(self, vectors: Tensor, similarity: Similarity, temperature: float) -> Tensor:
        """``z`` [B, P] (see the module doc) from the vectors [B + P, D] of the batch's texts
        (queries first), ``-inf`` where a passage is left out."""
        if vectors.dim() != 2 or vectors.shape[0] != self.queries + self.relevance.shape[1]:
            raise ValueError(f"expected one vector per text of the batch ({self.queries} "
                             f"queries + {self.relevance.shape[1]} passages), got "
                             f"{tuple(vectors.shape)}")
        vectors = vectors.float()
        if similarity == "cosine":
            vectors = F.normalize(vectors, dim=-1)
        queries, passages = vectors[:self.queries], vectors[self.queries:]
        z = queries @ passages.T / temperature
        return z.masked_fill(self.left_out.to(z.device), float("-inf"))


class RetrievalRecipe(Recipe):
    """What both retrieval recipes share: the task, a pretrained (frozen) teacher, and no
    teacher cache (a batch's texts are its queries and the passages it gathers, not one row
    per sample)."""

    task = "retrieval"
    teacher_model = "pretrained"

    def teacher_signal_varies(self) -> str | None:
        return ("its teacher encodes each batch's queries and the passages the batch gathers, "
                "which are not one row per sample")


class LEADParams(RecipeParams):
    student_layers: int = Field(ge=1)
    teacher_layers: int = Field(ge=1)
    pairs: int = Field(default=3, ge=1)
    resample_every: int = Field(default=100, ge=1)
    seed: int = Field(default=0, ge=0)
    pooling: LayerPooling = "cls"
    similarity: Similarity = "dot"
    temperature: float = Field(default=1.0, gt=0)
    layer_temperature: float = Field(default=10.0, gt=0)
    ce_weight: float = Field(default=1.0, ge=0)
    kd_weight: float = Field(default=1.0, ge=0)
    layer_weight: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _enough_layers(self) -> LEADParams:
        if self.pairs > min(self.student_layers, self.teacher_layers):
            raise ValueError(f"pairs {self.pairs} exceeds the layers to draw from (student "
                             f"{self.student_layers}, teacher {self.teacher_layers})")
        return self


@register
class LEAD(RetrievalRecipe):
    """L = w_ce CE + w_kd KL_out + w_layers sum_k lambda_k KL(l_s,k, l_t,k).

    LEAD of Sun, Liu, Gong, Dong, Zhang, Zhang, Jiao, Duan & Lin (WSDM 2024), "LEAD: Liberal
    Feature-based Distillation for Dense Retrieval". With the scores ``z`` of the module doc:

    * ``ce``: the student's contrastive loss, ``-(1/B) sum_b log softmax(z^s_b)[pos_b]`` on its
      sentence embeddings (the relevance labels, or the teacher's top 10 without labels);
    * ``kd``: ``(1/B) sum_b KL(softmax(z^t_b) || softmax(z^s_b))`` on the two models'
      sentence embeddings;
    * ``layers``: at K = ``pairs`` (student layer, teacher layer) pairs, the same KL between
      the score distributions of the layers' vectors: each text's hidden state at layer l
      (``hidden.l``, l = 1 .. ``student_layers`` / ``teacher_layers``) pooled as ``pooling``
      says (``cls``: the first token, as the paper does; ``mean``: the mean over the model's own
      tokens). The pairs are weighted by
      ``lambda = softmax_k(-CE_t(l_t,k) / layer_temperature)``, ``CE_t(l)`` the teacher's own
      contrastive loss at layer l against the positives (without gradient): the layers where
      the teacher already ranks well count more (``layer_temperature`` 10, the paper's).

    The K student layers and the K teacher layers are drawn at random without replacement,
    each set sorted and paired in order, and drawn anew every ``resample_every`` optimizer
    steps: the draw of steps ``[n r, (n + 1) r)`` is a function of (``seed``, phase, n)
    alone, so a resumed run draws what the uninterrupted one would. The paper's code scales
    the teacher's scores by the temperature only; here both models' are (with its dot
    products and ``temperature`` 1 the two agree). Every term is a mean over the queries
    (unit ``examples``). ``similarity: cosine`` and ``temperature: 0.05`` suit normalised
    sentence encoders.
    """

    name = "lead"
    summary = ("Retrieval: KL of query-passage score distributions at sampled layer pairs, "
               "weighted by the teacher's CE")
    paper = ("Sun, Liu, Gong, Dong, Zhang, Zhang, Jiao, Duan, Lin 2024, LEAD: Liberal "
             "Feature-based Distillation for Dense Retrieval")
    Params = LEADParams
    pools_tokens = True

    def student_taps(self) -> list[str]:
        return [SENTENCE_EMBEDDING, TOKEN_MASK,
                *(f"hidden.{i}" for i in range(1, self.params.student_layers + 1))]

    def teacher_taps(self) -> list[str]:
        return [SENTENCE_EMBEDDING, TOKEN_MASK,
                *(f"hidden.{i}" for i in range(1, self.params.teacher_layers + 1))]

    def layer_pairs(self, state: TrainState) -> list[tuple[int, int]]:
        """The (student layer, teacher layer) pairs of the step ``state`` (see the class doc)."""
        p = self.params
        period = state.step // p.resample_every
        generator = torch.Generator().manual_seed(
            p.seed * 1_000_003 + state.phase * 10_007 + period)
        drawn = [sorted((torch.randperm(count, generator=generator)[:p.pairs] + 1).tolist())
                 for count in (p.student_layers, p.teacher_layers)]
        return list(zip(drawn[0], drawn[1], strict=True))

    def layer_scores(self, taps: Taps, layer: int, batch: RetrievalBatch) -> Tensor:
        """``z`` [B, P] of the pooled hidden states of ``layer``."""
        vectors = pool(taps[f"hidden.{layer}"], taps[TOKEN_MASK], self.params.pooling)
        return batch.scores(vectors, self.params.similarity, self.params.temperature)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None
        p, rb = self.params, RetrievalBatch.of(batch, self.name)
        z_s = rb.scores(student[SENTENCE_EMBEDDING], p.similarity, p.temperature)
        z_t = rb.scores(teacher[SENTENCE_EMBEDDING].detach(), p.similarity, p.temperature)
        positive = rb.positive.to(z_s.device)
        divergences, teacher_ce = [], []
        for layer_s, layer_t in self.layer_pairs(state):
            s = self.layer_scores(student, layer_s, rb)
            with torch.no_grad():
                t = self.layer_scores(teacher, layer_t, rb)
                teacher_ce.append(F.cross_entropy(t, positive))
            divergences.append(losses.per_token_forward_kl(s, t).mean())
        weights = torch.softmax(-torch.stack(teacher_ce) / p.layer_temperature, dim=0)
        return {"ce": Term(F.cross_entropy(z_s, positive), p.ce_weight),
                "kd": Term(losses.per_token_forward_kl(z_s, z_t).mean(), p.kd_weight),
                "layers": Term((weights * torch.stack(divergences)).sum(), p.layer_weight)}


class DCDParams(RecipeParams):
    negatives: int = Field(default=7, ge=1)
    alpha: float = Field(default=0.2, ge=0, le=1)
    similarity: Similarity = "dot"
    temperature: float = Field(default=1.0, gt=0)


@register
class DCD(RetrievalRecipe):
    """L = (1 - alpha) sum_b w_b CE_b + alpha sum_b r_b MSE_b.

    Dynamic contrastive distillation of Rao, Ding, Qi, Fang, Liu, Shen & Tao (2023), "Dynamic
    Contrastive Distillation for Image-Text Retrieval" (IEEE TMM), for bi-encoders:

    * **the teacher chooses the hard negatives**: a query's candidates are the passages of the
      batch in its distribution (its own hard negatives and the other queries' passages, see
      the module doc); the teacher scores them and the ``negatives`` it scores highest (fewer
      when there are fewer) are the query's set ``S_b`` with its positive; the student's loss
      sees only ``S_b``;
    * **per-sample weights that follow difficulty**, from the teacher's distribution
      ``p_b = softmax(z^t_b over S_b)`` and its entropy ``H_b = -sum_j p_bj log p_bj``
      (the harder the sample, the less sure the teacher): ``w_b = H_b / sum_b' H_b'``
      (uniform when every H is 0) weighs the student's own contrastive loss
      ``CE_b = -log softmax(z^s_b over S_b)[pos_b]``, so hard samples are learnt from the
      labels; ``r_b = softmax_b((1 - w_b)^2)`` weighs the distillation
      ``MSE_b = mean_{j in S_b} (sim^s_bj - sim^t_bj)^2`` of the similarities (before the
      temperature), so easy samples are learnt from the teacher;
    * ``alpha`` (0.2) balances the two, as in the paper's code.

    The weights are those of the authors' code (``distillation_loss``): there the MSE is
    reduced to one number before the weights multiply it, which makes ``r`` sum out; here it is
    per sample, as the weights intend. The code's match head takes a binary cross-entropy per
    candidate; a bi-encoder's scores are contrasted by the softmax above. In the paper the
    student encodes only ``S_b``; a bi-encoder encodes each passage of the batch once for every
    query, so here the selection decides what the loss sees. Terms ``contrastive`` (weight
    ``1 - alpha``) and ``kd`` (weight ``alpha``), each a weighted mean over the queries (unit
    ``examples``).
    """

    name = "dcd"
    summary = ("Retrieval: contrastive KD on teacher-chosen hard negatives, entropy-weighted "
               "queries")
    paper = ("Rao, Ding, Qi, Fang, Liu, Shen, Tao 2023, Dynamic Contrastive Distillation for "
             "Image-Text Retrieval")
    Params = DCDParams

    def student_taps(self) -> list[str]:
        return [SENTENCE_EMBEDDING]

    def teacher_taps(self) -> list[str]:
        return [SENTENCE_EMBEDDING]

    def chosen(self, z_t: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        """``S_b`` as columns [B, 1 + k] (the positive first, then the teacher's top-k
        candidates) and which of them exist [B, 1 + k]."""
        candidates = z_t.scatter(1, positive.unsqueeze(1), float("-inf"))
        k = min(self.params.negatives, z_t.shape[1] - 1)
        top = candidates.topk(k, dim=1) if k > 0 else None
        columns = positive.unsqueeze(1) if top is None else \
            torch.cat([positive.unsqueeze(1), top.indices], dim=1)
        exists = torch.ones_like(columns, dtype=torch.bool)
        if top is not None:
            exists[:, 1:] = torch.isfinite(top.values)
        return columns, exists

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None
        p, rb = self.params, RetrievalBatch.of(batch, self.name)
        sim_s = rb.scores(student[SENTENCE_EMBEDDING], p.similarity, 1.0)
        sim_t = rb.scores(teacher[SENTENCE_EMBEDDING].detach(), p.similarity, 1.0)
        positive = rb.positive.to(sim_s.device)
        columns, exists = self.chosen(sim_t, positive)
        # Similarities of S_b; a missing member (fewer candidates than k) becomes 0 here and
        # -inf among the logits, so it carries no value and no gradient.
        s = torch.where(exists, sim_s.gather(1, columns), 0.0)
        t = torch.where(exists, sim_t.gather(1, columns), 0.0)
        z_s = (s / p.temperature).masked_fill(~exists, float("-inf"))
        z_t = (t / p.temperature).masked_fill(~exists, float("-inf"))
        with torch.no_grad():
            log_p = F.log_softmax(z_t, dim=1)
            entropy = -(log_p.exp() * log_p.masked_fill(~exists, 0.0)).sum(dim=1)
            total = entropy.sum()
            w = entropy / total if total > 0 else torch.full_like(entropy, 1 / len(entropy))
            r = torch.softmax((1 - w) ** 2, dim=0)
        ce = F.cross_entropy(z_s, torch.zeros_like(positive), reduction="none")
        mse = ((s - t) ** 2).sum(dim=1) / exists.sum(dim=1)
        return {"contrastive": Term((w * ce).sum(), 1 - p.alpha),
                "kd": Term((r * mse).sum(), p.alpha)}
