"""``regression_kd``: a student regresses a teacher's scores on original and noise-augmented
inputs (knowledge distillation for quality estimation)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from kdistill import losses
from kdistill.augment import gaussian_noise
from kdistill.batch import label_mask
from kdistill.recipes.base import Recipe, RecipeParams, Term, register
from kdistill.recipes.shared import ORIGINAL, VIEW, stack_views
from kdistill.schedules import TrainState
from kdistill.taps import Taps


class RegressionKDParams(RecipeParams):
    copies: int = Field(default=1, ge=0, le=64)
    noise_std: float = Field(default=0.1, ge=0)
    augmented_weight: float = Field(default=1.0, ge=0)
    gold_weight: float = Field(default=0.0, ge=0)


def scores(logits: Tensor, role: str) -> Tensor:
    """One score per sample, ``[N]``, from model outputs shaped ``[N]`` or ``[N, 1]``."""
    if logits.dim() == 2 and logits.shape[1] == 1:
        return logits[:, 0]
    if logits.dim() == 1:
        return logits
    raise ValueError(f"the {role}'s logits must hold one score per sample "
                     f"([N] or [N, 1]), got shape {tuple(logits.shape)}"
                     + (f": a classifier with {logits.shape[-1]} classes cannot be regressed on"
                        if logits.dim() == 2 else ""))


def gold_mse(s: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
    """Mean of (s - y)^2 over the ``rows`` with a known gold score (0, still in the graph, when
    there is none)."""
    if not labels.is_floating_point():
        raise ValueError(f"labels must be float scores (NaN = unknown) for a regression recipe, "
                         f"got dtype {labels.dtype}; is this a classification data set?")
    if labels.numel() != s.numel():
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the model's "
                         f"{tuple(s.shape)} scores")
    labels = labels.reshape(s.shape)
    known = label_mask(labels) & rows
    if not known.any():
        return s.sum() * 0.0
    return losses.logit_mse(s[known], labels[known].to(s.dtype))


@register
class GoldMSE(Recipe):
    """L = (1 / |K|) sum_{i in K} (s(x_i) - y_i)^2 over the samples K with a known gold score.

    The regression counterpart of ``ce``: the model on gold scores alone, no teacher. It is the
    no-KD baseline of regression runs and the recipe that trains a regression teacher.
    """

    name = "mse"
    summary = "Model trained on gold scores alone by MSE (no teacher): the regression baseline"
    paper = "-"
    uses_teacher = False
    uses_unlabeled = False
    task = "regression"

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        s = scores(student["logits"], "model")
        known = torch.ones_like(s, dtype=torch.bool)
        return {"mse": Term(gold_mse(s, batch["labels"], known), unit="labeled")}


@register
class RegressionKD(Recipe):
    """L = MSE(s(x), t(x)) + w_aug MSE(s(x~), t(x~)) + w_gold MSE(s(x), y) over known y.

    Gajbhiye, Fomicheva, Alva-Manchego, Blain, Obamuyide, Aletras & Specia (2021), "Knowledge
    Distillation for Quality Estimation". ``s``/``t`` are the student's and the teacher's scores
    (outputs ``[N]`` or ``[N, 1]``); ``x~`` are ``copies`` noisy copies of each input,
    ``x + noise_std * N(0, I)``, made in :meth:`prepare` so the teacher labels them in the same
    forward as the originals. Each term is a mean: ``kd`` over the original samples,
    ``kd_augmented`` over the copies (unit ``examples``), ``gold`` over the known gold scores of
    the original rows (float labels, NaN = unknown; unit ``labeled``).

    Defaults: ``copies`` = 1, ``noise_std`` = 0.1, ``augmented_weight`` = 1, ``gold_weight`` = 0
    (the paper trains on the teacher's scores alone). Our choices and measurements:
    docs/recipes.md.
    """

    name = "regression_kd"
    summary = "Student regresses the teacher's scores (MSE) on original + noise-augmented inputs"
    paper = ("Gajbhiye, Fomicheva, Alva-Manchego, Blain, Obamuyide, Aletras, Specia 2021, "
             "Knowledge Distillation for Quality Estimation")
    Params = RegressionKDParams
    task = "regression"
    teacher_recipe = ("mse", {})
    teacher_input_change = "noisy copies of each input"

    def teacher_signal_varies(self) -> str | None:
        """Without noisy copies (``copies: 0``) the teacher reads the samples as stored."""
        return super().teacher_signal_varies() if self.params.copies else None

    def prepare(self, batch: dict[str, Any], student: Callable[[Mapping[str, Any]], Taps],
                state: TrainState) -> dict[str, Any]:
        """The batch (view ``ORIGINAL`` = 0) followed by ``copies`` noisy copies of it (views
        1 .. ``copies``, marked in ``batch[VIEW]``); every other per-sample tensor is repeated
        and the copies' labels are hidden."""
        p = self.params
        inputs = batch.get("input")
        if not isinstance(inputs, Tensor):
            raise ValueError(f"regression_kd: needs batch['input'] tensors to augment; batch "
                             f"keys: {sorted(batch)}")
        if p.copies and not inputs.is_floating_point():
            raise ValueError(f"regression_kd: noise augmentation needs float inputs, "
                             f"batch['input'] has dtype {inputs.dtype} (set copies: 0 for token "
                             "inputs)")
        noisy = [{**batch, "input": gaussian_noise(inputs, p.noise_std)}
                 for _ in range(p.copies)]
        return stack_views(dict(enumerate([batch, *noisy])),
                           unlabeled=range(1, 1 + p.copies))

    def terms(self, student: Taps, teacher: Taps | None, batch: Mapping[str, Any],
              state: TrainState) -> dict[str, Term]:
        p = self.params
        s = scores(student["logits"], "student")
        t = scores(teacher["logits"], "teacher")
        views = batch.get(VIEW)
        original = views == ORIGINAL if views is not None else torch.ones_like(s, dtype=torch.bool)
        augmented = ~original
        terms = {"kd": Term(losses.logit_mse(s[original], t[original]))}
        if p.copies:
            terms["kd_augmented"] = Term(losses.logit_mse(s[augmented], t[augmented]),
                                         weight=p.augmented_weight)
        terms["gold"] = Term(gold_mse(s, batch["labels"], original), weight=p.gold_weight,
                             unit="labeled")
        return terms
