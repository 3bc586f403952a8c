"""Sentence-embedding distillation: a student sentence encoder learns a pretrained teacher's
sentence embeddings (task ``embedding``; taps ``sentence_embedding``).

* ``embedding_kd``: the MSE or the cosine distance between the student's embedding and the
  teacher's embedding of the same text;
* ``ckd``: contrastive distillation, InfoNCE of the student's embedding against the teacher's
  embedding of the same text (the positive), the teacher's embeddings of the batch's other
  texts and a FIFO queue of the teacher's embeddings of earlier batches (the negatives).

Both read texts only: labels, when the data has them, are ignored (they serve the linear probe
of the evaluation). When the student's width differs from the teacher's, a linear head (part
of the recipe, trained with the student, not shipped) maps the student's embedding to the
teacher's width; the evaluation and the exported student use the student's own embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdistill import losses
from kdistill.recipes.adapters import make_adapter
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.schedules import TrainState
from kdistill.taps import SENTENCE_EMBEDDING, Taps

HeadKind = Literal["auto", "linear"]
EMPTY = -1  # the sample index of a queue slot that holds no embedding yet


def embedding_head(kind: HeadKind, student: Tensor, teacher: Tensor, recipe: str) -> nn.Module:
    """The map from the student's embeddings [B, d_s] to the teacher's [B, d_t]: a linear
    layer, or with ``auto`` the identity when the widths are equal."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{recipe}: expected sentence embeddings [B, D] from both models, got "
                         f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if kind == "auto" and student.shape[1] == teacher.shape[1]:
        return nn.Identity()
    return make_adapter("linear", student, teacher, f"{recipe}.head")


class EmbeddingKDParams(RecipeParams):
    loss: Literal["mse", "cosine"] = "mse"
    head: HeadKind = "auto"


class EmbeddingRecipe(Recipe):
    """What both embedding recipes share: the taps, the task, the pretrained teacher and the
    head built on the first batch."""

    task = "embedding"
    teacher_model = "pretrained"

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        self.head: nn.Module | None = None

    def student_taps(self) -> list[str]:
        return [SENTENCE_EMBEDDING]

    def teacher_taps(self) -> list[str]:
        return [SENTENCE_EMBEDDING]

    def build(self, student: Taps, teacher: Taps | None) -> None:
        assert teacher is not None
        self.head = embedding_head(self.params.head, student[SENTENCE_EMBEDDING],
                                   teacher[SENTENCE_EMBEDDING], self.name)

    def projected(self, student: Taps) -> Tensor:
        """The student's embeddings through the head, [B, d_t]."""
        assert self.head is not None, "build() runs on the first batch, before terms()"
        return self.head(student[SENTENCE_EMBEDDING])


@register
class EmbeddingKD(EmbeddingRecipe):
    """L = MSE(W e_s, e_t) = (1 / (B d_t)) sum_i |W e_s,i - e_t,i|^2, or with ``loss: cosine``
    L = (1/B) sum_i (1 - cos(W e_s,i, e_t,i)).

    ``e_s``, ``e_t``: the student's and the teacher's sentence embeddings of the same text;
    ``W``: the identity when the widths agree (``head: auto``), else a linear head (``head:
    linear`` always adds one). The MSE is the distillation of Reimers & Gurevych (2020),
    "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation"; the
    cosine distance is scale-free (the cosine embedding loss of DistilBERT, Sanh et al. 2019).
    Term ``embedding``, a mean over the texts (unit ``examples``).
    """

    name = "embedding_kd"
    summary = "Sentence embeddings regressed on the teacher's: MSE or cosine distance"
    paper = ("Reimers, Gurevych 2020, Making Monolingual Sentence Embeddings Multilingual "
             "using Knowledge Distillation")
    Params = EmbeddingKDParams

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None
        e_s, e_t = self.projected(student), teacher[SENTENCE_EMBEDDING]
        loss = losses.hidden_mse if self.params.loss == "mse" else losses.cosine
        return {"embedding": Term(loss(e_s, e_t))}


class CKDParams(RecipeParams):
    queue_size: int = Field(default=4096, ge=0)
    scale: float = Field(default=20.0, gt=0)  # the initial logit scale: temperature 0.05
    scale_max: float = Field(default=100.0, gt=0)
    learn_scale: bool = True
    head: HeadKind = "auto"

    @model_validator(mode="after")
    def _scale_in_range(self) -> CKDParams:
        if self.scale > self.scale_max:
            raise ValueError(f"scale {self.scale} exceeds scale_max {self.scale_max}")
        return self


