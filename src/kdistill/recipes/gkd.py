"""``gkd``: on-policy distillation of a language model (generalised knowledge distillation)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field

from kdistill import losses
from kdistill.batch import TOKEN_MASK
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.completions import (
    Decoding,
    batch_prompts,
    check_decoder_only,
    complete,
    completion_rows,
    special_ids,
)
from kdistill.recipes.shared import Weight, check_token_logits
from kdistill.schedules import TrainState
from kdistill.settings import Seed
from kdistill.taps import Taps


class GKDParams(RecipeParams):
    lmbda: float = Field(default=0.5, ge=0.0, le=1.0,
                         description="student data fraction: probability of sampled completions")
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    temperature: float = Field(default=0.9, gt=0, description="of the student's sampling")
    max_new_tokens: int = Field(default=128, ge=1)
    kd_weight: Weight = 1.0
    seed: Seed = 0


def draw_seed(*parts: object) -> int:
    """A seed in [0, 2^63) made from ``parts`` (stable across processes and Python runs)."""
    text = "/".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


@register
class GKD(Recipe):
    """Generalised knowledge distillation (GKD), on-policy: Agarwal, Vieillard, Zhou,
    Stanczyk, Ramos, Geist & Bachem (ICLR 2024), "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes".

    For prompt/completion data (x, y). Each optimizer step, with probability ``lmbda`` (the
    paper's student data fraction lambda), the completions of the step's batch are replaced by
    completions the student samples itself, ``y ~ p_s(. | x)`` at temperature ``temperature``
    (at most ``max_new_tokens`` tokens, up to its end-of-sequence token; no gradient flows
    through the sampling); otherwise the data's completions are kept (supervised KD). Both
    models then score the sequence and the student learns, at every completion token::

        L = kd_weight * (1 / N) sum_{(b, t) in completions} JSD_beta(p_t(. | x, y_<t) ||
                                                                      p_s(. | x, y_<t))
        JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q

    P the teacher's next-token distribution, Q the student's, both at temperature 1 (the
    temperature shapes the sampling only, as in the paper and TRL's ``GKDTrainer``); beta -> 0
    gives the forward KL, beta = 1 the reverse KL (:func:`kdistill.losses.generalized_jsd`). N
    is the number of completion tokens of the global batch as the models read it (the engine
    counts the units on the prepared batches), so sampled completions of any length are
    weighted token by token.

    Draws: whether step ``n`` of phase ``k`` samples is decided by a generator seeded from
    (``seed``, k, n) alone, and a micro-batch's sampling by one seeded from (``seed``, k, n,
    its sample indices), leaving the global random state alone: a resumed run draws what the
    uninterrupted one would, and every process of a step takes the same branch. Defaults (the
    paper's and TRL's): lambda 0.5, beta 0.5, temperature 0.9; ``max_new_tokens`` 128.

    The teacher reads the student's samples, so a teacher cache cannot stand in for it. The
    student must share the teacher's vocabulary; rows are decoder-only prompt/completion pairs
    (a row's prompt is its tokens before the first labelled one). More: docs/lm.md.
    """

    name = "gkd"
    summary = "On-policy LM distillation: student-sampled completions (prob. lambda), JSD(beta)"
    paper = ("Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from "
             "Self-Generated Mistakes")
    Params = GKDParams
    teacher_model = "pretrained"
    task = "lm"
    teacher_input_change = "completions the student samples during training"

    def on_policy(self, state: TrainState) -> bool:
        """Whether the step ``state`` trains on the student's own samples (probability
        ``lmbda``, drawn from (``seed``, phase, step) alone)."""
        p = self.params
        generator = torch.Generator().manual_seed(draw_seed("gkd", p.seed, state.phase,
                                                            state.step))
        return bool(torch.rand((), generator=generator) < p.lmbda)

    def sample(self, model: torch.nn.Module, batch: Mapping[str, Any],
               state: TrainState) -> dict[str, Any]:
        """``batch`` with its completions sampled from ``model`` (seeded, see the class doc)."""
        p = self.params
        prompts = batch_prompts(batch)
        indices = batch["index"].tolist() if "index" in batch else []
        device = next(model.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(draw_seed("gkd-sample", p.seed, state.phase, state.step, indices))
            completions = complete(model, prompts, Decoding(p.max_new_tokens, sample=True,
                                                            temperature=p.temperature))
        return completion_rows(batch, prompts, completions, special_ids(model)[1])

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        """The batch with the student's sampled completions in the steps drawn on-policy, as
        it is in the others."""
        check_decoder_only(batch, self.name)
        if not self.on_policy(state):
            return batch
        model = getattr(student, "model", None)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
            raise TypeError("gkd: prepare() needs the student's tap reader over a transformers "
                            f"language model (with generate), got {type(model).__name__}")
        return self.sample(model, batch, state)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        assert teacher is not None
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        check_token_logits(self.name, z_s, z_t, batch)
        jsd = losses.generalized_jsd(z_s, z_t, mask=batch[TOKEN_MASK], beta=p.beta)
        return {"kd": Term(jsd, weight=p.kd_weight, unit="tokens")}
