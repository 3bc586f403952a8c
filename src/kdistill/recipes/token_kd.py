"""``token_kd``: token-level distillation of a language model, the divergence chosen."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from kdistill import losses
from kdistill.batch import TOKEN_MASK
from kdistill.losses.topk import TopKLogits
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import Weight, label_term
from kdistill.schedules import TrainState
from kdistill.taps import Taps

Divergence = Literal["forward_kl", "reverse_kl", "generalized_jsd", "tvd"]


class TokenKDParams(RecipeParams):
    divergence: Divergence = "forward_kl"
    beta: float = Field(default=0.5, ge=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0)
    kd_weight: Weight = 1.0
    ce_weight: Weight = 0.0

    @model_validator(mode="after")
    def _beta_for_jsd(self) -> TokenKDParams:
        if "beta" in self.model_fields_set and self.divergence != "generalized_jsd":
            raise ValueError(f"beta mixes the two distributions of generalized_jsd; divergence "
                             f"'{self.divergence}' has none, remove beta")
        return self


@register
class TokenKD(Recipe):
    """Token-level KD of a language model: at every labelled position the student's
    next-token distribution learns the teacher's, with the divergence chosen::

        L = kd_weight * (1 / N) sum_{(b, t) labelled} D(p_t(. | x_<t), p_s(. | x_<t))
          + ce_weight * (1 / N) sum_{(b, t) labelled} -log p_s(y_t | x_<t),
        p = softmax(z / T)   (T = temperature, for both models; the CE reads z_s itself)

    where N is the number of labelled positions (``token_mask``: padding, prompts and the
    last token of a text are left out) of the whole global batch: the engine's ``tokens``
    unit, so the gradient with accumulation or several processes is that of one big batch.
    No T^2 factor is applied (as in TRL's GKD trainer and :mod:`kdistill.losses.sequence`).

    ``divergence`` D, per position:

    * ``forward_kl``: KL(p_t || p_s), mean-seeking; word-level KD of Kim & Rush (2016),
      "Sequence-Level Knowledge Distillation" (after Hinton, Vinyals & Dean 2015);
    * ``reverse_kl``: KL(p_s || p_t), mode-seeking; Gu, Dong, Wei & Huang (2024), "MiniLLM:
      Knowledge Distillation of Large Language Models";
    * ``generalized_jsd``: beta KL(p_t || M) + (1 - beta) KL(p_s || M) with
      M = beta p_t + (1 - beta) p_s (forward KL at beta = 0, reverse KL at beta = 1); Agarwal
      et al. (2024), "On-Policy Distillation of Language Models: Learning from Self-Generated
      Mistakes" (GKD);
    * ``tvd``: 0.5 sum_v |p_t(v) - p_s(v)|; Wen, Li, Du & Mou (2023), "f-Divergence
      Minimization for Sequence-Level Knowledge Distillation".

    Teacher and student must predict over one vocabulary (the student shares the teacher's
    tokenizer: ``lm_student``). A teacher cache with ``top_k`` serves ``forward_kl`` alone
    (the KL over the kept tokens plus the tail bucket, :func:`~kdistill.losses.topk_kl`).
    Defaults: forward KL at T = 1, no CE. More: docs/lm.md.
    """

    name = "token_kd"
    summary = "Token-level LM KD: forward/reverse KL, JSD(beta) or TVD per next token"
    paper = ("Kim & Rush 2016, Sequence-Level Knowledge Distillation; Gu et al. 2024, MiniLLM; "
             "Agarwal et al. 2024, GKD; Wen et al. 2023, f-divergence KD")
    Params = TokenKDParams
    teacher_model = "pretrained"
    task = "lm"

    def divergence(self) -> Any:
        """The token-level loss of ``divergence`` with this recipe's parameters, called as
        ``loss(student_logits, teacher_logits, mask=...)``."""
        p = self.params
        if p.divergence == "generalized_jsd":
            return partial(losses.generalized_jsd, beta=p.beta, temperature=p.temperature)
        return partial(getattr(losses, p.divergence), temperature=p.temperature)

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        if TOKEN_MASK not in batch:
            raise ValueError(f"token_kd: the batch has no '{TOKEN_MASK}'; it distils language "
                             "models on language-modelling data (lm_text, lm_hf_dataset)")
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        if z_s.shape[-1] != z_t.shape[-1]:
            raise ValueError(f"token_kd: the student predicts {z_s.shape[-1]} tokens and the "
                             f"teacher {z_t.shape[-1]}; token-level KD compares distributions "
                             "over one vocabulary, so the student must share the teacher's "
                             "tokenizer (lm_student); to distil across tokenizers use span_kd "
                             "(likelihoods of word-aligned text spans) or sequence-level KD "
                             "on the teacher's generated text")
        if isinstance(z_t, TopKLogits) and p.divergence != "forward_kl":
            raise ValueError(f"token_kd: the teacher cache keeps the top-{z_t.k} logits, from "
                             f"which only forward_kl is computed (over the kept tokens and the "
                             f"tail); divergence '{p.divergence}' needs the teacher's full "
                             "logits: cache without top_k, or run the teacher live")
        kd = self.divergence()(z_s, z_t, mask=batch[TOKEN_MASK])
        terms = {"kd": Term(kd, weight=p.kd_weight, unit="tokens")}
        if p.ce_weight > 0:
            terms.update(label_term(z_s, batch, weight=p.ce_weight))
        return terms
