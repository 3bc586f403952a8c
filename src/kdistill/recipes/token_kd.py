"""``token_kd``: token-level distillation of a language model, the divergence chosen."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

from pydantic import Field, model_validator

from kdistill import losses
from kdistill.batch import TOKEN_MASK
from kdistill.losses.sampled import SampledLogits
from kdistill.losses.topk import TopKLogits
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import Weight, check_token_logits, label_term
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
    tokenizer: ``lm_student``). A teacher cache with ``top_k`` serves ``forward_kl``, ``tvd``
    and ``generalized_jsd`` with beta < 1, each over the kept tokens plus one tail bucket
    (a lower bound of the dense value, short of it by at most a function of the teacher's tail
    mass, see :mod:`kdistill.losses.sequence`); ``reverse_kl`` is refused. A cache with
    ``sample`` (random-sampling KD, Anshumann et al. 2025) serves ``forward_kl`` at T = 1, as
    an unbiased estimate (:func:`~kdistill.losses.sampled_kl`).
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

    def sparse_refusal(self, teacher_logits: Any) -> str | None:
        """Why the divergence cannot be computed from the sparse teacher logits of a teacher
        cache (see :mod:`kdistill.losses.sequence`), or ``None``."""
        p = self.params
        if isinstance(teacher_logits, SampledLogits) and (p.divergence != "forward_kl"
                                                          or p.temperature != 1.0):
            return (f"the teacher cache keeps {teacher_logits.k} tokens sampled from the "
                    "teacher's distribution, an unbiased estimate of the forward KL at "
                    f"temperature 1 alone; divergence '{p.divergence}' at temperature "
                    f"{p.temperature} has no such estimate: use forward_kl at temperature 1 "
                    "with this cache, or cache dense or top-k logits")
        reverse = p.divergence == "reverse_kl" or (p.divergence == "generalized_jsd"
                                                   and p.beta == 1.0)
        if isinstance(teacher_logits, TopKLogits) and reverse:
            name = "generalized_jsd at beta 1" if p.divergence != "reverse_kl" else "reverse_kl"
            return (f"the teacher cache keeps the top-{teacher_logits.k} logits plus the "
                    f"tail's mass; divergence '{name}' (KL(p_s || p_t)) misses the student's "
                    "tail mass times its divergence inside the teacher's tail, which nothing "
                    "the cache keeps bounds: use forward_kl, tvd or generalized_jsd with "
                    "beta < 1 with this cache, or cache dense logits")
        return None

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        z_s, z_t = student["logits"], teacher["logits"]
        check_token_logits(self.name, z_s, z_t, batch)
        refusal = self.sparse_refusal(z_t)
        if refusal is not None:
            raise ValueError(f"token_kd: {refusal}")
        kd = self.divergence()(z_s, z_t, mask=batch[TOKEN_MASK])
        terms = {"kd": Term(kd, weight=p.kd_weight, unit="tokens")}
        if p.ce_weight > 0:
            terms.update(label_term(z_s, batch, weight=p.ce_weight))
        return terms