@register
class ContrastiveKD(EmbeddingRecipe):
    """L = -(1/B) sum_i log( exp(s q_i . t_i) / sum_{k in K_i} exp(s q_i . k) ), with
    ``q_i = W e_s,i / |W e_s,i|`` and every key L2-normalised.

    CKD of Gao, Wu, Wang, Wang, Zang, Wang & Hu (2021), "DistilCSE: Effective Knowledge
    Distillation For Contrastive Sentence Embeddings": ``W`` a linear head to the teacher's
    width when the widths differ (``head: linear`` always adds one, as DistilCSE's code does;
    the default ``auto`` trains an equally wide student's own embedding against the
    teacher's directly); the positive of text i is the frozen
    teacher's embedding ``t_i`` of the same text; the keys ``K_i`` are the teacher's
    embeddings of the batch's texts followed by a FIFO queue of its embeddings of the last
    ``queue_size`` texts of earlier micro-batches (MoCo's memory, He et al. 2020). ``s`` is a
    learnable logit scale (CLIP's, Radford et al. 2021): ``s = min(exp(log_s), scale_max)``,
    ``log_s`` starting at ``log(scale)`` (default 20, temperature 0.05; fixed with
    ``learn_scale: false``). :func:`kdistill.losses.info_nce` computes it.

    The queue holds teacher embeddings only, without gradient, newest first: after each
    micro-batch its teacher embeddings are pushed in front and the oldest fall off the end. A
    queued embedding of a text of the batch (the same sample ``index``, seen in an earlier
    epoch) is left out of that text's keys: it is its positive, not a negative. Empty slots
    count nowhere. The queue is a buffer: checkpointed, restored on resume and put back after
    a skipped step; under data parallelism every process uses the main process's queue (DDP
    broadcasts buffers). Term ``ckd``, a mean over the texts (unit ``examples``).
    """

    name = "ckd"
    summary = ("Contrastive embedding KD: InfoNCE against the teacher's embeddings of the batch "
               "and a queue")
    paper = ("Gao, Wu, Wang, Wang, Zang, Wang, Hu 2021, DistilCSE: Effective Knowledge "
             "Distillation For Contrastive Sentence Embeddings")
    Params = CKDParams

    def __init__(self, params: RecipeParams | None = None, **overrides: Any):
        super().__init__(params, **overrides)
        log_scale = torch.tensor(math.log(self.params.scale))
        if self.params.learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        # Shaped on the first batch (the teacher's width), in build().
        self.register_buffer("queue", None)
        self.register_buffer("queue_index", None)

    def build(self, student: Taps, teacher: Taps | None) -> None:
        super().build(student, teacher)
        assert teacher is not None
        width = teacher[SENTENCE_EMBEDDING].shape[1]
        self.queue = torch.zeros(self.params.queue_size, width)
        self.queue_index = torch.full((self.params.queue_size,), EMPTY, dtype=torch.long)

    def logit_scale(self) -> Tensor:
        """``s = min(exp(log_s), scale_max)``."""
        return self.log_scale.exp().clamp(max=self.params.scale_max)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None and self.queue is not None and self.queue_index is not None
        query = self.projected(student)
        positives = teacher[SENTENCE_EMBEDDING].detach().float()
        if "index" not in batch:
            raise ValueError(f"ckd: the batch has no 'index' (the samples' positions, which the "
                             f"queue keeps); keys: {sorted(batch)}")
        index = batch["index"].reshape(-1).long().to(positives.device)
        keys = torch.cat([positives, self.queue])
        key_index = torch.cat([index, self.queue_index])
        # Keys of the row's own text (but the positive) and empty slots count nowhere.
        exclude = (index.unsqueeze(1) == key_index.unsqueeze(0)) | (key_index == EMPTY)
        loss = losses.info_nce(query, keys, self.logit_scale(), exclude=exclude)
        self.enqueue(positives, index)
        return {"ckd": Term(loss)}

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor, index: Tensor) -> None:
        """Push ``embeddings`` (and their sample ``index``) in front of the queue; the oldest
        entries beyond ``queue_size`` fall off the end."""
        assert self.queue is not None and self.queue_index is not None
        size = self.params.queue_size
        self.queue.copy_(torch.cat([embeddings.detach().to(self.queue.dtype), self.queue])[:size])
        self.queue_index.copy_(torch.cat([index, self.queue_index])[:size])
